"""Where an EchoAI EF model looked: occlusion saliency by leaving tubelets out, and the pictures of it.

A tubelet's saliency is how much the EF estimate of a clip changes when that tubelet -- or the group of tubelets
it belongs to -- is left out of the encoder's input:

    saliency[g] = EF(clip) - EF(clip without group g)          (EF points; > 0: the group raised the estimate)

Leaving tokens out is what the encoder already does under its pretraining mask (`bool_masked_pos`), so an
occluded clip stays in the distribution an MAE-pretrained encoder has seen; painting the pixels grey instead
would show it an image it never saw, and the change would partly measure that surprise. The reference EF is
computed through the same masked path with nothing hidden, so an empty occlusion changes the estimate by exactly
zero.

Groups are blocks of `group_shape = (t, h, w)` tubelets. The default takes the whole clip in time and the finest
square blocks in space that keep the number of groups -- forward passes -- at or under `max_groups` (50): a
spatial map of where EF was read from. A map resolved in time as well (`group_shape=(1, 2, 2)`, say) costs more
passes, and needs `pooling="mean"`: `"mean_max_min"` summarises each time slice, which is only defined when every
slice keeps the same number of tokens. Occluded variants of a clip are batched, grouped by how many tokens they
hide (every sample of a batch must hide as many).

captum's `FeatureAblation` does the same arithmetic, but it ablates by replacing input *values* with a baseline
(the grey-painting above) and cannot hand the model a shorter token sequence; the token-dropping loop here is a
few lines.

Pictures (`save_saliency`): the raw map as `.npy` (T', h, w), an MP4 of the clip with the map blended in, and a
PNG strip of the clip's frames -- one cardiac cycle when the clip is centred on a detected beat -- with the map.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from einops import repeat

from inference_echoai import DecodedVideo, VideoClips, make_figure
from modeling_echoai import token_grid


DEFAULT_MAX_GROUPS = 50


@dataclass
class OcclusionSaliency:
    """The occlusion map of one clip.

    Attributes:
        saliency: (T', h, w) float32, the EF change (points) when the tubelet's group is left out; every tubelet
            of a group carries the group's value.
        ef: the clip's EF (%) with nothing left out.
        group_shape: (t, h, w) tubelets per group.
        num_forward_passes: occluded variants run (one per group).
    """

    saliency: np.ndarray
    ef: float
    group_shape: tuple[int, int, int]
    num_forward_passes: int


def default_group_shape(grid: Sequence[int], max_groups: int = DEFAULT_MAX_GROUPS) -> tuple[int, int, int]:
    """The whole clip in time, and the smallest square spatial block giving at most `max_groups` groups."""
    num_slices, height, width = grid
    for side in range(1, max(height, width) + 1):
        if math.ceil(height / side) * math.ceil(width / side) <= max_groups:
            return num_slices, side, side
    return num_slices, height, width


def occlusion_groups(grid: Sequence[int], group_shape: Sequence[int]) -> torch.Tensor:
    """(L,) int64: the group of every token, in the encoder's token order (T' h w); blocks at the far edges may be
    smaller than `group_shape`."""
    num_slices, height, width = grid
    gt, gh, gw = group_shape
    if min(group_shape) < 1:
        raise ValueError(f"group_shape must be positive tubelet counts (t, h, w), got {tuple(group_shape)}")
    t = torch.arange(num_slices) // gt
    y = torch.arange(height) // gh
    x = torch.arange(width) // gw
    ids = (t[:, None, None] * (y[-1] + 1) + y[None, :, None]) * (x[-1] + 1) + x[None, None, :]  # (T', h, w)
    return ids.reshape(-1)


@torch.no_grad()
def occlusion_saliency(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    group_shape: Sequence[int] | None = None,
    max_groups: int = DEFAULT_MAX_GROUPS,
    batch_size: int = 16,
    groups: Sequence[int] | None = None,
) -> OcclusionSaliency:
    """Occlusion saliency of one clip (1, T, C, H, W) or (T, C, H, W) for a regression
    `EchoAIForVideoClassification` at its own geometry.

    `groups` restricts the occlusion set to those group ids (default: every group); groups not occluded get 0.
    """
    config = model.config
    if config.num_labels != 1:
        raise ValueError(f"saliency needs a regression (EF) model with one output, this one has {config.num_labels}")
    clip = pixel_values if pixel_values.ndim == 5 else pixel_values[None]  # (1, T, C, H, W)
    grid = token_grid(config, clip, interpolate_pos_encoding=False)  # (T', h, w); checks the clip's shape
    group_shape = tuple(group_shape) if group_shape else default_group_shape(grid, max_groups)
    if group_shape[0] < grid[0] and config.pooling != "mean":
        raise ValueError(
            f"a time-resolved group_shape {group_shape} needs pooling='mean'; this model pools with "
            f"{config.pooling!r}, which summarises each time slice: use group_shape=({grid[0]}, h, w)"
        )
    token_group = occlusion_groups(grid, group_shape)  # (L,)
    sizes = torch.bincount(token_group)  # (G,) tokens per group
    occluded = range(len(sizes)) if groups is None else sorted(set(groups))
    device = next(model.parameters()).device
    clip = clip.to(device)

    def ef(masks: torch.Tensor) -> torch.Tensor:  # (V, L) bool -> (V,) EF
        rows = [
            model(pixel_values=clip.expand(len(part), -1, -1, -1, -1), bool_masked_pos=part.to(device)).logits
            for part in masks.split(batch_size)
        ]
        return torch.cat(rows)[:, 0].float().cpu()

    reference = float(ef(torch.zeros(1, len(token_group), dtype=torch.bool))[0])
    change = torch.zeros(len(sizes))
    by_size: dict[int, list[int]] = {}
    for g in occluded:
        by_size.setdefault(int(sizes[g]), []).append(g)
    for same_size in by_size.values():  # every sample of a batch hides the same number of tokens
        masks = token_group[None, :] == torch.tensor(same_size)[:, None]  # (V, L)
        change[same_size] = reference - ef(masks)
    saliency = change[token_group].reshape(grid).numpy().astype(np.float32)
    return OcclusionSaliency(saliency, reference, group_shape, len(occluded))


@dataclass
class VideoSaliency:
    """The saliency of the clip of a video that `video_saliency` chose, with what its pictures need.

    Attributes:
        path: the video.
        result: the clip's `OcclusionSaliency`, or None when the video could not be read (`error`).
        frames: (T, H, W) uint8, the clip's grey frames at the model's input size (as the model saw them).
        frame_numbers: (T,) the clip's frame numbers in the video.
        fps: the video's frame rate.
        centred_on_beat: True when the clip is centred on the first detected beat, False for the clip at frame 0.
        error: why the video could not be used, else None.
    """

    path: str
    result: OcclusionSaliency | None = None
    frames: np.ndarray | None = None
    frame_numbers: np.ndarray | None = None
    fps: float = math.nan
    centred_on_beat: bool = False
    error: str | None = None


def decoded_saliency(
    model: torch.nn.Module,
    processor,
    item: DecodedVideo,
    group_shape: Sequence[int] | None = None,
    max_groups: int = DEFAULT_MAX_GROUPS,
    batch_size: int = 16,
) -> VideoSaliency:
    """Saliency of one clip of a video decoded by `inference_echoai.VideoClips` with `beat_by_beat=True` (every
    frame, and the beat-centred clips): the clip centred on the first cardiac cycle `detect_beats` found (one beat,
    ED to ES, in the middle of the clip), else the protocol's first clip, the clip at frame 0. A caller that also
    predicts the video (`predict_decoded`) hands the same decoded video to both."""
    if item.error is not None:
        return VideoSaliency(path=item.path, error=item.error)
    if "beats" not in item.clips:
        raise ValueError("decoded_saliency needs a video decoded with VideoClips(..., beat_by_beat=True)")
    beats = item.clips["beats"]
    centred = len(beats) > 0
    clip = (beats if centred else item.clips["protocol"])[0]  # (T,) rows of item.pixel_values
    pixel_values = item.pixel_values[clip]  # (T, C, H, W)
    result = occlusion_saliency(model, pixel_values, group_shape, max_groups, batch_size)
    # The grey frames back from the first channel: (x - mean) / std undone, in [0, 255].
    grey = pixel_values[:, 0] * processor.image_std[0] + processor.image_mean[0]
    frames = (grey * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    # With beat_by_beat every frame is decoded, so a row of item.pixel_values is its frame number.
    return VideoSaliency(item.path, result, frames, clip.numpy(), item.fps, centred)


def video_saliency(
    model: torch.nn.Module,
    processor,
    path: str | os.PathLike,
    group_shape: Sequence[int] | None = None,
    max_groups: int = DEFAULT_MAX_GROUPS,
    batch_size: int = 16,
) -> VideoSaliency:
    """`decoded_saliency` of a video file, read and normalised the way `predict_videos` reads it, so the clip is
    one the predictor scores."""
    item = VideoClips([path], processor, protocol="one_clip", beat_by_beat=True)[0]
    return decoded_saliency(model, processor, item, group_shape, max_groups, batch_size)


# --------------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------------


def overlay_frames(frames: np.ndarray, saliency: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Grey clip frames (T, H, W) uint8 and a map (T', h, w) -> RGB frames (T, H, W, 3) uint8 with |map| blended
    in (inferno colours; the map scaled to its own maximum, upsampled to the frames, each frame with its slice)."""
    from matplotlib import colormaps

    num_frames, height, width = frames.shape
    magnitude = np.abs(saliency)
    magnitude = magnitude / magnitude.max() if magnitude.max() > 0 else magnitude
    per_frame = torch.from_numpy(magnitude)[:, None]  # (T', 1, h, w)
    per_frame = torch.nn.functional.interpolate(per_frame, size=(height, width), mode="bilinear", align_corners=False)
    per_frame = repeat(per_frame[:, 0], "s h w -> (s k) h w", k=math.ceil(num_frames / len(magnitude)))[:num_frames]
    weight = alpha * per_frame.clamp(0, 1).numpy()[..., None]  # (T, H, W, 1)
    colours = colormaps["inferno"](per_frame.numpy())[..., :3]  # (T, H, W, 3) in [0, 1]
    grey = frames[..., None].astype(np.float32) / 255.0
    return np.round(255 * ((1 - weight) * grey + weight * colours)).astype(np.uint8)


def write_overlay_video(path: str | os.PathLike, rgb: np.ndarray, fps: float) -> Path:
    """RGB frames (T, H, W, 3) uint8 -> an H.264 MP4 that browsers play (sides padded to even sizes)."""
    path = Path(path)
    pad = ((0, 0), (0, rgb.shape[1] % 2), (0, rgb.shape[2] % 2), (0, 0))
    rgb = np.pad(rgb, pad, mode="edge")
    with av.open(os.fspath(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.height, stream.width = rgb.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in rgb:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    return path


def saliency_strip(path: str | os.PathLike, rgb: np.ndarray, frame_numbers: Sequence[int], title: str) -> Path:
    """A PNG row of the overlay frames, one per time slice, each labelled with its frame number."""
    columns = len(rgb)
    figure = make_figure((1.6 * columns, 2.1))
    for i, (image, number) in enumerate(zip(rgb, frame_numbers, strict=True)):
        axis = figure.add_subplot(1, columns, i + 1)
        axis.imshow(image)
        axis.set_title(f"frame {number}", fontsize=8)
        axis.axis("off")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)


def save_saliency(
    output_dir: str | os.PathLike,
    name: str,
    result: OcclusionSaliency,
    frames: np.ndarray,
    frame_numbers: Sequence[int],
    fps: float,
) -> dict[str, Path]:
    """Write `<name>_saliency.npy`, `.mp4` and `.png` for a clip's grey frames (T, H, W) uint8 (as the model saw
    them, before normalisation) whose video frame numbers are `frame_numbers`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rgb = overlay_frames(frames, result.saliency)
    np.save(output_dir / f"{name}_saliency.npy", result.saliency)
    step = max(1, len(frames) // result.saliency.shape[0])
    picked = list(range(0, len(frames), step))
    title = (
        f"{name}: EF {result.ef:.1f} %, colour = |EF change| when a block of "
        f"{'x'.join(map(str, result.group_shape))} tubelets is left out (max "
        f"{np.abs(result.saliency).max():.2f} points)"
    )
    return {
        "npy": output_dir / f"{name}_saliency.npy",
        "mp4": write_overlay_video(output_dir / f"{name}_saliency.mp4", rgb, fps),
        "png": saliency_strip(
            output_dir / f"{name}_saliency.png", rgb[picked], [frame_numbers[i] for i in picked], title
        ),
    }


__all__ = [
    "DEFAULT_MAX_GROUPS",
    "OcclusionSaliency",
    "VideoSaliency",
    "decoded_saliency",
    "default_group_shape",
    "occlusion_groups",
    "occlusion_saliency",
    "overlay_frames",
    "save_saliency",
    "video_saliency",
    "write_overlay_video",
]
