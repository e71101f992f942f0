"""Video processor for EchoAI: echo video file -> clip(s) -> normalised `pixel_values`.

One object, saved next to the model with `save_pretrained` and reloaded with
`AutoVideoProcessor.from_pretrained(folder)`, turns a video into model input the same way in
training, evaluation and inference:

    file or bytes --PyAV, only the needed frames--> (K, T) uint8 grey frames --resize--> image_size
         --(training only) pad+crop, gamma/contrast/brightness jitter--> replicate to num_channels
         --(x / 255 - image_mean) / image_std--> pixel_values (K, T, C, H, W) float32

Conventions (EchoNet-Dynamic, Ouyang et al. 2020):

* A clip is `num_frames` frames taken every `period`-th frame (EchoNet: 32 frames, period 2; EchoAI
  defaults to 16 frames, period 2, i.e. 0.64 s at 50 fps, most of a heart beat).
* Clip starts: `"random"` (training: one uniformly drawn start), `"start"` (one clip at a given
  start frame), `"all"` (EchoNet's test protocol: every start 0 .. n - (num_frames - 1) * period - 1,
  so n - (num_frames - 1) * period clips) and `"uniform"` (`num_clips` evenly spaced starts, first and
  last included; `num_clips=1` is the clip at frame 0). All four go through `clip_frame_indices`.
* Videos shorter than a clip (n < (num_frames - 1) * period + 1 frames) yield one clip starting at 0
  whose missing frames repeat the last frame. EchoNet pads with zeros instead; repeating keeps the
  padded frames inside the image statistics and the heart visible, at the cost of a frozen tail.
* Echo is grey: frames are decoded as luma (EchoNet's AVIs store three identical channels) and
  replicated to `num_channels` (3 for a model initialised from RGB weights, or 1).
* `image_mean` / `image_std` are per output channel, in [0, 1] pixel units (after dividing by 255).
  EchoNet computes them over a sample of training videos; so does `compute_mean_std`.
* Training augmentation (`do_augment=True`, off by default so inference is deterministic): zero
  padding by `augment_padding` pixels (EchoNet: 12) then a random crop back to `image_size`, and
  random gamma, contrast and brightness. No horizontal flip by default: it swaps the left and right
  heart, which an apical 4-chamber view never shows.

Decoding is `video_io_echoai.VideoReader`'s: a file, or a file's bytes (a prepared corpus's rows), decodes only
the frames its clips use. A video that cannot be read raises `VideoDecodingError`, whose message names the
file, the reason and the fix; training data loaders catch it per item (see `data_echoai.EchoNetTransform` and
`training_echoai.clip_item`).
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from tqdm.auto import tqdm
from transformers.image_processing_utils import BatchFeature
from transformers.models.auto.video_processing_auto import AutoVideoProcessor
from transformers.video_processing_utils import BaseVideoProcessor


try:  # loaded as Hub remote code, beside the model's files
    from .configuration_echoai import EchoAIConfig
    from .video_io_echoai import VideoDecodingError, VideoReader, decode_all_frames, open_video
except ImportError:  # installed as top-level modules
    from configuration_echoai import EchoAIConfig
    from video_io_echoai import VideoDecodingError, VideoReader, decode_all_frames, open_video


logger = logging.getLogger(__name__)

ClipSampling = Literal["random", "start", "all", "uniform"]
VideoLike = str | os.PathLike | bytes | VideoReader | np.ndarray | torch.Tensor


# --------------------------------------------------------------------------------------------------
# Clip sampling
# --------------------------------------------------------------------------------------------------


def num_clip_starts(num_video_frames: int, num_frames: int, period: int) -> int:
    """How many clip starts a video allows: 0 .. n - (num_frames - 1) * period - 1, or the single start 0 for a
    video shorter than one clip."""
    return max(num_video_frames - (num_frames - 1) * period, 1)


def clip_frame_indices(
    num_video_frames: int,
    num_frames: int,
    period: int,
    clip_sampling: ClipSampling = "uniform",
    clip_start: int = 0,
    num_clips: int = 1,
    generator: torch.Generator | None = None,
) -> np.ndarray:
    """Frame numbers of the clips to take from a video, shape (K, num_frames).

    Every sampling mode goes through here. Valid starts are 0 .. n - (num_frames - 1) * period - 1;
    a video too short for one clip gives the single start 0, and indices past its end repeat the
    last frame (see the module docstring).

    Args:
        num_video_frames: frames in the video (n).
        num_frames: frames per clip (T).
        period: step between sampled frames.
        clip_sampling: `"random"` (one random start), `"start"` (start at `clip_start`, clamped to the
            valid range), `"all"` (every valid start) or `"uniform"` (`num_clips` evenly spaced starts).
        generator: torch generator for `"random"` (default: torch's global RNG, which PyTorch seeds
            differently in every DataLoader worker).
    """
    if num_video_frames < 1:
        raise ValueError(f"num_video_frames must be positive, got {num_video_frames}")
    num_starts = num_clip_starts(num_video_frames, num_frames, period)
    if clip_sampling == "random":
        starts = torch.randint(num_starts, (1,), generator=generator).numpy()
    elif clip_sampling == "start":
        starts = np.array([min(max(clip_start, 0), num_starts - 1)])
    elif clip_sampling == "all":
        starts = np.arange(num_starts)
    elif clip_sampling == "uniform":
        if num_clips < 1:
            raise ValueError(f"num_clips must be at least 1, got {num_clips}")
        starts = np.round(np.linspace(0, num_starts - 1, num_clips)).astype(np.int64)
    else:
        raise ValueError(f"clip_sampling must be one of 'random', 'start', 'all', 'uniform', got {clip_sampling!r}")
    indices = starts[:, None] + period * np.arange(num_frames)[None, :]  # (K, T)
    return np.minimum(indices, num_video_frames - 1)


# --------------------------------------------------------------------------------------------------
# Normalisation statistics
# --------------------------------------------------------------------------------------------------


def compute_mean_std(
    videos: Sequence | Iterable,
    num_videos: int = 128,
    seed: int = 0,
    num_channels: int = 3,
    read_frames: Callable[[object], np.ndarray] = decode_all_frames,
) -> tuple[list[float], list[float]]:
    """Pixel mean and std over all frames of a random sample of videos, in [0, 1] units, per channel.

    EchoNet computes its normalisation this way from 128 training videos. `videos` is either sized and
    indexable (a list of paths, a `datasets.Dataset` of rows), of which `num_videos` are drawn at random with
    `seed`, or any other iterable (a stream: pass it shuffled), of which the first `num_videos` are used.
    `read_frames(video)` gives its uint8 frames: by default every frame of a video file (or its bytes); for a
    dataset's rows (EchoNet's paths or a prepared corpus's bytes), `data_echoai.row_frames`. Unreadable videos
    (`VideoDecodingError`) are skipped with a warning. Pass the result as
    `EchoAIVideoProcessor(image_mean=..., image_std=...)`.
    """
    if hasattr(videos, "__len__"):
        if not len(videos):
            raise ValueError("compute_mean_std needs at least one video")
        chosen = np.random.default_rng(seed).choice(len(videos), size=min(num_videos, len(videos)), replace=False)
        sample, total_videos = (videos[i] for i in sorted(chosen.tolist())), len(chosen)
    else:
        sample, total_videos = itertools.islice(videos, num_videos), None
    total, total_sq, count = 0.0, 0.0, 0
    for video in tqdm(sample, total=total_videos, desc="Pixel mean/std"):
        try:
            frames = read_frames(video)
        except VideoDecodingError as error:
            logger.warning("Skipping a video in the mean/std sample: %s", error)
            continue
        pixels = frames.astype(np.float64) / 255.0
        total, total_sq, count = total + pixels.sum(), total_sq + np.square(pixels).sum(), count + pixels.size
    if count == 0:
        raise ValueError("compute_mean_std could not read any of the sampled videos")
    mean = total / count
    std = float(np.sqrt(max(total_sq / count - mean**2, 0.0)))
    return [float(mean)] * num_channels, [std] * num_channels


def shifted(clips: torch.Tensor, offsets: list[list[int]], pad: int) -> torch.Tensor:
    """(K, T, H, W) -> the same, each clip zero-padded by `pad` and cropped back at its (row, column) offset."""
    H, W = clips.shape[-2:]
    padded = F.pad(clips, (pad, pad, pad, pad))
    return torch.stack([padded[k, :, i : i + H, j : j + W] for k, (i, j) in enumerate(offsets)])


# --------------------------------------------------------------------------------------------------
# The processor
# --------------------------------------------------------------------------------------------------


class EchoAIVideoProcessor(BaseVideoProcessor):
    r"""Decode, sample, resize, (augment) and normalise echo videos into EchoAI's `pixel_values`.

    Args:
        num_frames (`int`, defaults to 16): frames per clip (T).
        period (`int`, defaults to 2): take every `period`-th frame.
        image_size (`int`, defaults to 112): output height and width; frames are resized with
            antialiased bilinear interpolation when they differ (EchoNet's videos are 112 x 112).
        num_channels (`int`, defaults to 3): output channels; the grey frame is replicated.
        image_mean, image_std (`list[float]`, one per channel): normalisation in [0, 1] pixel units.
            The defaults map [0, 1] to [-1, 1]; use `compute_mean_std` on the training split.
        do_augment (`bool`, defaults to `False`): default for the training augmentation.
        augment_padding (`int`, defaults to 4): zero padding (pixels) before the random crop.
        brightness_jitter (`float`, defaults to 0.02): brightness offset drawn from U(-b, b), [0, 1] units.
        contrast_jitter (`float`, defaults to 0.1): contrast factor drawn from U(1 - c, 1 + c).
        gamma_jitter (`float`, defaults to 0.1): gamma drawn from exp(U(-g, g)).
        horizontal_flip_probability (`float`, defaults to 0.0): probability of a left-right flip.
            The intensity jitters are mild on purpose: a blood pool and the tissue around it differ by a few tens
            of grey levels, and a stronger jitter (0.1 brightness is +-25 levels) drowns the contrast EF is read
            from; with it a small model collapsed to predicting the mean EF (docs/EXPERIMENTS.md).

    Call: `processor(videos, clip_sampling=..., clip_start=..., num_clips=..., do_augment=...,
    generator=..., return_tensors="pt")`, where `videos` is a path, a video file's bytes, an open
    `video_io_echoai.VideoReader`, an array of frames (T, H, W) or (T, H, W, C) uint8, or a list of these. Returns a `BatchFeature` with `pixel_values`
    (N, T, C, H, W) float32 -- one row per clip -- and, when a video can give more than one clip
    (`clip_sampling="all"` or `num_clips > 1`), `video_index` (N,) int64, the input video of every
    clip (pop it before calling the model).
    """

    model_input_names = ["pixel_values"]
    rescale_factor = 1 / 255

    def __init__(
        self,
        num_frames: int = 16,
        period: int = 2,
        image_size: int = 112,
        num_channels: int = 3,
        image_mean: Sequence[float] | float = 0.5,
        image_std: Sequence[float] | float = 0.5,
        do_augment: bool = False,
        augment_padding: int = 4,
        brightness_jitter: float = 0.02,
        contrast_jitter: float = 0.1,
        gamma_jitter: float = 0.1,
        horizontal_flip_probability: float = 0.0,
        **kwargs,
    ):
        for name, value in (("num_frames", num_frames), ("period", period), ("image_size", image_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if num_channels not in (1, 3):
            raise ValueError(f"num_channels must be 1 or 3, got {num_channels!r}")
        image_mean = [float(image_mean)] * num_channels if np.isscalar(image_mean) else list(map(float, image_mean))
        image_std = [float(image_std)] * num_channels if np.isscalar(image_std) else list(map(float, image_std))
        for name, value in (("image_mean", image_mean), ("image_std", image_std)):
            if len(value) != num_channels:
                raise ValueError(f"{name} needs one value per channel ({num_channels}), got {value}")
        if min(image_std) <= 0:
            raise ValueError(f"image_std must be positive, got {image_std}")
        if not 0.0 <= horizontal_flip_probability <= 1.0:
            raise ValueError(f"horizontal_flip_probability must be in [0, 1], got {horizontal_flip_probability}")
        for key in ("video_processor_type", "image_processor_type"):
            kwargs.pop(key, None)
        super().__init__(**kwargs)
        self.num_frames, self.period, self.image_size, self.num_channels = num_frames, period, image_size, num_channels
        self.image_mean, self.image_std = image_mean, image_std
        self.do_augment, self.augment_padding = do_augment, augment_padding
        self.brightness_jitter, self.contrast_jitter, self.gamma_jitter = (
            brightness_jitter,
            contrast_jitter,
            gamma_jitter,
        )
        self.horizontal_flip_probability = horizontal_flip_probability

    @classmethod
    def _argument_names(cls) -> list[str]:
        """The constructor's named arguments: exactly what is saved, loaded and overridable."""
        parameters = inspect.signature(cls.__init__).parameters.values()
        return [p.name for p in parameters if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD]

    @classmethod
    def from_dict(cls, video_processor_dict: dict, **kwargs):
        """Build from a saved dict; `from_pretrained(folder, num_frames=32)` overrides a saved value."""
        return_unused_kwargs = kwargs.pop("return_unused_kwargs", False)
        names = cls._argument_names()
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        processor = cls(**{k: v for k, v in {**video_processor_dict, **overrides}.items() if k in names})
        if video_processor_dict.get("auto_map"):  # keep the remote-code pointer through save/load cycles
            processor.auto_map = video_processor_dict["auto_map"]
        return (processor, kwargs) if return_unused_kwargs else processor

    def to_dict(self) -> dict:
        extra = {"auto_map": self.auto_map} if getattr(self, "auto_map", None) else {}  # set by save_pretrained
        return {
            **{name: getattr(self, name) for name in self._argument_names()},
            "video_processor_type": type(self).__name__,
            **extra,
        }

    def preprocess(
        self,
        videos: VideoLike | Sequence[VideoLike],
        clip_sampling: ClipSampling = "uniform",
        clip_start: int = 0,
        num_clips: int = 1,
        do_augment: bool | None = None,
        generator: torch.Generator | None = None,
        num_frames: int | None = None,
        do_sample_frames: bool = True,
        return_tensors: str | None = "pt",
        device: str | torch.device | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Turn videos into `pixel_values`; see the class docstring for the call convention.

        transformers' `BaseVideoProcessor` keywords keep their meaning, so its pipelines can call this processor:
        `num_frames` is the clip length for this call (default: the processor's, which the model was trained with);
        `do_sample_frames=False` takes each video whole, every frame once in order, as one clip (the clip sampling
        arguments are then unused); `return_tensors` is "pt", "np" or None (torch tensors); `device` moves the
        output there. The other `BaseVideoProcessor` keywords (resizing, normalisation, `fps`) would change the
        training preprocessing per call, so they are an error naming the saved setting to change instead.
        """
        if kwargs:
            raise TypeError(
                f"EchoAIVideoProcessor takes no {', '.join(sorted(kwargs))} per call: its preprocessing is the saved "
                "training preprocessing; set num_frames / period / image_size / image_mean / image_std with "
                "EchoAIVideoProcessor.from_pretrained(folder, name=value) instead"
            )
        if isinstance(videos, (str, os.PathLike, bytes, VideoReader, np.ndarray, torch.Tensor)):
            videos = [videos]
        do_augment = self.do_augment if do_augment is None else do_augment
        if do_sample_frames:
            num_frames = self.num_frames if num_frames is None else num_frames
            if not isinstance(num_frames, int) or num_frames < 1:
                raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
            sampling = dict(clip_sampling=clip_sampling, clip_start=clip_start, num_clips=num_clips,
                            generator=generator, num_frames=num_frames)  # fmt: skip
        else:  # every frame once: one-frame clips at every start, regrouped below into one clip per video
            sampling = dict(clip_sampling="all", num_frames=1, period=1)
        clips, video_index = [], []
        for i, video in enumerate(videos):
            frames = self.sample_clips(video, **sampling)  # (K, T, H, W)
            if not do_sample_frames:
                frames = rearrange(frames, "t 1 h w -> 1 t h w")
            clips.append(self.frames_to_pixel_values(frames, do_augment=do_augment, generator=generator))
            video_index += [i] * len(frames)
        if len({clip.shape[1] for clip in clips}) > 1:
            raise ValueError(
                "do_sample_frames=False takes each video whole, and these videos differ in length: pass them one at "
                "a time, or sample clips of one length (do_sample_frames=True)"
            )
        data = {"pixel_values": clips[0] if len(clips) == 1 else torch.cat(clips)}
        if do_sample_frames and (clip_sampling == "all" or (clip_sampling == "uniform" and num_clips > 1)):
            data["video_index"] = torch.tensor(video_index, dtype=torch.int64)
        features = BatchFeature(data=data, tensor_type=return_tensors)
        return features.to(device) if device is not None else features

    def sample_clips(
        self,
        video: VideoLike,
        clip_sampling: ClipSampling = "uniform",
        clip_start: int = 0,
        num_clips: int = 1,
        generator: torch.Generator | None = None,
        num_frames: int | None = None,
        period: int | None = None,
    ) -> np.ndarray:
        """Clips of one video as grey uint8 frames, (K, T, H, W); a file, a file's bytes or an open `VideoReader`
        decodes only the frames the clips use. A DICOM file or its bytes is read by `video_io_echoai.open_video`:
        its ultrasound sector, padded to a square (`dicom_echoai.DicomReader`). `num_frames` / `period` set the clip
        length for this call only (default: the processor's, saved with the model)."""
        num_frames = self.num_frames if num_frames is None else num_frames
        period = self.period if period is None else period
        sampling = (num_frames, period, clip_sampling, clip_start, num_clips, generator)
        if isinstance(video, (str, os.PathLike, bytes, VideoReader)):
            with contextlib.nullcontext(video) if isinstance(video, VideoReader) else open_video(video) as reader:
                indices = clip_frame_indices(reader.num_frames, *sampling)  # (K, T)
                frames = reader.read(indices.reshape(-1)).frames
            return rearrange(frames, "(k t) h w -> k t h w", k=len(indices))
        video = self._as_grey_frames(video)
        return video[clip_frame_indices(len(video), *sampling)]

    @staticmethod
    def _as_grey_frames(video: np.ndarray | torch.Tensor) -> np.ndarray:
        video = video.numpy() if isinstance(video, torch.Tensor) else np.asarray(video)
        if video.ndim == 4 and video.shape[-1] in (1, 3):  # channels last, as PyAV's rgb24
            video = video.mean(axis=-1)
        if video.ndim != 3:
            raise ValueError(f"a video array must be (T, H, W) or (T, H, W, C) with C in (1, 3), got {video.shape}")
        return video.astype(np.uint8) if video.dtype != np.uint8 else video

    def frames_to_pixel_values(
        self,
        frames: np.ndarray,
        do_augment: bool = False,
        generator: torch.Generator | None = None,
        masks: np.ndarray | torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Grey uint8 clips (K, T, H, W) -> normalised float32 `pixel_values` (K, T, C, H, W).

        With `masks` (K, H, W), one per clip at the frames' size (0/1, e.g. `data_echoai.rasterize_polygon`'s LV
        mask), also returns them as the model sees them, float32 (K, image_size, image_size): resized as the frames
        are (so an antialiased mask has soft edges in [0, 1]) and shifted and flipped with the clip's own draws.
        """
        x = self.resize(torch.from_numpy(np.ascontiguousarray(frames)).float().mul_(self.rescale_factor))
        if masks is not None:
            masks = self.resize(torch.as_tensor(masks, dtype=torch.float32)[:, None])  # (K, 1, S, S)
        if do_augment and masks is not None:
            x, masks = self.augment(x, generator, masks=masks)
        elif do_augment:
            x = self.augment(x, generator)
        # (x - mean) / std per channel; broadcasting the grey frame over C replicates it, in one pass.
        inv_std = 1.0 / torch.tensor(self.image_std).view(1, 1, -1, 1, 1)
        shift = -torch.tensor(self.image_mean).view(1, 1, -1, 1, 1) * inv_std
        pixel_values = torch.addcmul(shift, rearrange(x, "k t h w -> k t 1 h w"), inv_std)  # (K, T, C, H, W)
        return pixel_values if masks is None else (pixel_values, masks[:, 0])

    def resize(self, clips: torch.Tensor) -> torch.Tensor:
        """(K, T, H, W) float -> (K, T, image_size, image_size), antialiased bilinear; unchanged at that size."""
        if clips.shape[-2:] == (self.image_size, self.image_size):
            return clips
        K = clips.shape[0]
        clips = F.interpolate(
            rearrange(clips, "k t h w -> (k t) 1 h w"), size=(self.image_size,) * 2, mode="bilinear", antialias=True
        )
        return rearrange(clips, "(k t) 1 h w -> k t h w", k=K)

    def augment(
        self, clips: torch.Tensor, generator: torch.Generator | None = None, masks: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """EchoNet-style training augmentation of clips (K, T, H, W) in [0, 1]; one draw per clip. `masks` (K, M, H,
        W), if given, take the same shift and flip (geometry, not intensity) and are returned too: (clips, masks)."""
        K = clips.shape[0]
        uniform = lambda: torch.rand(K, 1, 1, 1, generator=generator)  # noqa: E731  U(0, 1) per clip
        pad = self.augment_padding
        if pad > 0:  # zero-pad then crop back at a random offset: a random shift of up to `pad` px
            offsets = torch.randint(0, 2 * pad + 1, (K, 2), generator=generator).tolist()
            clips, masks = shifted(clips, offsets, pad), None if masks is None else shifted(masks, offsets, pad)
        gamma = torch.exp((2 * uniform() - 1) * self.gamma_jitter)
        contrast = 1 + (2 * uniform() - 1) * self.contrast_jitter
        brightness = (2 * uniform() - 1) * self.brightness_jitter
        clips = clips.clamp(0, 1) ** gamma
        mean = clips.mean(dim=(1, 2, 3), keepdim=True)
        clips = ((clips - mean) * contrast + mean + brightness).clamp(0, 1)
        if self.horizontal_flip_probability > 0:
            flip = uniform() < self.horizontal_flip_probability
            clips = torch.where(flip, clips.flip(-1), clips)
            masks = None if masks is None else torch.where(flip, masks.flip(-1), masks)
        return clips if masks is None else (clips, masks)


# Imported from its module: `transformers.AutoVideoProcessor` is a placeholder that raises when
# torchvision is missing, and EchoAI does not need torchvision. As with the model, register only when
# installed; as remote code the saved `auto_map` finds the class. `save_pretrained` then copies this file
# next to the processor config, so a Hub user without EchoAI loads it with `trust_remote_code=True`.
if not __package__:
    AutoVideoProcessor.register(EchoAIConfig, EchoAIVideoProcessor, exist_ok=True)
    EchoAIVideoProcessor.register_for_auto_class("AutoVideoProcessor")


__all__ = ["EchoAIVideoProcessor", "clip_frame_indices", "compute_mean_std", "num_clip_starts"]
