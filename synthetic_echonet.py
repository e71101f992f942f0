"""A procedural echocardiography phantom written in EchoNet-Dynamic's exact on-disk layout.

EchoAI is developed and tested without access to EchoNet-Dynamic (it needs a data-use agreement),
so every script falls back to this synthetic corpus when no ``--data_dir`` is given. The corpus is
meant to be *learnable*: ejection fraction is a deterministic function of what is drawn, so a model
that reads the pixels can regress it, and a pipeline bug (wrong frames, wrong labels, wrong order)
shows up as a model that cannot.

Layout (identical to the released dataset, see ``data_echoai.load_echonet_dynamic``)::

    <output_dir>/
        FileList.csv        FileName,EF,ESV,EDV,FrameHeight,FrameWidth,FPS,NumberOfFrames,Split
        VolumeTracings.csv  FileName,X1,Y1,X2,Y2,Frame   (FileName with ".avi")
        Videos/<FileName>.avi   112x112, 3-channel grayscale MJPEG, one key frame per frame

The phantom, per video (all sizes in pixels of the 112x112 frame):

* an apical-4-chamber arrangement: the left ventricle (LV) on the image's right, its apex under the
  transducer, a dark blood pool inside a bright myocardial wall that thickens in systole; the right
  ventricle (RV) on the left, separated by the septum; both atria below the valve plane, filling
  while the ventricles empty;
* the LV cavity is a truncated ellipse ("bullet"): long axis ``L`` from the apex to the mitral
  annulus, half-width ``b``. Over the cardiac cycle (random phase) both shrink towards end-systole;
  the long axis shortens less than the short axis, as in real hearts;
* multiplicative speckle with a Rayleigh-distributed magnitude (mean 1, grain ~2 px) that no frame
  shares with a distant one, so a model cannot tell videos apart by a fixed speckle fingerprint and
  has to read the heart. Its complex Gaussian field evolves as an AR(1) process over frames (lag-1
  correlation 0.7-0.9 per video: neighbouring frames alike, frames ~20 apart independent), and it
  is sampled in tissue coordinates, so the pattern moves with the heart: the LV cavity scales about
  the apex with ``L`` and ``b``, and the tissue around it follows the cavity boundary, fading with
  the distance from it;
* an ultrasound sector (fan) with its apex at the top centre and acquisition that differs between
  and within videos: depth attenuation with a per-video slope (0.3-0.6 of the signal lost at the
  far edge), an overall gain (0.8-1.1) that drifts slowly by 2-5 % (a sinusoid of 3-10 s period),
  and electronic noise. On average the contrast between cavity and tissue is that of version 1,
  whose slope (0.45) and gain were fixed per video.

Frame rates and heart rates spread as in EchoNet-Dynamic: 50 fps for 80 % of the videos, otherwise
uniform in 24-60 fps; heart rate from a normal distribution (mean 75, sd 15 bpm) clipped to 45-140.

Labels come from the phantom's own geometry, the way a sonographer measures them: at the
end-diastolic (ED, largest LV) and end-systolic (ES, smallest LV) frames of the first cardiac cycle
the cavity is traced as a long axis plus ``NUM_CHORDS`` (20) perpendicular chords, exactly the rows
written to ``VolumeTracings.csv``, and the volume follows from the method of discs (Simpson's rule),
``V = sum(pi / 4 * d_i**2 * L / NUM_CHORDS)``, converted to mL with a per-video pixel spacing
(1.2-1.6 mm). ``EF = 100 * (EDV - ESV) / EDV``. The target EF is drawn from a normal distribution
with mean 55 and standard deviation 12 clipped to [10, 85], roughly EchoNet-Dynamic's distribution;
the written EF is the one measured on the traced frames, which sample the cycle at the video's frame
rate and so land close to, not exactly on, the target. EDV targets are log-normal around 95 mL.

Videos are 60-200 frames long, always at least 1.1 cardiac cycles so both traced frames lie inside
the video; splits are TRAIN/VAL/TEST in proportions 75/12.5/12.5. As in EchoNet-Dynamic's CSV, a
video's ES tracing block comes first in ``VolumeTracings.csv`` and its ED block last. Frames are
encoded from grey, so the decoded chroma is neutral (R = G = B).

Everything is drawn from ``numpy.random.SeedSequence(seed)``, one child sequence per video, so the
same seed gives byte-identical CSVs and identical decoded frames, whatever the number of worker
processes, on CPUs with the same vector instructions. Across CPUs the labels and tracings stay
byte-identical but a few pixels do not: numpy chooses the kernels of its math functions (``cos``,
``tanh``, ``exp`` ...) by the CPU, and its AVX-512 kernels round some results in the last bit apart
from the others, which moves a few pixels in 100,000 by 1-3 grey levels and changes the encoded
files. To render on an AVX-512 CPU the videos an AVX2-only CPU renders, run the script with
``NPY_DISABLE_CPU_FEATURES="X86_V4 AVX512_ICL"`` (numpy then skips its AVX-512 kernels).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from tqdm.auto import tqdm


# Part of the cache folder's name (data_echoai.synthetic_echonet_dir): raise it whenever the same seed
# renders different videos or labels, so a corpus made by an older phantom is not reused.
PHANTOM_VERSION = 2
FRAME_SIZE = 112
NUM_CHORDS = 20
FILE_LIST_COLUMNS = ["FileName", "EF", "ESV", "EDV", "FrameHeight", "FrameWidth", "FPS", "NumberOfFrames", "Split"]
TRACING_COLUMNS = ["FileName", "X1", "Y1", "X2", "Y2", "Frame"]
SPLIT_FRACTIONS = {"TRAIN": 0.75, "VAL": 0.125, "TEST": 0.125}

# Fraction of the cardiac cycle spent in systole (ED -> ES); the rest is diastole.
_SYSTOLE_FRACTION = 0.35
# Intensities in [0, 1] before speckle: blood is nearly anechoic, myocardium bright.
_TISSUE, _BLOOD, _MYOCARDIUM = 0.32, 0.03, 0.85


@dataclass(frozen=True)
class PhantomVideo:
    """One rendered phantom: frames and the measurements written to the two CSV files."""

    frames: np.ndarray  # (T, H, W) uint8
    fps: int
    ef: float
    esv: float
    edv: float
    ed_frame: int
    es_frame: int
    tracings: dict[int, np.ndarray]  # frame index -> (1 + NUM_CHORDS, 4) rows of X1, Y1, X2, Y2
    heart_rate: float  # bpm; not written to the CSVs (EchoNet has no such column), for beat-detection tests


def _smooth(noise: np.ndarray) -> np.ndarray:
    """3x3 box blur over the last two axes (speckle grain of ~2 px, like EchoNet's downsampled scans)."""
    padded = np.pad(noise, [(0, 0)] * (noise.ndim - 2) + [(1, 1), (1, 1)], mode="wrap")
    rows = padded[..., :-2, :] + padded[..., 1:-1, :] + padded[..., 2:, :]
    return (rows[..., :, :-2] + rows[..., :, 1:-1] + rows[..., :, 2:]) / 9.0


def _tissue_coordinates(
    xx: np.ndarray, yy: np.ndarray, apex: np.ndarray, direction: np.ndarray, length: np.ndarray, half_width: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where the tissue seen at a pixel lay in the largest (end-diastolic) heart, for the pixels that move.

    Speckle is the interference pattern of the tissue's scatterers, so it travels with the tissue; sampling
    one field at these coordinates makes it do so. Inside the LV the cavity scales about the apex by
    ``length`` along its axis and ``half_width`` across (the bullet's own change of shape, so the
    endocardium always samples the same scatterers). Outside, a pixel moves with the cavity boundary point
    on its ray from the ellipse centre, fading with its distance from the largest cavity over a reach of
    five times the largest boundary displacement (at least 12 px): smooth, stretching the pattern by at most
    ~1.5x, never folding it over, and zero beyond the reach, so only the pixels near the LV need resampling.

    Returns the flat indices (M,) of the pixels within reach and their tissue x, y, each (T, M).
    """
    dx, dy = (xx - apex[0]).ravel(), (yy - apex[1]).ravel()
    along = dx * direction[0] + dy * direction[1]  # (H * W,)
    across = -dx * direction[1] + dy * direction[0]
    largest_length, largest_half_width = length.max(), half_width.max()
    largest_a = largest_length / 1.6  # as in _bullet_distance
    q = np.sqrt(((along - largest_a) / largest_a) ** 2 + (across / largest_half_width) ** 2)
    outside = np.maximum(np.maximum((q - 1.0) * largest_half_width, along - largest_length), 0.0)
    extents = (length.reshape(-1, 1), half_width.reshape(-1, 1))  # (T, 1)
    reaches = [max(12.0, 5.0 * float(extent.max() - extent.min())) for extent in extents]
    moving = np.flatnonzero(outside < max(reaches))
    along, across, outside = along[moving], across[moving], outside[moving]  # (M,)

    length, half_width = extents
    a = length / 1.6
    q = np.sqrt(((along - a) / a) ** 2 + (across / half_width) ** 2)  # (T, M), 1 on the boundary
    to_boundary = 1.0 / np.maximum(q, 1.0)
    boundary_along = np.minimum(a + (along - a) * to_boundary, length)  # the valve plane caps the cavity
    boundary_across = across * to_boundary
    shift_along, shift_across = (
        np.square(np.clip(1.0 - np.square(outside / reach), 0.0, None)) * boundary * (extent.max() / extent - 1.0)
        for boundary, extent, reach in zip((boundary_along, boundary_across), extents, reaches, strict=True)
    )
    x = xx.ravel()[moving] + shift_along * direction[0] - shift_across * direction[1]
    y = yy.ravel()[moving] + shift_along * direction[1] + shift_across * direction[0]
    return moving, x, y


def _speckle(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    moving: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    lag_one_correlation: float,
) -> np.ndarray:
    """Rayleigh speckle with mean 1, of ``shape`` (T, H, W), that moves with the tissue: nothing in it is fixed.

    The underlying complex Gaussian field (grain ~2 px from ``_smooth``) evolves as an AR(1) process over
    frames, as scatterers move in and out of the imaging plane: frames k apart correlate as
    ``lag_one_correlation**k``, so neighbouring frames look alike, frames a second apart share nothing,
    and a model cannot recognise a video by a speckle fingerprint. The flat pixels ``moving`` read the field
    bilinearly at their tissue coordinates ``x``, ``y`` (T, M), so there the pattern follows the heart.
    """
    num_frames, height, width = shape
    # The field covers the frame and whatever tissue the warp brings into it from beyond its edges (in
    # systole the valve plane pulls tissue up from below the frame), so no scatterer is seen twice.
    left, top = min(0, math.floor(x.min(initial=0.0))), min(0, math.floor(y.min(initial=0.0)))
    right = max(width, math.floor(x.max(initial=0.0)) + 2)
    bottom = max(height, math.floor(y.max(initial=0.0)) + 2)
    field_height, field_width = bottom - top, right - left
    field = _smooth(rng.standard_normal((2, num_frames, field_height, field_width), dtype=np.float32))
    innovation = math.sqrt(1.0 - lag_one_correlation**2)  # keeps the variance stationary
    for t in range(1, num_frames):
        field[:, t] *= innovation
        field[:, t] += lag_one_correlation * field[:, t - 1]
    in_frame = field[:, :, -top : height - top, -left : width - left]
    magnitude = np.hypot(in_frame[0], in_frame[1]).reshape(num_frames, -1)

    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = x - x0, y - y0
    frame_start = np.arange(num_frames, dtype=np.int32).reshape(-1, 1) * (field_height * field_width)
    x0 = x0.astype(np.int32) - left
    row = frame_start + (y0.astype(np.int32) - top) * field_width
    # Interpolating between pixels averages the field and lowers its variance, which would print the
    # warp onto the brightness; the 3x3 box makes neighbours correlate 2/3, so the loss is known exactly
    # and the weights are scaled to undo it.
    gx, gy = 1.0 - fx, 1.0 - fy
    scale = 1.0 / np.sqrt((1.0 - (2.0 / 3.0) * fx * gx) * (1.0 - (2.0 / 3.0) * fy * gy))
    gy *= scale
    fy *= scale
    weights = ((row + x0, gx * gy), (row + x0 + 1, fx * gy), (row + field_width + x0, gx * fy),
               (row + field_width + x0 + 1, fx * fy))  # fmt: skip
    power = np.zeros_like(x)
    for part in field.reshape(2, -1):
        sample = sum(part[corner] * weight for corner, weight in weights)
        power += sample * sample
    magnitude[:, moving] = np.sqrt(power)
    magnitude = magnitude.reshape(shape)
    return magnitude / magnitude.mean()


def _contraction(phase: np.ndarray) -> np.ndarray:
    """Cardiac contraction in [0, 1] for a cycle phase in [0, 1): 0 at end-diastole, 1 at end-systole."""
    systole = 0.5 - 0.5 * np.cos(np.pi * phase / _SYSTOLE_FRACTION)
    diastole = 0.5 + 0.5 * np.cos(np.pi * (phase - _SYSTOLE_FRACTION) / (1.0 - _SYSTOLE_FRACTION))
    return np.where(phase < _SYSTOLE_FRACTION, systole, diastole)


def _bullet_distance(
    xx: np.ndarray, yy: np.ndarray, apex: np.ndarray, direction: np.ndarray, length: np.ndarray, half_width: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Signed distance (px, negative inside) to a truncated ellipse, and the position along its axis.

    The ellipse has its apex at ``apex``, semi-axes ``a = length / 1.6`` along ``direction`` and
    ``half_width`` across, truncated at ``length`` from the apex (the valve plane), so the base is
    ``0.8 * half_width`` wide. ``length`` and ``half_width`` are (T, 1, 1), the grids (H, W).
    """
    a = length / 1.6
    dx, dy = xx - apex[0], yy - apex[1]
    along = dx * direction[0] + dy * direction[1]  # (H, W)
    across = -dx * direction[1] + dy * direction[0]
    q = np.sqrt(((along - a) / a) ** 2 + (across / half_width) ** 2)  # (T, H, W), 1 on the boundary
    return (q - 1.0) * half_width, along


def _chord_tracing(
    apex: np.ndarray, direction: np.ndarray, length: float, half_width: float
) -> tuple[np.ndarray, float]:
    """Long axis plus NUM_CHORDS perpendicular chords of the LV cavity, and its method-of-discs volume (px^3)."""
    a = length / 1.6
    perp = np.array([-direction[1], direction[0]])
    base = apex + length * direction
    rows = [np.concatenate([apex, base])]
    positions = (np.arange(NUM_CHORDS) + 0.5) / NUM_CHORDS * length
    halves = half_width * np.sqrt(np.clip(1.0 - ((positions - a) / a) ** 2, 0.0, None))
    for s, h in zip(positions, halves, strict=True):
        centre = apex + s * direction
        rows.append(np.concatenate([centre - h * perp, centre + h * perp]))
    volume = float(np.sum(np.pi * halves**2 * length / NUM_CHORDS))  # discs of diameter 2h
    return np.stack(rows), volume


def render_phantom(seed_sequence: np.random.SeedSequence) -> PhantomVideo:
    """Render one phantom echo video and measure it. Deterministic in ``seed_sequence``."""
    rng = np.random.default_rng(seed_sequence)
    # EchoNet-Dynamic's videos are mostly 50 fps, the rest spread over roughly 24-60; its heart rates run
    # from ~45 to ~140 bpm, most of them 60-100.
    fps = 50 if rng.random() < 0.8 else int(rng.integers(24, 61))
    heart_rate = float(np.clip(rng.normal(75.0, 15.0), 45.0, 140.0))  # bpm
    frames_per_cycle = fps * 60.0 / heart_rate
    num_frames = max(int(rng.integers(60, 201)), math.ceil(1.1 * frames_per_cycle) + 2)
    target_ef = float(np.clip(rng.normal(55.0, 12.0), 10.0, 85.0))
    target_edv = float(np.exp(rng.normal(np.log(95.0), 0.3)))  # mL
    spacing = float(rng.uniform(1.2, 1.6))  # mm per pixel

    # LV geometry at end-diastole; the ES shape follows from the target EF. The long axis takes
    # ratio**0.2 of the volume change and the two short axes the rest (V ~ L * b**2).
    ratio = 1.0 - target_ef / 100.0
    length_ed = float(rng.uniform(56.0, 66.0))
    unit_volume = _chord_tracing(np.zeros(2), direction=np.array([0.0, 1.0]), length=1.0, half_width=1.0)[1]
    half_width_ed = math.sqrt(target_edv * 1000.0 / spacing**3 / (unit_volume * length_ed))
    half_width_ed = float(np.clip(half_width_ed, 12.0, 21.0))
    length_ratio = ratio**0.2
    width_ratio = math.sqrt(ratio / length_ratio)
    tilt = float(rng.uniform(-0.12, 0.12))  # radians from vertical
    direction = np.array([math.sin(tilt), math.cos(tilt)])
    lv_apex = np.array([60.0 + rng.uniform(-3, 3), 16.0 + rng.uniform(-3, 3)])
    wall_ed = float(rng.uniform(3.5, 5.5))

    t = np.arange(num_frames) / fps
    phase = (t * heart_rate / 60.0 + rng.uniform(0.0, 1.0)) % 1.0
    c = _contraction(phase)  # (T,)
    length = length_ed * (1.0 - (1.0 - length_ratio) * c)
    half_width = half_width_ed * (1.0 - (1.0 - width_ratio) * c)
    wall = wall_ed * (1.0 + 0.5 * c)  # the myocardium thickens as it contracts

    # Traced frames: ED is the largest LV in the first cycle, ES the smallest in the cycle after it.
    volume_px = length * half_width**2
    window = math.ceil(frames_per_cycle)
    ed_frame = int(np.argmax(volume_px[:window]))
    es_frame = ed_frame + int(np.argmin(volume_px[ed_frame : ed_frame + window]))
    tracings, volumes = {}, {}
    for frame in (es_frame, ed_frame):  # the order they are written in, see make_synthetic_echonet
        tracings[frame], volumes[frame] = _chord_tracing(lv_apex, direction, length[frame], half_width[frame])
    edv = volumes[ed_frame] * spacing**3 / 1000.0
    esv = volumes[es_frame] * spacing**3 / 1000.0
    ef = 100.0 * (edv - esv) / edv

    frames = _draw_frames(rng, lv_apex, direction, length, half_width, wall, c, fps)
    return PhantomVideo(
        frames=frames, fps=fps, ef=ef, esv=esv, edv=edv, ed_frame=ed_frame, es_frame=es_frame, tracings=tracings,
        heart_rate=heart_rate,
    )  # fmt: skip


def _column(values) -> np.ndarray:
    """(T,) per-frame values as a float32 (T, 1, 1) column that broadcasts over a frame's pixels."""
    return np.asarray(values, dtype=np.float32).reshape(-1, 1, 1)


@dataclass(frozen=True)
class _LeftVentricle:
    """The LV's pose and per-frame shape in float32, as the rasteriser reads them."""

    apex: np.ndarray  # (2,) x, y in px
    direction: np.ndarray  # (2,) unit vector from the apex along the long axis
    length: np.ndarray  # (T, 1, 1) apex to valve plane, px
    half_width: np.ndarray  # (T, 1, 1)
    wall: np.ndarray  # (T, 1, 1) myocardial thickness, px
    contraction: np.ndarray  # (T, 1, 1) 0 at end-diastole, 1 at end-systole


def _draw_frames(
    rng: np.random.Generator,
    lv_apex: np.ndarray,
    direction: np.ndarray,
    length: np.ndarray,
    half_width: np.ndarray,
    wall: np.ndarray,
    contraction: np.ndarray,
    fps: int,
) -> np.ndarray:
    """Rasterise the four chambers, speckle and the sector for every frame at once: (T, H, W) uint8."""
    yy, xx = np.mgrid[0:FRAME_SIZE, 0:FRAME_SIZE].astype(np.float32)
    lv = _LeftVentricle(
        lv_apex.astype(np.float32),
        direction.astype(np.float32),
        *map(_column, (length, half_width, wall, contraction)),
    )
    image = _draw_chambers(xx, yy, lv)
    # Speckle moving with the tissue, then what the scanner adds on top.
    moving, tissue_x, tissue_y = _tissue_coordinates(xx, yy, lv.apex, lv.direction, lv.length, lv.half_width)
    lag_one_correlation = float(rng.uniform(0.7, 0.9))
    image *= _speckle(rng, image.shape, moving, tissue_x, tissue_y, lag_one_correlation)
    return _acquire(rng, image, xx, yy, fps)


def _draw_chambers(xx: np.ndarray, yy: np.ndarray, lv: _LeftVentricle) -> np.ndarray:
    """The four chambers' walls and blood pools before speckle: (T, H, W) float32 intensities in [0, 1]."""
    lv_apex, direction, length, half_width, wall = lv.apex, lv.direction, lv.length, lv.half_width, lv.wall
    contraction = lv.contraction
    perp = np.array([-direction[1], direction[0]], dtype=np.float32)
    edge = 0.8  # px, softness of tissue boundaries

    def paint(image: np.ndarray, signed_distance: np.ndarray, value: float) -> np.ndarray:
        inside = 0.5 - 0.5 * np.tanh(signed_distance * (0.5 / edge))  # logistic sigmoid
        return image + (value - image) * inside

    image = np.full((len(length), FRAME_SIZE, FRAME_SIZE), _TISSUE, dtype=np.float32)

    # RV: smaller, to the image's left of the septum, contracting with the LV (fixed RV EF ~ 45 %).
    rv_width = half_width[0, 0, 0] * 0.75 * (1.0 - 0.2 * contraction)
    rv_apex = lv_apex + perp * (half_width.max() + wall.max() + 0.8 * rv_width.max()) + direction * 8.0
    rv_length = length * 0.8
    rv_dist, rv_along = _bullet_distance(xx, yy, rv_apex, direction, rv_length, rv_width)
    rv_open = rv_along - rv_length  # > 0 past the tricuspid plane

    # Atria below the valve plane; they fill while the ventricles empty.
    atrium_scale = 1.0 + 0.25 * contraction
    atria = []
    for apex, ventricle_length, width in (
        (lv_apex, length, half_width[0, 0, 0]),
        (rv_apex, rv_length, rv_width[0, 0, 0]),
    ):
        base = apex + direction * ventricle_length.mean()
        atria.append(_bullet_distance(xx, yy, base - direction * 2.0, direction, 30.0 * atrium_scale, 0.85 * width))

    lv_dist, lv_along = _bullet_distance(xx, yy, lv_apex, direction, length, half_width)
    lv_open = lv_along - length

    # Walls first (bright), then cavities (dark) on top, so the septum is the LV/RV walls between.
    for distance, _ in atria:
        image = paint(image, distance - 2.5, _MYOCARDIUM * 0.7)
    image = paint(image, np.maximum(rv_dist - 0.6 * wall, rv_open), _MYOCARDIUM * 0.9)
    image = paint(image, np.maximum(lv_dist - wall, lv_open), _MYOCARDIUM)
    for distance, _ in atria:
        image = paint(image, distance, _BLOOD)
    image = paint(image, np.maximum(rv_dist, rv_open - 1.0), _BLOOD)
    return paint(image, np.maximum(lv_dist, lv_open - 1.0), _BLOOD)


def _acquire(rng: np.random.Generator, image: np.ndarray, xx: np.ndarray, yy: np.ndarray, fps: int) -> np.ndarray:
    """What the scanner does to the speckled ``image`` (T, H, W): depth attenuation, sector, gain, noise; uint8."""
    num_frames = len(image)
    sector_apex_y = -4.0
    radius = np.hypot(xx - FRAME_SIZE / 2, yy - sector_apex_y)
    angle = np.arctan2(xx - FRAME_SIZE / 2, yy - sector_apex_y)
    max_radius, half_angle = FRAME_SIZE + 2.0, float(rng.uniform(0.68, 0.78))
    sector = np.clip((max_radius - radius) / 1.5, 0, 1) * np.clip((half_angle - np.abs(angle)) * 40.0, 0, 1)
    # The gain drifts slowly (a few %, over seconds) and the attenuation slope differs between videos
    # (depth, patient habitus); both average to the fixed values of earlier phantoms, so the mean contrast
    # between cavity and tissue is unchanged.
    seconds = np.arange(num_frames, dtype=np.float32) / fps
    amplitude, period, phase_shift = rng.uniform(0.02, 0.05), rng.uniform(3.0, 10.0), rng.uniform(0.0, 2 * np.pi)
    drift = 1.0 + amplitude * np.sin(2 * np.pi * seconds / period + phase_shift)  # (T,)
    gain = float(rng.uniform(0.8, 1.1)) * _column(drift)
    attenuation = float(rng.uniform(0.3, 0.6))
    image *= gain * (1.0 - attenuation * radius / max_radius) * sector
    image += np.abs(rng.normal(0.0, 0.01, size=image.shape)).astype(np.float32) * sector
    return np.clip(image * 255.0, 0, 255).astype(np.uint8)


def write_avi(path: str | os.PathLike, frames: np.ndarray, fps: int) -> None:
    """Write (T, H, W) uint8 grayscale frames as a 3-channel MJPEG AVI, like EchoNet-Dynamic's videos.

    Every MJPEG frame is a key frame. The bit rate is high enough that JPEG artefacts stay below
    one grey level on average, so the phantom survives encoding.
    """
    with av.open(str(path), mode="w", format="avi") as container:
        stream = container.add_stream("mjpeg", rate=Fraction(fps))
        stream.height, stream.width = frames.shape[1:]
        stream.pix_fmt = "yuvj420p"
        stream.bit_rate = 8_000_000
        stream.codec_context.thread_count = 1  # keep the bitstream independent of the machine
        for frame in frames:
            # Grey in, so the chroma planes come out neutral (128); RGB input rounds them to 127, which
            # decodes with red and blue up to 2 levels below green.
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="gray")))
        container.mux(stream.encode())


def _assign_splits(num_videos: int, rng: np.random.Generator) -> list[str]:
    """TRAIN/VAL/TEST in 75/12.5/12.5 proportions (at least one VAL and TEST video when n >= 3)."""
    num_val = max(round(num_videos * SPLIT_FRACTIONS["VAL"]), 1 if num_videos >= 3 else 0)
    num_test = max(round(num_videos * SPLIT_FRACTIONS["TEST"]), 1 if num_videos >= 3 else 0)
    splits = np.array(["TRAIN"] * (num_videos - num_val - num_test) + ["VAL"] * num_val + ["TEST"] * num_test)
    return list(splits[rng.permutation(num_videos)])


def _render_and_write(args: tuple[np.random.SeedSequence, str]) -> PhantomVideo:
    seed_sequence, path = args
    video = render_phantom(seed_sequence)
    write_avi(path, video.frames, video.fps)
    return video


def _map(function, items: list, num_workers: int) -> Iterator:
    if num_workers <= 1:
        yield from map(function, items)
        return
    with ProcessPoolExecutor(max_workers=num_workers) as pool:
        yield from pool.map(function, items, chunksize=4)


def make_synthetic_echonet(
    output_dir: str | os.PathLike, num_videos: int = 200, seed: int = 0, num_workers: int | None = None
) -> Path:
    """Write a synthetic corpus in EchoNet-Dynamic's layout to ``output_dir`` and return its path.

    Args:
        output_dir: Folder to create (may exist; existing files of the same names are overwritten).
        num_videos: Number of videos (``FileList.csv`` rows).
        seed: Seed of the whole corpus; the same seed gives the same files on CPUs with the same
            vector instructions (see the module docstring for other CPUs).
        num_workers: Processes rendering videos in parallel (default: all CPU cores, at most 8).
            The output does not depend on it.
    """
    if num_videos < 1:
        raise ValueError(f"num_videos must be at least 1, got {num_videos}")
    output_dir = Path(output_dir)
    (output_dir / "Videos").mkdir(parents=True, exist_ok=True)
    root = np.random.SeedSequence(seed)
    corpus_rng = np.random.default_rng(root.spawn(1)[0])
    names = [f"0X{value:016X}" for value in corpus_rng.choice(2**62, size=num_videos, replace=False)]
    splits = _assign_splits(num_videos, corpus_rng)
    jobs = [
        (child, str(output_dir / "Videos" / f"{name}.avi"))
        for child, name in zip(root.spawn(num_videos), names, strict=True)
    ]
    if num_workers is None:
        num_workers = min(os.cpu_count() or 1, 8)
    num_workers = min(num_workers, num_videos)

    file_rows, tracing_rows = [], []
    videos = _map(_render_and_write, jobs, num_workers)
    for name, split, video in tqdm(
        zip(names, splits, videos, strict=True), total=num_videos, desc="Synthetic echo videos"
    ):
        file_rows.append(
            [name, f"{video.ef:.6f}", f"{video.esv:.6f}", f"{video.edv:.6f}", FRAME_SIZE, FRAME_SIZE,
             video.fps, len(video.frames), split]
        )  # fmt: skip
        # ES block first, ED block last: EchoNet-Dynamic's own loader (echonet.datasets.Echo) takes a
        # video's last traced frame as the large (diastolic) one and its first as the small one.
        for frame in (video.es_frame, video.ed_frame):
            for x1, y1, x2, y2 in video.tracings[frame]:
                tracing_rows.append([f"{name}.avi", f"{x1:.4f}", f"{y1:.4f}", f"{x2:.4f}", f"{y2:.4f}", frame])

    for filename, header, rows in (
        ("FileList.csv", FILE_LIST_COLUMNS, file_rows),
        ("VolumeTracings.csv", TRACING_COLUMNS, tracing_rows),
    ):
        with open(output_dir / filename, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)
    return output_dir
