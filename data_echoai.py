"""Datasets for EchoAI: EchoNet-Dynamic as released, folders of unlabeled videos, the synthetic corpus.

EchoNet-Dynamic (Ouyang et al., Nature 2020; 10,030 apical-4-chamber videos, 7,465 / 1,288 / 1,277
train / val / test) is a folder::

    FileList.csv        FileName (hex id, no extension), EF (%), ESV, EDV (mL), FrameHeight,
                        FrameWidth (112), FPS, NumberOfFrames, Split (TRAIN / VAL / TEST)
    VolumeTracings.csv  FileName (*with* ".avi"), X1, Y1, X2, Y2, Frame: two traced frames per
                        video; per frame the first row is the long axis, the others short-axis chords
    Videos/<FileName>.avi   (or a multi-frame ultrasound DICOM: <FileName>.dcm, or <FileName> itself)

`load_echonet_dynamic` reads it into a `datasets.DatasetDict` with splits `train`, `validation` and
`test`, one row per video:

    FileName (str), video_path (str), EF, ESV, EDV (float32; NaN when absent), FrameHeight,
    FrameWidth, NumberOfFrames (int32), FPS (float32), Split (str, upper case),
    EDFrame, ESFrame (int32; -1 without a usable pair of tracings),
    EDTracing, ESTracing (lists of [x, y]: the traced LV outline of that frame; empty without a usable pair)

ED and ES come from the tracings: of the two traced frames, the one whose method-of-discs volume
(long axis L, chords d_i: sum(pi / 4 * d_i**2 * L / n)) is larger is end-diastole. EchoNet's own
loader assumes the order of the rows instead. A frame's outline is the polygon EchoNet-Dynamic's
segmentation targets are filled from: the (X1, Y1) ends of its chords (the rows after the long axis) in
order, then their (X2, Y2) ends in reverse, in the video's pixel coordinates (integers at pixel centres).
`rasterize_polygon` fills one as a mask for the auxiliary LV segmentation loss of fine-tuning.

Tolerated as-is: file names with or without ".avi", split names in any case, unnamed pandas index
columns, surrounding whitespace, videos missing from the tracings. Not usable, hence excluded and
reported (a logged warning per reason with the first names, and the returned `LoadReport`): a
listed video missing from `Videos/`, an empty or unreadable video (PyAV opens the container and
decodes the last frame, which catches truncated files), EF missing or outside [0, 100], an unknown
split, a repeated FileName. `strict=True` turns any exclusion into a `ValueError`.

`load_video_folder` reads a folder of unlabeled AVI/MP4 videos (recursively) as one `Dataset`, for
pretraining or prediction. `synthetic_echonet_dir` returns the built-in synthetic corpus
(`synthetic_echonet.py`), generated once into a cache folder. `EchoNetTransform` (for
`Dataset.with_transform`) and `EchoAIDataCollator` (for `torch.utils.data.DataLoader`) turn rows into
model batches; an unreadable video is dropped from its batch and counted, never fatal.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from datasets import Dataset, DatasetDict, Features, List, Value
from matplotlib.path import Path as PolygonPath
from tqdm.auto import tqdm

from synthetic_echonet import PHANTOM_VERSION, make_synthetic_echonet
from video_io_echoai import (
    DICOM_EXTENSIONS,
    VIDEO_EXTENSIONS,
    VideoDecodingError,
    VideoInfo,
    decode_all_frames,
    is_dicom,
    open_video,
    probe_video,
)
from video_processing_echoai import EchoAIVideoProcessor, num_clip_starts


logger = logging.getLogger(__name__)

SPLITS = {"TRAIN": "train", "VAL": "validation", "TEST": "test"}
ECHONET_FEATURES = Features(
    {
        "FileName": Value("string"),
        "video_path": Value("string"),
        "EF": Value("float32"),
        "ESV": Value("float32"),
        "EDV": Value("float32"),
        "FrameHeight": Value("int32"),
        "FrameWidth": Value("int32"),
        "FPS": Value("float32"),
        "NumberOfFrames": Value("int32"),
        "Split": Value("string"),
        "EDFrame": Value("int32"),
        "ESFrame": Value("int32"),
        "EDTracing": List(List(Value("float32"), length=2)),
        "ESTracing": List(List(Value("float32"), length=2)),
    }
)
VIDEO_FOLDER_FEATURES = Features(
    {
        "FileName": Value("string"),
        "video_path": Value("string"),
        "FrameHeight": Value("int32"),
        "FrameWidth": Value("int32"),
        "FPS": Value("float32"),
        "NumberOfFrames": Value("int32"),
    }
)
_REPORT_NAMES = 5  # file names shown per reason in log messages


@dataclass
class LoadReport:
    """What a loader could not use, and why.

    Attributes:
        num_listed: rows (EchoNet) or files (video folder) found.
        num_loaded: rows that made it into the dataset.
        excluded: reason -> names of the excluded files, in listing order.
        without_tracings: loaded EchoNet videos with no usable ED/ES tracing pair (EDFrame = -1).
    """

    num_listed: int = 0
    num_loaded: int = 0
    excluded: dict[str, list[str]] = field(default_factory=dict)
    without_tracings: list[str] = field(default_factory=list)

    def exclude(self, reason: str, names: Sequence[str]) -> None:
        if len(names):
            self.excluded.setdefault(reason, []).extend(names)

    @property
    def num_excluded(self) -> int:
        return sum(map(len, self.excluded.values()))

    def summary(self, max_names: int | None = _REPORT_NAMES) -> str:
        lines = [f"loaded {self.num_loaded} of {self.num_listed}; excluded {self.num_excluded}"]
        for reason, names in self.excluded.items():
            shown = names if max_names is None else names[:max_names]
            more = f", ... ({len(names) - len(shown)} more)" if len(shown) < len(names) else ""
            lines.append(f"  {len(names)} x {reason}: {', '.join(shown)}{more}")
        return "\n".join(lines)


def _finish_report(report: LoadReport, what: str, strict: bool) -> None:
    if strict and report.num_excluded:
        raise ValueError(f"{what}: strict=True and some files are not usable:\n{report.summary(max_names=None)}")
    if report.num_excluded:
        logger.warning("%s: %s", what, report.summary())


# --------------------------------------------------------------------------------------------------
# EchoNet-Dynamic
# --------------------------------------------------------------------------------------------------


def _strip_avi(names: pd.Series) -> pd.Series:
    names = names.astype(str).str.strip()
    return names.where(~names.str.lower().str.endswith(".avi"), names.str[:-4])


def _csv_table(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    frame.columns = [str(column).strip() for column in frame.columns]
    index_columns = [c for c in frame.columns if c == "" or c.startswith("Unnamed:") or c.lower() == "index"]
    return frame.drop(columns=index_columns)


def _require_columns(frame: pd.DataFrame, path: Path, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{path} lacks the column(s) {missing}; found {list(frame.columns)}")


def _tracing_rows(tracings: pd.DataFrame) -> pd.DataFrame:
    """VolumeTracings.csv's rows, numeric, unreadable ones dropped, with each chord's `length` and `is_long_axis`
    (the first row of a frame's block)."""
    coords = tracings[["X1", "Y1", "X2", "Y2", "Frame"]].apply(pd.to_numeric, errors="coerce")
    rows = pd.concat([_strip_avi(tracings["FileName"]).rename("FileName"), coords], axis=1).dropna()
    rows["length"] = np.hypot(rows["X2"] - rows["X1"], rows["Y2"] - rows["Y1"])
    rows["Frame"] = rows["Frame"].astype(np.int64)
    rows["is_long_axis"] = rows.groupby(["FileName", "Frame"], sort=False).cumcount() == 0
    return rows


def _ed_es_frames(rows: pd.DataFrame) -> pd.DataFrame:
    """ED / ES frame per video from the traced chords (`_tracing_rows`), as columns EDFrame, ESFrame indexed by
    FileName."""
    long_axis = rows[rows["is_long_axis"]].set_index(["FileName", "Frame"])["length"]
    chords = rows[~rows["is_long_axis"]].groupby(["FileName", "Frame"], sort=False)["length"]
    # Method of discs: each chord is the diameter of a disc of thickness L / number of chords.
    volume = (np.pi / 4 * chords.apply(lambda d: np.square(d).sum()) * long_axis / chords.count()).dropna()
    volume = volume.reset_index(name="volume")
    per_video = volume.groupby("FileName", sort=False)
    ed = volume.loc[per_video["volume"].idxmax()].set_index("FileName")["Frame"]
    es = volume.loc[per_video["volume"].idxmin()].set_index("FileName")["Frame"]
    frames = pd.DataFrame({"EDFrame": ed, "ESFrame": es})
    return frames[per_video.size() >= 2]  # one traced frame cannot tell ED from ES


def _tracing_polygons(rows: pd.DataFrame) -> dict[tuple[str, int], list[list[float]]]:
    """Each traced frame's LV outline by (FileName, Frame): the (X1, Y1) ends of its chords in order, then their
    (X2, Y2) ends in reverse (EchoNet-Dynamic's polygon), as a list of [x, y]."""
    chords = rows[~rows["is_long_axis"]]
    groups = chords.groupby(["FileName", "Frame"])  # keys sorted; ngroup numbers them in that order
    order = np.argsort(groups.ngroup().to_numpy(), kind="stable")  # each frame's chords together, in file order
    split_at = np.cumsum(groups.size().to_numpy())[:-1]
    starts = np.split(chords[["X1", "Y1"]].to_numpy(np.float32)[order], split_at)
    ends = np.split(chords[["X2", "Y2"]].to_numpy(np.float32)[order], split_at)
    outlines = [np.concatenate([a, b[::-1]]).tolist() for a, b in zip(starts, ends, strict=True)]
    return dict(zip(groups.size().index, outlines, strict=True))


def _with_tracings(table: pd.DataFrame, tracings: pd.DataFrame) -> pd.DataFrame:
    """`table` with EDFrame / ESFrame (NaN without a usable pair) and EDTracing / ESTracing (empty lists then)."""
    rows = _tracing_rows(tracings)
    table = table.join(_ed_es_frames(rows), on="FileName")
    polygons = _tracing_polygons(rows)
    for phase in ("ED", "ES"):
        keys = zip(table["FileName"], table[f"{phase}Frame"], strict=True)
        table[f"{phase}Tracing"] = [[] if np.isnan(frame) else polygons[(name, int(frame))] for name, frame in keys]
    return table


def rasterize_polygon(polygon: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """A polygon's filled mask, (height, width) bool: the pixels whose centres lie inside it.

    `polygon` is a list of [x, y] vertices in pixel coordinates with integers at pixel centres (EchoNet-Dynamic's
    tracings: x the column, y the row), e.g. a row's EDTracing. The processor resizes a mask as it resizes the
    frames (`EchoAIVideoProcessor.frames_to_pixel_values(..., masks=...)`).
    """
    vertices = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    if len(vertices) < 3:
        raise ValueError(f"a polygon needs at least 3 vertices to enclose an area, got {len(vertices)}")
    rows, columns = np.mgrid[0:height, 0:width]
    centres = np.stack([columns.ravel(), rows.ravel()], axis=1)  # (H * W, 2) as (x, y)
    return PolygonPath(vertices).contains_points(centres).reshape(height, width)


def _listed_rows(file_list: pd.DataFrame, report: LoadReport) -> pd.DataFrame:
    """FileList.csv's rows, typed, less those its metadata alone rules out (excluded in `report`)."""
    table = pd.DataFrame({"FileName": _strip_avi(file_list["FileName"])})
    for column in ("EF", "ESV", "EDV", "FPS", "FrameHeight", "FrameWidth", "NumberOfFrames"):
        values = file_list[column] if column in file_list else pd.Series("", index=file_list.index)
        table[column] = pd.to_numeric(values.str.strip(), errors="coerce")
    table["Split"] = file_list["Split"].astype(str).str.strip().str.upper()
    duplicated = table["FileName"].duplicated()
    report.exclude("FileName listed more than once", table.loc[duplicated, "FileName"].tolist())
    unknown_split = ~table["Split"].isin(list(SPLITS)) & ~duplicated
    report.exclude("Split not TRAIN/VAL/TEST", table.loc[unknown_split, "FileName"].tolist())
    keep = ~duplicated & ~unknown_split
    no_ef = table["EF"].isna() & keep
    report.exclude("EF missing or not a number", table.loc[no_ef, "FileName"].tolist())
    bad_ef = ~table["EF"].between(0, 100) & keep & ~no_ef
    report.exclude("EF outside [0, 100]", table.loc[bad_ef, "FileName"].tolist())
    return table[keep & ~no_ef & ~bad_ef]


def _checked_video(path: Path, name: str, report: LoadReport) -> VideoInfo | None:
    """The video's header facts once its last frame decodes, else None (excluded in `report` with the reason)."""
    try:
        return probe_video(path, check_last_frame=True)
    except VideoDecodingError as error:
        report.exclude(f"unreadable video ({error.reason})", [name])
        return None


def _with_videos(table: pd.DataFrame, videos_dir: Path, report: LoadReport, check_videos: bool) -> pd.DataFrame:
    """`table`'s rows whose video is in `videos_dir` (matched case-insensitively) and readable, with their
    `video_path`; the others are excluded in `report`."""
    videos, cines = {}, {}  # by lower-case FileName; a DICOM cine counts where no video has the name
    for p in videos_dir.iterdir():
        suffix = p.suffix.lower()
        if suffix in VIDEO_EXTENSIONS:
            videos[p.stem.lower()] = p
        elif suffix in DICOM_EXTENSIONS:
            cines.setdefault(p.stem.lower(), p)  # <name>.dcm
        elif is_dicom(p):
            cines.setdefault(p.name.lower(), p)  # <name> itself, by its preamble
    on_disk = {**cines, **videos}
    paths = table["FileName"].str.lower().map(lambda stem: on_disk.get(stem))
    report.exclude("video missing from Videos/", table.loc[paths.isna(), "FileName"].tolist())
    table, paths = table[paths.notna()], paths[paths.notna()]
    rows = tqdm(
        zip(table["FileName"], paths, strict=True), total=len(table), desc="Checking videos", disable=not check_videos
    )

    def is_usable(name: str, path: Path) -> bool:
        if not check_videos and path.stat().st_size > 0:  # present and not empty is all that is checked
            return True
        return _checked_video(path, name, report) is not None

    usable = np.array([is_usable(name, path) for name, path in rows], dtype=bool)
    return table[usable].assign(video_path=[str(p) for p in paths[usable]])


def load_echonet_dynamic(
    data_dir: str | os.PathLike, strict: bool = False, check_videos: bool = True, return_report: bool = False
) -> DatasetDict | tuple[DatasetDict, LoadReport]:
    """Load an EchoNet-Dynamic folder (or the synthetic corpus) as train / validation / test splits.

    Args:
        data_dir: folder with FileList.csv, VolumeTracings.csv and Videos/.
        strict: raise `ValueError` naming every unusable row instead of excluding it.
        check_videos: open every video with PyAV and decode its last frame (about a millisecond per
            MJPEG video); without it only the file's presence and non-zero size are checked.
        return_report: also return the `LoadReport`.

    Raises:
        FileNotFoundError: `data_dir` is missing or not laid out like EchoNet-Dynamic.
        ValueError: a CSV lacks a required column, or `strict=True` and a row is unusable.
    """
    data_dir = Path(data_dir).expanduser()
    expected = "expected an EchoNet-Dynamic folder with FileList.csv, VolumeTracings.csv and Videos/"
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir} not found: {expected}")
    missing = [name for name in ("FileList.csv", "VolumeTracings.csv", "Videos/") if not (data_dir / name).exists()]
    if missing:
        raise FileNotFoundError(f"{data_dir}: {', '.join(missing)} not found: {expected}")

    file_list = _csv_table(data_dir / "FileList.csv")
    _require_columns(file_list, data_dir / "FileList.csv", ["FileName", "EF", "Split"])
    report = LoadReport(num_listed=len(file_list))
    table = _with_videos(_listed_rows(file_list, report), data_dir / "Videos", report, check_videos)

    tracings = _csv_table(data_dir / "VolumeTracings.csv")
    _require_columns(tracings, data_dir / "VolumeTracings.csv", ["FileName", "X1", "Y1", "X2", "Y2", "Frame"])
    table = _with_tracings(table, tracings)
    report.without_tracings = table.loc[table["EDFrame"].isna(), "FileName"].tolist()
    report.num_loaded = len(table)
    _finish_report(report, f"EchoNet-Dynamic at {data_dir}", strict)

    for column in ("EDFrame", "ESFrame", "FrameHeight", "FrameWidth", "NumberOfFrames"):
        table[column] = table[column].fillna(-1).astype(np.int32)
    table = table[list(ECHONET_FEATURES)]
    dataset = DatasetDict(
        {
            split: Dataset.from_pandas(table[table["Split"] == key], features=ECHONET_FEATURES, preserve_index=False)
            for key, split in SPLITS.items()
        }
    )
    return (dataset, report) if return_report else dataset


# --------------------------------------------------------------------------------------------------
# Unlabeled video folders
# --------------------------------------------------------------------------------------------------


def load_video_folder(
    data_dir: str | os.PathLike,
    extensions: Sequence[str] = VIDEO_EXTENSIONS,
    strict: bool = False,
    return_report: bool = False,
) -> Dataset | tuple[Dataset, LoadReport]:
    """Every video under `data_dir` (recursively, sorted) as one `Dataset`, for pretraining or prediction.

    Columns: FileName (path relative to `data_dir`, without extension), video_path, FrameHeight,
    FrameWidth, FPS, NumberOfFrames. Unreadable videos are excluded and reported as in
    `load_echonet_dynamic`; `strict=True` makes them fatal.
    """
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir} not found: expected a folder of videos ({', '.join(extensions)})")
    suffixes = {e.lower() for e in extensions}
    files = sorted(p for p in data_dir.rglob("*") if p.suffix.lower() in suffixes and p.is_file())
    if not files:
        raise FileNotFoundError(
            f"{data_dir} contains no video with extension {sorted(suffixes)} (searched recursively)"
        )
    report, rows = LoadReport(num_listed=len(files)), []
    for path in tqdm(files, desc="Checking videos"):
        name = path.relative_to(data_dir).with_suffix("").as_posix()
        info = _checked_video(path, name, report)
        if info is None:
            continue
        rows.append([name, str(path), info.height, info.width, info.fps, info.num_frames])
    report.num_loaded = len(rows)
    _finish_report(report, f"Video folder {data_dir}", strict)
    columns = list(VIDEO_FOLDER_FEATURES)
    dataset = Dataset.from_dict(
        {c: [row[i] for row in rows] for i, c in enumerate(columns)}, features=VIDEO_FOLDER_FEATURES
    )
    return (dataset, report) if return_report else dataset


# --------------------------------------------------------------------------------------------------
# The synthetic corpus, cached
# --------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """EchoAI's cache root: `$ECHOAI_CACHE`, else `~/.cache/echoai`."""
    return Path(os.environ.get("ECHOAI_CACHE", "~/.cache/echoai")).expanduser()


def synthetic_echonet_dir(
    num_videos: int = 200, seed: int = 0, cache_dir: str | os.PathLike | None = None, num_workers: int | None = None
) -> Path:
    """Path of the synthetic corpus `<cache>/synthetic_echonet/v<PHANTOM_VERSION>_<num_videos>_<seed>`, made once.

    The phantom's version is part of the name, so a corpus rendered by an older phantom is never reused.

    The corpus is written to a temporary sibling folder and renamed into place when complete, so an
    interrupted run never leaves a half corpus behind, and concurrent callers (e.g. one per
    distributed rank) all end up with the same folder.

    Args:
        cache_dir: cache root (default `default_cache_dir()`).
        num_workers: rendering processes, see `synthetic_echonet.make_synthetic_echonet`.
    """
    root = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "synthetic_echonet"
    target = root / f"v{PHANTOM_VERSION}_{num_videos}_{seed}"
    if (target / "FileList.csv").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=root))
    try:
        make_synthetic_echonet(staging, num_videos=num_videos, seed=seed, num_workers=num_workers)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "FileList.csv").is_file():  # not a concurrent writer that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------------------
# From rows to batches
# --------------------------------------------------------------------------------------------------


def row_video(row: dict) -> tuple[str | bytes, str | None]:
    """A row's video and the name its errors carry: a prepared corpus's bytes (`video`), named by `video_id`
    since a corpus holds no source paths, else the file at `video_path` (EchoNet-Dynamic, video folders),
    named by its path."""
    if row.get("video") is not None:
        return row["video"], f"corpus clip {row.get('video_id', '?')}"
    return row["video_path"], None


def row_pixel_values(
    row: dict,
    processor: EchoAIVideoProcessor,
    generator: torch.Generator | None = None,
    training: bool = True,
    num_clips: int = 1,
) -> torch.Tensor:
    """One row's clips as `pixel_values`: (T, C, H, W) for one clip, (K, T, C, H, W) for `num_clips` > 1.

    The row's video is a file (`video_path`) or a prepared corpus's bytes (`video`); either way only the
    clips' frames are decoded. Training: one clip at a random start, augmented, both drawn from `generator`;
    evaluation (`training=False`): `num_clips` evenly spaced clips, no augmentation. Used by `EchoNetTransform`
    and by `training_echoai.TrainingClips` / `StreamingClips`.

    Raises:
        VideoDecodingError: the video cannot be decoded (named by its path, or a corpus row's `video_id`).
    """
    with open_video(*row_video(row)) as reader:
        clips = processor(
            reader,
            clip_sampling="random" if training else "uniform",
            num_clips=1 if training else num_clips,
            do_augment=training,
            generator=generator,
        )["pixel_values"]  # (K, T, C, H, W)
    return clips[0] if len(clips) == 1 else clips


def traced_clip_start(
    num_video_frames: int, num_frames: int, period: int, frame: int, generator: torch.Generator | None = None
) -> tuple[int, int] | None:
    """(clip start, position of `frame` in the clip) for a clip that samples `frame`, its position drawn uniformly
    from those a valid start allows (`clip_frame_indices`' starts); None when no clip of the video samples it."""
    num_starts = num_clip_starts(num_video_frames, num_frames, period)
    positions = (
        [k for k in range(num_frames) if 0 <= frame - period * k < num_starts] if frame < num_video_frames else []
    )
    if not positions:
        return None
    position = positions[int(torch.randint(len(positions), (1,), generator=generator))]
    return frame - period * position, position


def row_traced_clip(
    row: dict, processor: EchoAIVideoProcessor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """A training clip of a row that shows one of its traced frames, with that frame's LV mask: (pixel_values
    (T, C, H, W), mask (image_size, image_size) float in [0, 1], the traced frame's position in the clip).

    ED or ES is drawn at random, then the clip start that puts it at a random position (`traced_clip_start`; the
    other traced frame when no clip can sample the first). The mask (`rasterize_polygon` of the row's EDTracing or
    ESTracing) is resized, shifted and flipped with the clip (`EchoAIVideoProcessor.frames_to_pixel_values`). A row
    without tracings, or whose traced frames no clip samples, gives `row_pixel_values`' clip, None and -1. All draws
    come from `generator`.
    """
    traced = [(row.get(f"{phase}Frame", -1), row.get(f"{phase}Tracing") or []) for phase in ("ED", "ES")]
    traced = [(frame, polygon) for frame, polygon in traced if frame >= 0 and len(polygon) >= 3]
    if not traced:
        return row_pixel_values(row, processor, generator), None, -1
    first = int(torch.randint(len(traced), (1,), generator=generator))
    with open_video(*row_video(row)) as reader:
        for frame, polygon in traced[first:] + traced[:first]:  # noqa: B007 (the one chosen is used below)
            choice = traced_clip_start(reader.num_frames, processor.num_frames, processor.period, frame, generator)
            if choice is not None:
                break
        else:  # no clip samples a traced frame: `row_pixel_values`' random clip, from the video already open
            frames = processor.sample_clips(reader, clip_sampling="random", generator=generator)  # (1, T, H, W)
            return processor.frames_to_pixel_values(frames, do_augment=True, generator=generator)[0], None, -1
        start, position = choice
        frames = processor.sample_clips(reader, clip_sampling="start", clip_start=start)  # (1, T, H, W)
    mask = rasterize_polygon(polygon, *frames.shape[-2:])[None]  # (1, H, W) at the video's own size
    pixel_values, masks = processor.frames_to_pixel_values(frames, do_augment=True, generator=generator, masks=mask)
    return pixel_values[0], masks[0], position


def row_frames(row: dict) -> np.ndarray:
    """Every frame of a row's video, grey (T, H, W) uint8: `compute_mean_std(rows, read_frames=row_frames)`."""
    return decode_all_frames(*row_video(row))


@dataclass
class EchoNetTransform:
    """Per-row video loading for `Dataset.with_transform` / `set_transform`.

    Returns, per row, `pixel_values` (T, C, H, W) -- or (K, T, C, H, W) in evaluation with
    `num_clips > 1` -- and `labels` (the `label_column` value, NaN without one). A video that cannot
    be decoded gives `pixel_values=None` and its error message in `error`, so one bad file costs one
    sample, not the run; `EchoAIDataCollator` drops and counts such rows.

    Args:
        processor: the processor that will ship with the model.
        training: one random clip with augmentation (True) or `num_clips` evenly spaced clips without (False).
        num_clips: clips per video in evaluation.
        label_column: column holding the regression target (EchoNet: "EF"); None for unlabeled data.
        video_column: column holding the video path.
    """

    processor: EchoAIVideoProcessor
    training: bool = False
    num_clips: int = 1
    label_column: str | None = "EF"
    video_column: str = "video_path"

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        paths = batch[self.video_column]
        labels = batch[self.label_column] if self.label_column in batch else [math.nan] * len(paths)
        pixel_values, errors = [], []
        for path in paths:
            try:
                row = {"video_path": path}
                pixel_values.append(row_pixel_values(row, self.processor, None, self.training, self.num_clips))
                errors.append(None)
            except VideoDecodingError as error:
                pixel_values.append(None)
                errors.append(str(error))
        return {
            "pixel_values": pixel_values,
            "labels": [float(x) for x in labels],
            "video_path": paths,
            "error": errors,
        }


@dataclass
class EchoAIDataCollator:
    """Stack `EchoNetTransform` rows into a batch, dropping rows whose video failed to decode.

    Returns `pixel_values` (B, T, C, H, W) float32, `labels` (B,) float32 and `num_skipped` (a 0-d
    int64 tensor: rows dropped from this batch, each logged with its file and reason). Training
    loops add up `batch.pop("num_skipped")` -- the count travels with the batch because collation
    runs inside DataLoader worker processes. A batch whose every video failed has zero rows
    (`pixel_values` of shape (0,)); skip it.
    """

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        good = [f for f in features if f["pixel_values"] is not None]
        for feature in features:
            if feature["pixel_values"] is None:
                logger.warning("Skipping a video that cannot be decoded: %s", feature["error"])
        return {
            "pixel_values": torch.stack([f["pixel_values"] for f in good]) if good else torch.empty(0),
            "labels": torch.tensor([f["labels"] for f in good], dtype=torch.float32),
            "num_skipped": torch.tensor(len(features) - len(good), dtype=torch.int64),
        }


__all__ = [
    "EchoAIDataCollator",
    "EchoNetTransform",
    "LoadReport",
    "default_cache_dir",
    "load_echonet_dynamic",
    "load_video_folder",
    "rasterize_polygon",
    "row_frames",
    "row_pixel_values",
    "row_traced_clip",
    "row_video",
    "synthetic_echonet_dir",
    "traced_clip_start",
]
