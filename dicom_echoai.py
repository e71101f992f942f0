"""DICOM echo cines as grey frames: the one DICOM reader of corpus preparation and inference.

`read_dicom` turns a multi-frame ultrasound DICOM (a path or the file's bytes) into grey uint8 frames cropped
to the ultrasound sector, with everything outside the sector zeroed, and its frame rate; `DicomReader` serves
those frames, padded to a square, behind `video_io_echoai.VideoReader`'s interface, so that
`video_io_echoai.open_video` (and through it the video processor, `predict_videos`, the EchoNet loader and the
pipelines) reads a DICOM as it reads an AVI. A DICOM and an AVI holding the same square frames give the same
`pixel_values`.

* Decoding: pydicom decodes uncompressed and RLE pixel data itself, JPEG baseline / extended through Pillow,
  JPEG-LS, lossless JPEG and JPEG 2000 through pylibjpeg with its libjpeg and openjpeg plugins (all four
  are the `dicom` extra: `pip install "echoai[dicom]"`).
* Only multi-frame ultrasound is used: Modality other than "US", single-frame images, files without pixel
  data and pixel data no installed handler decodes raise `video_io_echoai.VideoDecodingError`, whose
  `reason` is a fixed phrase (`corpus_echoai` counts skipped files by it): "not ultrasound (Modality CT)",
  "single-frame image", "DICOM without pixel data", "DICOM pixel data not decodable (<transfer syntax>)",
  "unreadable DICOM", "no moving ultrasound sector found".
* Grey: luma of RGB / YBR (ITU-R BT.601); palette colour through its LUT; MONOCHROME1 inverted; more than
  8 bits stored rescaled to 0-255.
* Frame rate: 1000 / FrameTime (ms), else CineRate, else RecommendedDisplayFrameRate, else the mean
  FrameTimeVector interval; None without any of them.
* The sector (`sector_mask`): burnt-in text (patient name, date, settings), the ECG trace, scale bars and
  logos lie outside it and are zeroed, as EchoNet-Dynamic's preprocessing did, since a model must not learn
  from annotations and burnt-in text can be PHI. Pixels whose grey level spans more than `MOTION_THRESHOLD`
  over up to 64 evenly spaced frames are "moving" (speckle moves, burnt-in text does not); the moving mask is
  closed on a coarse grid (<= 128 cells a side), its largest 4-connected component is kept (a separate moving
  ECG trace or clock is dropped), and the sector is the convex hull of the moving pixels in that component
  (fans are convex; the hull fills the dark, quiet blood pool). When SequenceOfUltrasoundRegions is present
  the search is limited to the union of its region boxes, and those boxes are used as the sector if too
  little moves. Limits: text drawn inside the fan's hull, or an ECG trace touching the sector, is kept.

No DICOM attribute value leaves this module except Modality (in a reason), the frame rate, the view code
meaning and the study / series UID (`DicomCine.group_uid`, for the corpus to hash); pydicom's warnings and log
lines, which quote the file's path and values, are silenced while reading.

pydicom and Pillow are imported only when a DICOM is read, so this file ships as Hub remote code beside
`video_io_echoai.py` without making them a requirement of users who never pass a DICOM.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


try:  # loaded as Hub remote code, beside the model's files
    from .video_io_echoai import DecodedFrames, VideoDecodingError, VideoInfo, VideoReader, VideoSource, check_source
except ImportError:  # installed as top-level modules
    from video_io_echoai import DecodedFrames, VideoDecodingError, VideoInfo, VideoReader, VideoSource, check_source


MOTION_THRESHOLD = 12  # grey levels a pixel must span over time to count as moving (speckle)
MIN_SECTOR_FRACTION = 0.02  # a sector smaller than this fraction of the frame is "not found"
INSTALL_HINT = (
    'pip install "echoai[dicom]" (or: pip install pydicom pillow pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg)'
)

# The kinds of `VideoDecodingError` a DICOM raises, the first words of its reason.
NO_DICOM_SUPPORT, UNREADABLE_DICOM, NOT_ULTRASOUND, NO_PIXEL_DATA, SINGLE_FRAME, NOT_DECODABLE, NO_SECTOR = (
    "DICOM support not installed",
    "unreadable DICOM",
    "not ultrasound",
    "DICOM without pixel data",
    "single-frame image",
    "DICOM pixel data not decodable",
    "no moving ultrasound sector found",
)
_NOT_A_CINE = "pass a multi-frame ultrasound cine (an echo loop); other DICOM files are not echo videos"
_FIXES = {  # the others take `VideoDecodingError`'s default fix (re-export or re-copy the file)
    NO_DICOM_SUPPORT: INSTALL_HINT,
    NOT_DECODABLE: f"install the decoders ({INSTALL_HINT}), or re-export the cine uncompressed",
    NO_SECTOR: "check that the file is an ultrasound cine whose image moves",
    NOT_ULTRASOUND: _NOT_A_CINE,
    NO_PIXEL_DATA: _NOT_A_CINE,
    SINGLE_FRAME: _NOT_A_CINE,
}


# --------------------------------------------------------------------------------------------------
# The sector: find it, crop to it, fit to a square
# --------------------------------------------------------------------------------------------------


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a small bool image, by label propagation (no scipy)."""
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:
        padded = np.pad(labels, 1)
        spread = np.maximum.reduce([labels, padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]])
        spread = np.where(mask, spread, 0)
        if np.array_equal(spread, labels):
            break
        labels = spread
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    return labels == ids[np.argmax(counts)] if len(ids) else mask


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Convex hull (Andrew's monotone chain) of (N, 2) integer points, counter-clockwise."""
    points = np.unique(points, axis=0)
    if len(points) < 3:
        return points

    def half(sequence: np.ndarray) -> list:
        chain: list = []
        for p in sequence.tolist():
            while len(chain) >= 2:
                (ax, ay), (bx, by) = chain[-2], chain[-1]
                if (bx - ax) * (p[1] - ay) - (by - ay) * (p[0] - ax) > 0:
                    break
                chain.pop()
            chain.append(p)
        return chain

    lower, upper = half(points), half(points[::-1])
    return np.array(lower[:-1] + upper[:-1])


def _fill_polygon(vertices: np.ndarray, height: int, width: int) -> np.ndarray:
    """An (H, W) bool image with the polygon (x, y) `vertices` filled, edges included (Pillow draws it)."""
    try:
        from PIL import Image, ImageDraw
    except ImportError as error:
        raise ImportError(f"the ultrasound sector is drawn with Pillow: {INSTALL_HINT}") from error
    image = Image.new("L", (width, height), 0)
    ImageDraw.Draw(image).polygon([tuple(p) for p in vertices.tolist()], fill=1, outline=1)
    return np.asarray(image, dtype=bool)


def sector_mask(
    frames: np.ndarray, regions: Sequence[tuple[int, int, int, int]] | None = None, threshold: int = MOTION_THRESHOLD
) -> np.ndarray | None:
    """The ultrasound sector of grey frames (T, H, W) as an (H, W) bool mask, or None if none is found.

    See the module docstring for the method. `regions` are (x0, y0, x1, y1) inclusive pixel boxes from
    SequenceOfUltrasoundRegions: the sector is searched inside their union only.
    """
    T, H, W = frames.shape
    allowed = np.zeros((H, W), dtype=bool) if regions else np.ones((H, W), dtype=bool)
    for x0, y0, x1, y1 in regions or ():
        allowed[max(y0, 0) : y1 + 1, max(x0, 0) : x1 + 1] = True
    sample = frames[np.unique(np.linspace(0, T - 1, min(T, 64)).round().astype(np.int64))]
    moving = (sample.max(axis=0).astype(np.int16) - sample.min(axis=0) > threshold) & allowed  # (H, W)
    if moving.sum() >= MIN_SECTOR_FRACTION * H * W:
        # Coarse grid: a cell is moving when a quarter of its pixels are; closing (dilate, erode) joins speckle.
        cell = max(1, math.ceil(max(H, W) / 128))
        grid = F.avg_pool2d(torch.from_numpy(moving)[None, None].float(), cell, ceil_mode=True) > 0.25
        grid = F.max_pool2d(grid.float(), 3, stride=1, padding=1)
        grid = -F.max_pool2d(-grid, 3, stride=1, padding=1)
        component = _largest_component(grid[0, 0].numpy() > 0)
        component = np.repeat(np.repeat(component, cell, axis=0), cell, axis=1)[:H, :W]
        ys, xs = np.nonzero(moving & component)
        if len(ys) >= MIN_SECTOR_FRACTION * H * W:
            # Hull of each row's extreme moving pixels: the same hull, far fewer points.
            order = np.lexsort((xs, ys))
            ys, xs = ys[order], xs[order]
            first = np.r_[True, ys[1:] != ys[:-1]]
            last = np.r_[ys[1:] != ys[:-1], True]
            points = np.concatenate([np.stack([xs[first], ys[first]], 1), np.stack([xs[last], ys[last]], 1)])
            return _fill_polygon(_convex_hull(points), H, W) & allowed
    return allowed if regions and allowed.any() else None


def crop_to_mask(frames: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Zero the pixels outside `mask` and crop (T, H, W) frames to the mask's bounding box."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    return np.where(mask[None], frames, 0)[:, y0:y1, x0:x1]


def fit_to_square(frames: np.ndarray, size: int, chunk: int = 64) -> np.ndarray:
    """Resize grey (T, H, W) uint8 frames to fit `size` keeping aspect (antialiased bilinear), zero-pad to square."""
    T, H, W = frames.shape
    if H == W == size:
        return frames
    scale = size / max(H, W)
    h, w = max(1, round(H * scale)), max(1, round(W * scale))
    out = np.zeros((T, size, size), dtype=np.uint8)
    top, left = (size - h) // 2, (size - w) // 2
    if (h, w) == (H, W):  # padding only (the resize would be the identity)
        out[:, top : top + h, left : left + w] = frames
        return out
    for start in range(0, T, chunk):  # chunks bound the float copy of long, large cines
        x = torch.from_numpy(np.ascontiguousarray(frames[start : start + chunk]))[:, None].float()
        x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True)
        out[start : start + chunk, top : top + h, left : left + w] = x[:, 0].round().clamp(0, 255).byte().numpy()
    return out


# --------------------------------------------------------------------------------------------------
# DICOM attributes
# --------------------------------------------------------------------------------------------------


def dicom_frame_rate(ds) -> float | None:
    """Frames per second from the DICOM timing tags, or None when none is usable (see the module docstring)."""
    for keyword, to_fps in (
        ("FrameTime", lambda v: 1000.0 / v),
        ("CineRate", lambda v: v),
        ("RecommendedDisplayFrameRate", lambda v: v),
    ):
        try:
            value = float(ds.get(keyword) or 0)
        except (TypeError, ValueError):
            continue
        if value > 0 and math.isfinite(to_fps(value)):
            return to_fps(value)
    vector = ds.get("FrameTimeVector")
    if vector is not None:
        try:
            intervals = [float(v) for v in list(vector)[1:] if float(v) > 0]  # the first entry is 0
        except (TypeError, ValueError):
            intervals = []
        if intervals:
            return 1000.0 / float(np.mean(intervals))
    return None


def _dicom_grey(ds, pixels: np.ndarray) -> np.ndarray:
    """Decoded DICOM pixels (palette colour already through its LUT) -> grey uint8 (T, H, W)."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    bits = 8 if photometric == "PALETTE COLOR" and pixels.dtype == np.uint8 else int(ds.get("BitsStored", 8) or 8)
    if photometric == "PALETTE COLOR" and pixels.dtype != np.uint8:
        bits = 16  # LUT output spans 16 bits
    if pixels.ndim == 3 and pixels.dtype == np.uint8 and bits == 8:  # already grey uint8: no float round trip
        return 255 - pixels if photometric == "MONOCHROME1" else pixels
    if pixels.ndim == 4:  # (T, H, W, 3): RGB (pydicom converts YBR to RGB): ITU-R BT.601 luma
        pixels = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    pixels = pixels.astype(np.float32)
    if bits != 8:
        pixels = pixels * (255.0 / (2**bits - 1))
    grey = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
    return 255 - grey if photometric == "MONOCHROME1" else grey


def _ultrasound_regions(ds) -> list[tuple[int, int, int, int]]:
    regions = []
    for item in ds.get("SequenceOfUltrasoundRegions", None) or []:
        try:
            box = tuple(int(item.get(k)) for k in ("RegionLocationMinX0", "RegionLocationMinY0",
                                                    "RegionLocationMaxX1", "RegionLocationMaxY1"))  # fmt: skip
        except (TypeError, ValueError):
            continue
        if int(item.get("RegionSpatialFormat", 1) or 0) == 1:  # 1 = 2D tissue/flow image; skip M-mode, Doppler
            regions.append(box)
    return regions


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """pydicom's warnings and log lines off: they quote the file's path and attribute values (PHI)."""
    logger_ = logging.getLogger("pydicom")
    level = logger_.level
    logger_.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger_.setLevel(level)


def _error(name: str, reason: str, kind: str) -> VideoDecodingError:
    return VideoDecodingError(name, reason, fix=_FIXES.get(kind), kind=kind)


def _read_pixels(source: VideoSource, name: str):
    """The parsed dataset and its decoded pixel array, once the file is a multi-frame ultrasound DICOM."""
    check_source(source, name)
    try:
        import pydicom
        from PIL import Image  # noqa: F401 -- checked here: the sector is drawn with Pillow
        from pydicom.pixels import apply_color_lut
    except ImportError as error:
        raise _error(name, f"{NO_DICOM_SUPPORT} ({error.name} missing)", NO_DICOM_SUPPORT) from error
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as error:
        raise VideoDecodingError(name, f"cannot read ({type(error).__name__})") from error
    try:
        with _quiet_pydicom():  # read from memory: a parser error may quote the path
            ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as error:  # noqa: BLE001 -- any parser failure means "unreadable"; its text may quote PHI
        raise _error(name, UNREADABLE_DICOM, UNREADABLE_DICOM) from error
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if not modality and "PixelData" not in ds:
        raise _error(name, UNREADABLE_DICOM, UNREADABLE_DICOM)
    if modality != "US":
        raise _error(name, f"{NOT_ULTRASOUND} (Modality {modality[:16] or 'missing'})", NOT_ULTRASOUND)
    if "PixelData" not in ds:
        raise _error(name, NO_PIXEL_DATA, NO_PIXEL_DATA)
    try:
        num_frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        num_frames = 1
    if num_frames < 2:
        raise _error(name, SINGLE_FRAME, SINGLE_FRAME)
    try:
        with _quiet_pydicom():
            pixels = ds.pixel_array
            if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "PALETTE COLOR":
                pixels = apply_color_lut(pixels, ds)
    except Exception as error:  # noqa: BLE001 -- missing handler or corrupt data; both are "cannot decode"
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        reason = f"{NOT_DECODABLE} ({getattr(syntax, 'name', 'unknown transfer syntax')})"
        raise _error(name, reason, NOT_DECODABLE) from error
    return ds, pixels


@dataclass(frozen=True)
class DicomCine:
    """A DICOM cine read by `read_dicom`."""

    frames: np.ndarray  # (T, h, w) uint8 grey, cropped to the sector's bounding box, zero outside the sector
    frame_rate: float | None  # from the timing tags; None when the file states none
    view: str | None  # ViewCodeSequence's first CodeMeaning
    group_uid: str | None  # StudyInstanceUID, else SeriesInstanceUID: identifying, hash it before writing it


def read_dicom(source: VideoSource, name: str | None = None) -> DicomCine:
    """Read a multi-frame ultrasound DICOM (a path or the file's bytes): see the module docstring.

    `name` names the file in errors (default: its path, or "DICOM bytes").

    Raises:
        VideoDecodingError: missing, empty or unreadable file, not ultrasound, no pixel data, a single frame,
            pixel data no installed handler decodes, no moving sector, or pydicom / Pillow not installed.
    """
    name = name or ("DICOM bytes" if isinstance(source, bytes) else os.fspath(source))
    ds, pixels = _read_pixels(source, name)
    frames = _dicom_grey(ds, pixels)
    if frames.ndim != 3 or len(frames) < 2:
        raise _error(name, SINGLE_FRAME, SINGLE_FRAME)
    mask = sector_mask(frames, _ultrasound_regions(ds))
    if mask is None:
        raise _error(name, NO_SECTOR, NO_SECTOR)
    codes = ds.get("ViewCodeSequence", None)
    view = (str(codes[0].get("CodeMeaning", "") or "") or None) if codes else None
    uid = ds.get("StudyInstanceUID") or ds.get("SeriesInstanceUID")
    return DicomCine(crop_to_mask(frames, mask), dicom_frame_rate(ds), view, str(uid) if uid else None)


class DicomReader(VideoReader):
    """A `video_io_echoai.VideoReader` over a DICOM cine: its sector frames (`read_dicom`), zero-padded to a square,
    decoded once when it is opened (pydicom decodes pixel data whole). `video_io_echoai.open_video` returns one for
    a DICOM; every public method is its own, none touches PyAV."""

    def __init__(self, source: VideoSource, name: str | None = None):  # no container to open: not VideoReader's
        self.name = name or ("DICOM bytes" if isinstance(source, bytes) else os.fspath(source))
        cine = read_dicom(source, self.name)
        self.frames = fit_to_square(cine.frames, max(cine.frames.shape[1:]))  # (T, S, S)
        self.rate, self.num_frames = cine.frame_rate, len(self.frames)

    @property
    def info(self) -> VideoInfo:
        T, S, _ = self.frames.shape
        return VideoInfo(num_frames=T, fps=float(self.rate or 0.0), height=S, width=S)

    def close(self) -> None:
        pass  # nothing held open: the frames were decoded when it opened

    def __enter__(self) -> DicomReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def read(self, frame_indices: Sequence[int] | np.ndarray) -> DecodedFrames:
        """The frames at `frame_indices` (any order, repeats allowed), grey uint8 (N, S, S)."""
        indices = np.asarray(frame_indices, dtype=np.int64).reshape(-1)
        if indices.size == 0 or indices.min() < 0:
            raise ValueError(f"frame_indices must be non-empty and non-negative, got {indices.tolist()}")
        if indices.max() >= self.num_frames:
            raise IndexError(f"{self.name}: frame {indices.max()} requested from a video of {self.num_frames} frames")
        return DecodedFrames(self.frames[indices], self.num_frames, self.num_frames)

    def read_all(self) -> np.ndarray:
        """Every frame, grey (T, S, S) uint8."""
        return self.frames


__all__ = [
    "DicomCine",
    "DicomReader",
    "crop_to_mask",
    "dicom_frame_rate",
    "fit_to_square",
    "read_dicom",
    "sector_mask",
]
