"""Inference for fine-tuned EchoAI EF models, shared by `scripts/evaluate.py` and `scripts/predict.py`.

* `load_model_and_processor` -- a fine-tuned `EchoAIForVideoClassification` and the processor saved
  with it, from a folder (or a cached Hub id), with errors that say what is missing.
* Protocols (`PROTOCOLS`, `protocol_clip_indices`): which clips of a video are scored. EchoNet-Dynamic
  (Ouyang et al., Nature 2020) reports "one clip" and "all clips" (the mean over every valid clip
  start); `k_clips` takes K evenly spaced clips. All go through the processor's `clip_frame_indices`,
  so the clips are exactly those `processor(path, clip_sampling=...)` would give.
* `detect_beats` -- segmentation-free cardiac-cycle detection from the frames themselves; with
  `beat_by_beat=True` one clip is centred on every detected beat (EchoNet's beat-by-beat estimate,
  with cycles found from image periodicity instead of a segmentation network).
* `predict_videos` -- the one per-video predictor (validation, evaluation, prediction, the EF pipeline): every video decoded once (only the frames some clip needs), resized and
  normalised once, its clips built by indexing those frames, and clips of consecutive videos packed
  into model batches of a fixed size; logits averaged per video. Decoding runs in DataLoader
  workers when `num_workers > 0`. An unreadable video becomes a result with its error, not a crash.
  With `compile_backend` the model runs under `torch.compile` (`compile_for_inference`).
* `scatter_plot`, `bland_altman_plot` -- the two figures of an EF evaluation; `make_figure`, the matplotlib
  figure (Agg canvas, no pyplot) every EchoAI picture is drawn on, training's and the experiments' too.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForVideoClassification
from transformers.models.auto.video_processing_auto import AutoVideoProcessor  # the top-level name needs torchvision
from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_NAME


try:  # loaded as Hub remote code, beside a fine-tuned model, by the EF pipeline (`pipeline_echoai.py`)
    from .baselines_echoai import CONFIG_FILE as BASELINE_CONFIG_FILE
    from .baselines_echoai import load_baseline
    from .video_io_echoai import VideoDecodingError, open_video
    from .video_processing_echoai import EchoAIVideoProcessor, clip_frame_indices
except ImportError:  # installed as top-level modules
    import modeling_echoai  # noqa: F401  registers EchoAI with the Auto classes
    from baselines_echoai import CONFIG_FILE as BASELINE_CONFIG_FILE
    from baselines_echoai import load_baseline
    from video_io_echoai import VideoDecodingError, open_video
    from video_processing_echoai import EchoAIVideoProcessor, clip_frame_indices


PROTOCOLS = ("one_clip", "all_clips", "k_clips")
PROCESSOR_FILE = "video_preprocessor_config.json"
WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME)
# Heart rates the beat detector considers (bpm): wider than adult rest (50-100) on both sides.
MIN_HEART_RATE, MAX_HEART_RATE = 30.0, 200.0


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


class ModelLoadingError(RuntimeError):
    """A model folder or Hub id that does not hold a usable fine-tuned model and processor."""


def load_model_and_processor(
    model_name_or_path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, EchoAIVideoProcessor]:
    """The fine-tuned model (eval mode, on `device`) and the processor saved beside it.

    A local folder must hold `config.json`, the weights (`model.safetensors`, sharded or not, or
    `pytorch_model.bin`) and `video_preprocessor_config.json` -- what `scripts/finetune.py` writes. A
    name that is not a local path is treated as a Hub id and read from the local cache (nothing is
    downloaded when `HF_HUB_OFFLINE=1`). A folder written by `finetune.py --baseline` (`baseline_config.json`)
    loads the baseline (`baselines_echoai.load_baseline`), so evaluation and prediction score it the same way.

    Raises:
        ModelLoadingError: the folder is missing, lacks the model or the processor, or the model is
            not a single-output regression model.
    """
    name = os.fspath(model_name_or_path)
    path = Path(name).expanduser()
    fix = "point --model_name_or_path at the output folder of scripts/finetune.py"
    looks_like_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not name.startswith(".")
    if path.exists() or not looks_like_hub_id:
        if not path.is_dir():
            raise ModelLoadingError(f"{path}: model folder not found; {fix}")
        if (path / BASELINE_CONFIG_FILE).is_file() and (path / PROCESSOR_FILE).is_file():
            return load_baseline(path).to(device).eval(), EchoAIVideoProcessor.from_pretrained(path)
        if not (path / CONFIG_NAME).is_file() or not any((path / w).is_file() for w in WEIGHT_FILES):
            raise ModelLoadingError(
                f"{path} holds no model (expected {CONFIG_NAME} and one of {', '.join(WEIGHT_FILES)}); {fix}"
            )
        if not (path / PROCESSOR_FILE).is_file():
            raise ModelLoadingError(
                f"{path} holds a model but no video processor ({PROCESSOR_FILE}); save the training processor "
                "there with `processor.save_pretrained(folder)` so that preprocessing matches training"
            )
    try:
        model = AutoModelForVideoClassification.from_pretrained(name)
        processor = AutoVideoProcessor.from_pretrained(name)
    except (OSError, ValueError) as error:
        where = "the Hub id (no local folder has that name)" if not path.exists() else "the folder"
        raise ModelLoadingError(f"cannot load a model and processor from {where} {name!r}: {error}") from error
    if model.config.num_labels != 1:
        raise ModelLoadingError(
            f"{name} has num_labels={model.config.num_labels}; EF prediction needs a regression model (num_labels=1)"
        )
    return model.to(device).eval(), processor


# --------------------------------------------------------------------------------------------------
# Beat detection
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BeatDetection:
    """Cardiac cycles found in a video by `detect_beats`.

    Attributes:
        beats: (ed_frame, es_frame) per detected cycle, in time order; ES follows its ED.
        period_frames: cycle length in frames (NaN when no periodicity was found).
        heart_rate: 60 * fps / period_frames, beats per minute.
        signal: (N,) the 1-D cardiac signal the cycles were read from: high in systole, low in diastole.
    """

    beats: list[tuple[int, int]]
    period_frames: float
    heart_rate: float
    signal: np.ndarray


def _moving_average(x: np.ndarray, width: int) -> np.ndarray:
    if width <= 1:
        return x
    padded = np.pad(x, width // 2, mode="edge")
    return np.convolve(padded, np.ones(width) / width, mode="valid")[: len(x)]


def cardiac_signal(frames: np.ndarray, pool: int = 4) -> np.ndarray:
    """One number per frame that follows the LV volume inversely: high at end-systole, low at end-diastole.

    The frames (N, H, W) are block-averaged (`pool` px) to suppress speckle, and the first principal
    component of the pixels' time courses is taken: the dominant coherent change in an apical view is
    the heart's contraction (ventricles and atria move together, in anti-phase). Its sign is chosen
    so that it correlates positively with the mean brightness of the central region, where the LV
    blood pool (dark) shrinks in systole as bright myocardium moves in.
    """
    N, H, W = frames.shape
    h, w = H // pool, W // pool
    x = frames[:, : h * pool, : w * pool].astype(np.float32).reshape(N, h, pool, w, pool).mean(axis=(2, 4))
    x = x.reshape(N, h * w)
    x = x - x.mean(axis=0, keepdims=True)
    centre = frames[:, int(0.15 * H) : int(0.7 * H), int(0.3 * W) : int(0.75 * W)].astype(np.float64).mean(axis=(1, 2))
    centre = centre - centre.mean()
    # First principal component by power iteration on the (N, N) Gram matrix, started from the centre
    # signal: a few hundred N x N products, far cheaper than a full SVD or eigendecomposition.
    gram = x.astype(np.float64) @ x.T.astype(np.float64)
    vector = centre if np.any(centre) else np.ones(N)
    vector = vector / np.linalg.norm(vector)
    for _ in range(500):
        following = gram @ vector
        norm = np.linalg.norm(following)
        if norm == 0:
            break
        following /= norm
        converged = np.linalg.norm(following - vector) < 1e-9
        vector = following
        if converged:
            break
    component = vector * np.sqrt(max(float(vector @ gram @ vector), 0.0))  # (N,), in pixel-value units
    return component if float(component @ centre) >= 0 else -component


def estimate_period(signal: np.ndarray, fps: float) -> float:
    """Cycle length in frames from the autocorrelation of `signal`, NaN when it shows no periodicity.

    The period is the first autocorrelation peak (lags of MAX_HEART_RATE .. MIN_HEART_RATE, at most
    3/4 of the video so the overlap stays meaningful) reaching 80 % of the highest one -- the first,
    not the highest, because multiples of the period peak as high. A video under ~1.3 cycles has no
    such peak; then twice the lag of the first trough (half a cycle apart, the signal anti-correlates)
    is used.
    """
    x = signal - signal.mean()
    n = len(x)
    min_lag = max(2, math.floor(fps * 60.0 / MAX_HEART_RATE))
    max_lag = min(math.ceil(fps * 60.0 / MIN_HEART_RATE), int(0.75 * n))
    if max_lag <= 2 or not np.any(x):
        return math.nan
    lags = np.arange(1, max_lag + 1)
    # Unbiased (per-overlap) normalised autocorrelation.
    ac = np.array([np.dot(x[:-k], x[k:]) / (n - k) for k in lags]) / (np.dot(x, x) / n)

    def local(i: int, sign: int) -> bool:
        return sign * ac[i] >= sign * ac[i - 1] and sign * ac[i] >= sign * ac[i + 1]

    inner = range(1, len(ac) - 1)
    peaks = [i for i in inner if local(i, 1) and ac[i] > 0 and lags[i] >= min_lag]
    troughs = [i for i in inner if local(i, -1) and ac[i] < 0]
    if peaks:
        best = next(i for i in peaks if ac[i] >= 0.8 * max(ac[j] for j in peaks))
        scale = 1.0
    elif troughs and 2 * lags[troughs[0]] >= min_lag:
        best, scale = troughs[0], 2.0
    else:
        return math.nan
    # Parabolic interpolation around the extremum for a sub-frame period.
    a, b, c = ac[best - 1], ac[best], ac[best + 1]
    curvature = a - 2 * b + c
    offset = 0.5 * (a - c) / curvature if curvature != 0 else 0.0
    return float(scale * (lags[best] + offset))


def _extrema(x: np.ndarray, half_window: int, lowest: bool, limit: float) -> list[int]:
    """Frames that are the extreme of x within +- half_window and beyond `limit` (below it for minima)."""
    found = []
    for i in range(len(x)):
        window = x[max(0, i - half_window) : i + half_window + 1]
        if lowest and x[i] == window.min() and x[i] <= limit:
            found.append(i)
        elif not lowest and x[i] == window.max() and x[i] >= limit:
            found.append(i)
    # Plateaus give neighbouring equal extrema; keep the first of each run.
    return [i for j, i in enumerate(found) if j == 0 or i - found[j - 1] > half_window]


def detect_beats(frames: np.ndarray, fps: float) -> BeatDetection:
    """Cardiac cycles of a grey echo video (N, H, W) uint8, without segmentation.

    1. `cardiac_signal`: a per-frame signal, high in systole (small LV) and low in diastole (large LV).
    2. `estimate_period`: the cycle length from its autocorrelation.
    3. The signal is smoothed over ~1/8 cycle; its minima (at least ~0.6 cycle apart, in the lower part
       of the range) are end-diastole candidates and its maxima end-systole candidates.
    4. Each ED is paired with the first ES after it and before the next ED (and within one cycle).

    Returns a `BeatDetection`; `beats` is empty when no periodicity or no complete ED -> ES pair is
    found (e.g. a still image or a clip shorter than a systole).
    """
    frames = np.asarray(frames)
    if frames.ndim != 3 or len(frames) < 4:
        raise ValueError(f"detect_beats needs grey frames (N, H, W) with N >= 4, got shape {frames.shape}")
    signal = cardiac_signal(frames)
    period = estimate_period(signal, fps)
    if math.isnan(period):
        return BeatDetection([], math.nan, math.nan, signal)
    smooth = _moving_average(signal, max(1, round(period / 8)) | 1)
    low, high = float(smooth.min()), float(smooth.max())
    half_window = max(1, round(0.3 * period))
    ed = _extrema(smooth, half_window, lowest=True, limit=low + 0.4 * (high - low))
    es = _extrema(smooth, half_window, lowest=False, limit=low + 0.6 * (high - low))
    beats = []
    for j, start in enumerate(ed):
        end = ed[j + 1] if j + 1 < len(ed) else len(frames)
        following = [e for e in es if start < e < end and e - start <= period]
        if following:
            beats.append((start, following[0]))
    return BeatDetection(beats, period, 60.0 * fps / period, signal)


def beat_clip_indices(
    beats: Sequence[tuple[int, int]], num_video_frames: int, num_frames: int, period: int
) -> np.ndarray:
    """(len(beats), num_frames) frame numbers of one clip centred on each beat's systole (mid ED -> ES),
    shifted inside the video where needed (through `clip_frame_indices`' "start" mode)."""
    span = (num_frames - 1) * period
    clips = [
        clip_frame_indices(num_video_frames, num_frames, period, "start", clip_start=round((ed + es) / 2 - span / 2))
        for ed, es in beats
    ]
    return np.concatenate(clips) if clips else np.empty((0, num_frames), dtype=np.int64)


def nearest_frame_error(detected: Sequence[int], traced: int) -> float:
    """|traced - nearest detected frame|, NaN when nothing was detected or there is no tracing (< 0)."""
    if traced < 0 or not len(detected):
        return math.nan
    return float(min(abs(int(d) - traced) for d in detected))


# --------------------------------------------------------------------------------------------------
# Clips and decoding
# --------------------------------------------------------------------------------------------------


def protocol_clip_indices(
    num_video_frames: int, processor: EchoAIVideoProcessor, protocol: str, num_clips: int = 1
) -> np.ndarray:
    """(K, T) frame numbers of the clips a protocol scores, exactly as the processor samples them.

    one_clip: the clip at frame 0 (`clip_sampling="uniform", num_clips=1`); all_clips: every valid start
    (`"all"`, n - (T - 1) * period clips); k_clips: `num_clips` evenly spaced starts (`"uniform"`).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    sampling, k = {"one_clip": ("uniform", 1), "all_clips": ("all", 1), "k_clips": ("uniform", num_clips)}[protocol]
    return clip_frame_indices(num_video_frames, processor.num_frames, processor.period, sampling, num_clips=k)


@dataclass
class DecodedVideo:
    """One video ready for the model: its used frames normalised once, and the clips as indices into them."""

    index: int
    path: str
    fps: float = math.nan
    num_video_frames: int = 0
    pixel_values: torch.Tensor | None = None  # (U, C, H, W): the U distinct frames any clip uses
    clips: dict[str, torch.Tensor] = field(default_factory=dict)  # clip set -> (K, T) indices into pixel_values
    beats: BeatDetection | None = None
    error: str | None = None


class VideoClips(torch.utils.data.Dataset):
    """Map-style dataset over videos yielding `DecodedVideo`s, for a DataLoader with `batch_size=None`.

    A video is a file or an array of frames (T, H, W) or (T, H, W, C) uint8, as the processor takes it; an
    array has no frame rate (0, as a file that states none) and is named `<array i>` in the results. Each video is
    probed and decoded once -- every frame when `beat_by_beat` (the detector needs them all), else only the frames
    the protocol's clips use -- then resized and normalised by the processor in one pass. Clip sets: "protocol",
    and "beats" with `beat_by_beat`.
    """

    def __init__(
        self,
        videos: Sequence[str | os.PathLike | np.ndarray | torch.Tensor],
        processor: EchoAIVideoProcessor,
        protocol: str = "all_clips",
        num_clips: int = 1,
        beat_by_beat: bool = False,
    ):
        protocol_clip_indices(1, processor, protocol, num_clips)  # validate early, in the main process
        self.videos = list(videos)
        self.paths = [
            f"<array {i}>" if isinstance(video, (np.ndarray, torch.Tensor)) else os.fspath(video)
            for i, video in enumerate(self.videos)
        ]
        self.processor, self.protocol, self.num_clips, self.beat_by_beat = processor, protocol, num_clips, beat_by_beat

    def __len__(self) -> int:
        return len(self.paths)

    @contextlib.contextmanager
    def frame_source(self, video) -> Iterator[tuple[float, int, Callable[[np.ndarray], np.ndarray]]]:
        """(frame rate, frame count, read(sorted frame numbers) -> grey uint8 frames (N, H, W)) of one video, with
        the file opened once for both (a DICOM is decoded whole when opened)."""
        if isinstance(video, (np.ndarray, torch.Tensor)):
            frames = self.processor._as_grey_frames(video)  # the processor's own reading of an array
            yield 0.0, len(frames), frames.__getitem__
            return
        with open_video(video) as reader:
            yield reader.info.fps, reader.num_frames, lambda wanted: reader.read(wanted).frames

    def _read_clips(self, item: DecodedVideo, read: Callable[[np.ndarray], np.ndarray]):
        """(frames, their frame numbers, clip sets) of one video: every frame with `beat_by_beat`, else only the
        frames the protocol's clips use."""
        clip_sets = {
            "protocol": protocol_clip_indices(item.num_video_frames, self.processor, self.protocol, self.num_clips)
        }
        if self.beat_by_beat:
            wanted = np.arange(item.num_video_frames)
            frames = read(wanted)  # (N, H, W)
            item.beats = detect_beats(frames, item.fps) if len(frames) >= 4 else None
            beats = item.beats.beats if item.beats else []
            clip_sets["beats"] = beat_clip_indices(
                beats, item.num_video_frames, self.processor.num_frames, self.processor.period
            )
        else:
            wanted = np.unique(clip_sets["protocol"])
            frames = read(wanted)  # (U, H, W)
        return frames, wanted, clip_sets

    def __getitem__(self, i: int) -> DecodedVideo:
        item = DecodedVideo(index=i, path=self.paths[i])
        try:
            with self.frame_source(self.videos[i]) as (fps, num_frames, read):
                item.fps, item.num_video_frames = fps, num_frames
                frames, wanted, clip_sets = self._read_clips(item, read)
        except VideoDecodingError as error:
            item.error = error.reason
            return item
        item.pixel_values = self.processor.frames_to_pixel_values(frames[None])[0]  # (U, C, H, W)
        # Frame numbers -> rows of pixel_values (`wanted` is sorted and holds every used frame).
        item.clips = {k: torch.from_numpy(np.searchsorted(wanted, v)) for k, v in clip_sets.items()}
        return item


def _single(item):
    return item


# --------------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------------


@dataclass
class VideoPrediction:
    """The prediction for one video: EF, or class logits.

    Attributes:
        path, fps, num_video_frames: the video.
        logits: (num_labels,) the model's logits averaged over the protocol's clips: (EF %,) for a regression
            model, class logits for a classifier; empty if the video could not be read.
        ef: mean EF (%) over the protocol's clips; NaN if the video could not be read or the model classifies.
        clip_spread: standard deviation (ddof=0) of the clip predictions, 0 for one clip.
        num_clips: clips averaged.
        clip_predictions: (num_clips,) EF per clip, in clip order.
        ef_beat_by_beat, beat_clip_spread, num_beats: the same over beat-centred clips (with
            `beat_by_beat`; when no beat is found, ef_beat_by_beat falls back to `ef` and num_beats is 0).
        beats: the `BeatDetection`, with `beat_by_beat`.
        error: why the video could not be used (`VideoDecodingError.reason`), else None.
    """

    path: str
    logits: np.ndarray = field(default_factory=lambda: np.empty(0))
    ef: float = math.nan
    clip_spread: float = math.nan
    num_clips: int = 0
    clip_predictions: np.ndarray = field(default_factory=lambda: np.empty(0))
    ef_beat_by_beat: float = math.nan
    beat_clip_spread: float = math.nan
    num_beats: int = 0
    beats: BeatDetection | None = None
    fps: float = math.nan
    num_video_frames: int = 0
    error: str | None = None


def _clip_batches(
    videos: Iterator[DecodedVideo], batch_size: int, on_video: Callable[[DecodedVideo], None]
) -> Iterator[tuple[torch.Tensor, list[tuple[int, str]]]]:
    """Pack the clips of consecutive videos into batches of `batch_size` (the last one smaller).

    Yields `(pixel_values (B, T, C, H, W), owners)`, owners[b] = (video index, clip set) of clip b.
    A video's frames are dropped as soon as its last clip has been packed.
    """
    pending: list[tuple[DecodedVideo, str, torch.Tensor]] = []  # (video, clip set, (k, T) indices)
    num_pending = 0

    def take(count: int):
        nonlocal num_pending
        parts, owners = [], []
        while count:
            video, name, indices = pending[0]
            used, rest = indices[:count], indices[count:]
            parts.append(video.pixel_values[used])  # (k, T, C, H, W) by indexing, no decoding
            owners += [(video.index, name)] * len(used)
            count -= len(used)
            num_pending -= len(used)
            if len(rest):
                pending[0] = (video, name, rest)
            else:
                pending.pop(0)
        return torch.cat(parts), owners

    for video in videos:
        on_video(video)
        for name, indices in video.clips.items():
            if len(indices):
                pending.append((video, name, indices))
                num_pending += len(indices)
        while num_pending >= batch_size:
            yield take(batch_size)
    if num_pending:
        yield take(num_pending)


def add_prediction_arguments(parser: argparse.ArgumentParser) -> None:
    """The options `scripts/evaluate.py` and `scripts/predict.py` share: which clips are scored, how they are
    batched, and what runs the model. `prediction_options` validates them."""
    add = parser.add_argument
    add("--protocol", choices=PROTOCOLS, default="all_clips")
    add("--num_clips", type=int, default=4, help="Clips per video for --protocol k_clips.")
    add("--per_device_eval_batch_size", type=int, default=32, help="Clips per forward pass.")
    add("--num_workers", type=int, default=0, help="DataLoader processes decoding videos.")
    add("--bf16", action="store_true", help="bfloat16 autocast.")
    add(
        "--torch_compile", action="store_true",
        help="Run the model under torch.compile with frozen weights (static shapes, one compilation per run). The "
        "first batch pays the compilation, so it pays off over a test set, not a few videos (docs/BENCHMARKS.md).",
    )  # fmt: skip
    add("--torch_compile_backend", default="inductor", help="torch.compile backend with --torch_compile.")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def prediction_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """Check the options of `add_prediction_arguments` (exits through `parser.error`) and return them as
    `predict_videos` keyword arguments."""
    if args.num_clips < 1 or args.per_device_eval_batch_size < 1:
        parser.error("--num_clips and --per_device_eval_batch_size must be at least 1")
    return dict(
        protocol=args.protocol, num_clips=args.num_clips, batch_size=args.per_device_eval_batch_size,
        num_workers=args.num_workers, bf16=args.bf16,
        compile_backend=args.torch_compile_backend if args.torch_compile else None,
    )  # fmt: skip


def compile_for_inference(model: torch.nn.Module, backend: str | Callable = "inductor") -> torch.nn.Module:
    """`torch.compile` for prediction. Shapes are static (`predict_videos` pads every batch to one size, so one
    compilation serves a whole run), and with inductor the weights are frozen as constants: their bf16 casts are
    folded away and the biases and activations fused into the matmuls. The model's weights must not change
    afterwards; the eager `model` itself is untouched."""
    options = {"freezing": True} if backend == "inductor" else None
    return torch.compile(model, backend=backend, dynamic=False, options=options)


@torch.no_grad()
def predict_videos(
    model: torch.nn.Module,
    processor: EchoAIVideoProcessor,
    videos: Sequence[str | os.PathLike | np.ndarray],
    protocol: str = "all_clips",
    num_clips: int = 1,
    beat_by_beat: bool = False,
    batch_size: int = 64,
    num_workers: int = 0,
    bf16: bool = False,
    progress: bool = True,
    compile_backend: str | Callable | None = None,
) -> list[VideoPrediction]:
    """The model's per-video prediction: its logits averaged over the protocol's clips (see the module docstring
    for how clips are built and batched) -- EF (%) for a regression model. One result per video (a file, or an
    array of frames as `VideoClips` takes it), in order; unreadable videos come back with `error` set and NaN EF.
    Fine-tuning validation (`training_echoai.predict_split`), `scripts/evaluate.py`, `scripts/predict.py` and the
    EF pipeline (through `predict_decoded`) all predict through it.

    Args:
        model: a regression `EchoAIForVideoClassification` (logits (B, 1) in EF %) or a classifier (logits
            (B, num_labels), averaged into `VideoPrediction.logits` only), in eval mode.
        processor: the processor saved with the model.
        protocol: "one_clip", "all_clips" or "k_clips" (with `num_clips`).
        beat_by_beat: also detect cardiac cycles and score one clip centred on each (`ef_beat_by_beat`).
        batch_size: clips per forward pass; clips of several videos share a batch.
        num_workers: DataLoader processes decoding videos (0: in this process).
        bf16: run the model under bfloat16 autocast.
        compile_backend: run the model under `torch.compile` with this backend ("inductor"; see
            `compile_for_inference`). The first batch pays the compilation; the last batch is padded to
            `batch_size` with copies of its last clip, whose predictions are discarded.
    """
    dataset = VideoClips(videos, processor, protocol, num_clips, beat_by_beat)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=num_workers, collate_fn=_single,
        prefetch_factor=2 if num_workers else None, persistent_workers=False,
    )  # fmt: skip
    decoded = tqdm(loader, total=len(dataset), desc=f"EF ({protocol})", unit="video", disable=not progress)
    return predict_decoded(model, decoded, beat_by_beat, batch_size, bf16, compile_backend)


@torch.no_grad()
def predict_decoded(
    model: torch.nn.Module,
    videos: Iterable[DecodedVideo],
    beat_by_beat: bool = False,
    batch_size: int = 64,
    bf16: bool = False,
    compile_backend: str | Callable | None = None,
) -> list[VideoPrediction]:
    """`predict_videos` from `VideoClips`' decoded videos on: the model over their clips, packed into batches of
    `batch_size`, averaged per video; one result per video, in order. The EF pipeline (`pipeline_echoai`)
    decodes in its `preprocess` and predicts through here, one video at a time."""
    described: list[tuple[int, VideoPrediction]] = []

    def on_video(video: DecodedVideo) -> None:
        described.append((video.index, VideoPrediction(
            path=video.path, fps=video.fps, num_video_frames=video.num_video_frames, error=video.error,
            beats=video.beats,
        )))  # fmt: skip

    clip_logits = _clip_logits(model, _clip_batches(iter(videos), batch_size, on_video), batch_size, bf16,
                               compile_backend)  # fmt: skip
    for i, result in described:
        if result.error is None:
            _average_clips(result, clip_logits[(i, "protocol")], clip_logits.get((i, "beats")), beat_by_beat)
    return [result for _, result in described]


def _clip_logits(
    model: torch.nn.Module,
    batches: Iterator[tuple[torch.Tensor, list[tuple[int, str]]]],
    batch_size: int,
    bf16: bool,
    compile_backend: str | Callable | None,
) -> dict[tuple[int, str], np.ndarray]:
    """Run the model over `_clip_batches`: (video index, clip set) -> (K, num_labels) float64 logits per clip."""
    weight = next(model.parameters())  # its device, and its dtype: a model loaded in bfloat16 takes bfloat16 clips
    device = weight.device
    forward = compile_for_inference(model, compile_backend) if compile_backend else model
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    rows: dict[tuple[int, str], list[torch.Tensor]] = {}
    for pixel_values, owners in batches:
        if compile_backend and len(pixel_values) < batch_size:  # one static shape: no second compilation
            padding = pixel_values[-1:].expand(batch_size - len(pixel_values), *pixel_values.shape[1:])
            pixel_values = torch.cat([pixel_values, padding])
        with autocast:
            logits = forward(
                pixel_values=pixel_values.to(device, weight.dtype, non_blocking=True)
            ).logits  # (B, labels)
        logits = logits.float()[: len(owners)].cpu()
        for row, owner in zip(logits, owners, strict=True):
            rows.setdefault(owner, []).append(row)
    return {owner: torch.stack(values).numpy().astype(np.float64) for owner, values in rows.items()}


def _average_clips(
    result: VideoPrediction, clips: np.ndarray, beat_clips: np.ndarray | None, beat_by_beat: bool
) -> None:
    """Fill `result` from its clips' (K, num_labels) logits (and its beat-centred clips', with `beat_by_beat`)."""
    result.logits, result.num_clips = clips.mean(axis=0), len(clips)
    if clips.shape[1] != 1:  # class logits: no EF
        return
    values = np.ascontiguousarray(clips[:, 0])  # (K,) EF % per clip
    result.clip_predictions, result.ef, result.clip_spread = values, float(values.mean()), float(values.std())
    if not beat_by_beat:
        return
    if beat_clips is not None:
        beats = np.ascontiguousarray(beat_clips[:, 0])
        result.ef_beat_by_beat, result.beat_clip_spread = float(beats.mean()), float(beats.std())
        result.num_beats = len(beats)
    else:  # no cycle found: fall back to the protocol's estimate
        result.ef_beat_by_beat, result.beat_clip_spread = result.ef, result.clip_spread


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------


def make_figure(size: tuple[float, float], dpi: float = 120):
    """An empty matplotlib `Figure` of `size` inches, saved at `dpi` by `figure.savefig(path)`: every EchoAI picture.

    A bare Figure renders through the Agg canvas without pyplot: no global backend is chosen for the process
    (`matplotlib.use`), and pyplot keeps no reference to it, so nothing needs closing and a caller's own
    pyplot session (a notebook) is left alone.
    """
    try:  # optional: the EF pipeline ships this module as remote code, where figures are never drawn
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("EchoAI's figures need matplotlib: pip install matplotlib") from error

    return Figure(figsize=size, dpi=dpi)


def scatter_plot(
    predictions: Sequence[float], references: Sequence[float], metrics: dict, path: str | os.PathLike, title: str = ""
) -> Path:
    """Predicted against reference EF with the identity line; MAE, RMSE and R² in the legend."""
    predictions, references = np.asarray(predictions, float), np.asarray(references, float)
    figure = make_figure((5, 5))
    axes = figure.add_subplot()
    label = f"MAE {metrics['mae']:.2f}, RMSE {metrics['rmse']:.2f}, R² {metrics['r2']:.3f} (n={len(references)})"
    axes.scatter(references, predictions, s=12, alpha=0.6, edgecolors="none", label=label)
    low = min(0.0, float(np.nanmin([references.min(), predictions.min()])))
    high = max(100.0, float(np.nanmax([references.max(), predictions.max()])))
    axes.plot([low, high], [low, high], color="black", linewidth=1, linestyle="--", label="identity")
    axes.set(xlim=(low, high), ylim=(low, high), xlabel="reference EF (%)", ylabel="predicted EF (%)")
    axes.set_title(title or "Predicted vs reference EF", fontsize=10)
    axes.set_aspect("equal")
    axes.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)


def bland_altman_plot(
    predictions: Sequence[float], references: Sequence[float], metrics: dict, path: str | os.PathLike, title: str = ""
) -> Path:
    """Difference (predicted - reference) against the mean of the two, with the bias and the 95 % limits
    of agreement from `metrics` (`bias`, `loa_lower`, `loa_upper`; Bland & Altman 1986)."""
    predictions, references = np.asarray(predictions, float), np.asarray(references, float)
    figure = make_figure((6, 4.5))
    axes = figure.add_subplot()
    axes.scatter((predictions + references) / 2, predictions - references, s=12, alpha=0.6, edgecolors="none")
    for key, style, name in (("bias", "-", "bias"), ("loa_lower", "--", "-1.96 SD"), ("loa_upper", "--", "+1.96 SD")):
        axes.axhline(metrics[key], color="black", linestyle=style, linewidth=1, label=f"{name} {metrics[key]:+.2f}")
    axes.set(xlabel="mean of predicted and reference EF (%)", ylabel="predicted - reference EF (%)")
    axes.set_title(title or "Bland-Altman", fontsize=10)
    axes.legend(loc="best", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)


__all__ = [
    "PROTOCOLS",
    "BeatDetection",
    "DecodedVideo",
    "ModelLoadingError",
    "VideoClips",
    "VideoPrediction",
    "beat_clip_indices",
    "bland_altman_plot",
    "cardiac_signal",
    "detect_beats",
    "estimate_period",
    "load_model_and_processor",
    "make_figure",
    "nearest_frame_error",
    "predict_decoded",
    "predict_videos",
    "protocol_clip_indices",
    "scatter_plot",
]
