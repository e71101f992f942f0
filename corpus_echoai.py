"""Pretraining corpora at scale: folders of AVI, MP4 and DICOM echo videos -> sharded parquet -> clips.

Preparation turns one or more folders (searched recursively) into parquet shards that `datasets` loads
map-style or streams, one row per video::

    <output_dir>/
        data/train-00000.parquet, ...   the rows (shards of about --shard_size_mb each)
        prepare_state.json              resume point, rewritten atomically after every shard
        prepare_report.json             what was written and skipped, and why (counts only)
        path_map.jsonl                  ONLY with --write_path_map: video_id -> source path. Sensitive
                                        (paths often hold patient names or ids): keep it local, never
                                        upload it with the corpus.

Columns: `video` (bytes: MJPEG AVI, `image_size` square, grey, every frame a key frame -- the format of
EchoNet-Dynamic's videos, so a clip decodes only the frames it uses), `video_id` (salted hash of the
source file's path relative to its input folder, prefixed by that folder's name), `frame_rate` (float),
`num_frames`, `height`, `width` (int), `source_format` ("avi", "mp4", "dicom"), `view` (DICOM
ViewCodeSequence meaning, else null), `group` (salted hash of the DICOM StudyInstanceUID, else of the
SeriesInstanceUID, else the video_id: keep a group on one side of a split), `content_hash` (SHA-256
of the stored `video` bytes).

How sources become rows:

* AVI / MP4 already in the corpus format (MJPEG AVI of `image_size` x `image_size`) are remuxed: the
  packets are copied into a fresh container, dropping any container metadata. Every other video is
  decoded (luma), resized to fit `image_size` keeping its aspect and zero-padded to a square, then
  encoded. Encoding is single-threaded and so byte-identical run to run, which makes `content_hash`
  stable and `--dedupe` exact for sources that preprocess to the same frames.
* DICOM (a file is DICOM by extension .dcm / .dicom or by the "DICM" preamble) is read by
  `dicom_echoai.read_dicom`, the reader inference uses too: only multi-frame ultrasound is used, converted to
  grey and cropped to the ultrasound sector with everything outside it zeroed -- burnt-in text (patient
  name, date, settings), ECG trace, scale bars, logos -- as EchoNet-Dynamic's preprocessing did (the method
  and its limits are in `dicom_echoai`'s docstring). Files it refuses (Modality other than "US",
  single-frame images, no pixel data, pixel data no installed handler decodes -- install the `dicom` extra
  for JPEG-LS, lossless JPEG and JPEG 2000 -- no moving sector found) are skipped and counted by its reason.
  Without a frame-timing tag 30 fps (`DEFAULT_FRAME_RATE`) is assumed and counted in the report. The sector
  crop is then resized keeping aspect and padded to a square.

De-identification: no DICOM attribute value is written except Modality (for skip reasons), the frame
rate tags, the view code meaning and the salted hashes of the study / series UIDs; no source path is
written anywhere (reports and logs name files by `video_id` only, and error texts from decoders, which
may quote the path, are reduced to fixed reasons). The salt (`--salt` or `$ECHOAI_CORPUS_SALT`) is a
secret: with it, ids can be recomputed from known paths; keep it to prepare more data into the same id
space.

Resuming: sources are processed in a fixed order (input folder order, then sorted relative path);
after each shard the state file records how many sources are done. A rerun with the same arguments
deletes shards written after the last recorded state and continues from there, giving the same corpus
as an uninterrupted run. Changing the inputs, salt, image size, shard size or dedupe is refused.

Usage
-----
Prepare (any number of input folders; `--num_workers` processes decode in parallel, output order is
fixed whatever their number)::

    export ECHOAI_CORPUS_SALT=<a long random secret, kept with the data>
    python scripts/prepare_corpus.py /data/echo_avi /data/echo_dicom --output_dir /data/corpus \\
        --image_size 112 --shard_size_mb 256 --dedupe --num_workers 8

Load map-style (an Arrow copy is cached once) or stream (reads the parquet shards in place)::

    from corpus_echoai import load_corpus
    from data_echoai import row_pixel_values
    from training_echoai import TrainingClips
    dataset = load_corpus("/data/corpus")                       # datasets.Dataset
    stream = load_corpus("/data/corpus", streaming=True)        # datasets.IterableDataset
    pixel_values = row_pixel_values(next(iter(stream)), processor, torch.Generator().manual_seed(0))
    clips = TrainingClips(dataset, processor, seed=0)  # reads a row's `video` bytes

`scripts/pretrain.py --dataset_path /data/corpus [--streaming]` does this (and the below) for you.

On a cluster (`accelerate launch --config_file configs/accelerate/<multi-node>.yaml ...`), every process
takes its part with its rank and the world size::

    from accelerate import PartialState
    state = PartialState()
    stream = shuffle_corpus(load_corpus(path, streaming=True), seed=args.seed, buffer_size=1000)
    stream = split_corpus_by_node(stream, rank=state.process_index, world_size=state.num_processes)
    stream.set_epoch(epoch)                      # a new shard order and buffer draw each epoch

A streamed corpus whose shard count is a multiple of the world size is split by shards (each process
reads only its own files); otherwise every process reads every shard and keeps one row in
`world_size`, which is correct but reads (not decodes) `world_size` times the bytes: prepare with a
`--shard_size_mb` that yields a multiple of the process count. A map-style corpus is split into
contiguous equal slices. Resume a stream with `stream.state_dict()` saved beside the checkpoint and
`stream.load_state_dict(state)` (datasets >= 3). The shuffle buffer's content is not saved: with
`buffer_size` <= 1 (shard order shuffled, rows in shard order) a resumed stream continues exactly; with a
buffer it continues from the shards' read position with an empty buffer: around the checkpoint up to a
buffer of rows may be skipped or seen twice, and the order differs from an uninterrupted pass.

The same corpus on the Hub or in object storage is loaded by path (fsspec)::

    load_corpus("hf://datasets/org/echo-corpus", streaming=True)
    load_corpus("s3://bucket/echo-corpus", streaming=True, storage_options={"anon": False})
    # or directly: datasets.load_dataset("parquet", data_files="hf://datasets/org/echo-corpus/data/*.parquet")

Upload only `data/` (and the report if wanted); never `path_map.jsonl`.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import itertools
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from datasets import Dataset, IterableDataset, load_dataset
from datasets.distributed import split_dataset_by_node
from tqdm.auto import tqdm

from dicom_echoai import (
    INSTALL_HINT,
    NO_DICOM_SUPPORT,
    crop_to_mask,
    dicom_frame_rate,
    fit_to_square,
    read_dicom,
    sector_mask,
)
from video_io_echoai import (
    EMPTY,
    NO_FRAMES,
    NO_VIDEO_STREAM,
    NOT_A_VIDEO,
    NOT_FOUND,
    VIDEO_EXTENSIONS,
    VideoDecodingError,
    VideoReader,
    decode_video_frames,
    grey_frame,
    is_dicom,
)


logger = logging.getLogger(__name__)

SALT_ENV = "ECHOAI_CORPUS_SALT"
DEFAULT_FRAME_RATE = 30.0  # fps assumed for a DICOM cine without any frame-timing tag
DATA_DIR, STATE_FILE, REPORT_FILE, PATH_MAP_FILE = (
    "data",
    "prepare_state.json",
    "prepare_report.json",
    "path_map.jsonl",
)
_STATE_VERSION = 1
_ROW_GROUP_BYTES = 32 * 2**20  # parquet row groups of about this size: the unit a stream reads

CORPUS_SCHEMA = pa.schema(
    [
        ("video", pa.binary()),
        ("video_id", pa.string()),
        ("frame_rate", pa.float32()),
        ("num_frames", pa.int32()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("source_format", pa.string()),
        ("view", pa.string()),
        ("group", pa.string()),
        ("content_hash", pa.string()),
    ]
)


# --------------------------------------------------------------------------------------------------
# Salted ids
# --------------------------------------------------------------------------------------------------


def resolve_salt(salt: str | None) -> str:
    """The salt given, else `$ECHOAI_CORPUS_SALT`; a missing salt is an error that says how to set one."""
    salt = salt or os.environ.get(SALT_ENV)
    if not salt:
        raise ValueError(
            f"a salt is required to hash video ids and study UIDs: pass --salt SECRET or set {SALT_ENV}=SECRET "
            '(e.g. `export ECHOAI_CORPUS_SALT=$(python -c "import secrets; print(secrets.token_hex(16))")`); '
            "keep it secret and reuse it when adding data, so ids stay stable"
        )
    return salt


def salted_hash(salt: str, text: str) -> str:
    """HMAC-SHA256 of `text` keyed by `salt`, 32 hex digits: not reversible without the salt."""
    return hmac.new(salt.encode(), text.encode(), hashlib.sha256).hexdigest()[:32]


# --------------------------------------------------------------------------------------------------
# Frames: encode (the sector mask and fit to a square are `dicom_echoai`'s)
# --------------------------------------------------------------------------------------------------


def _avi_rate(frame_rate: float) -> Fraction:
    return Fraction(frame_rate).limit_denominator(1001)


def encode_clip(frames: np.ndarray, frame_rate: float) -> bytes:
    """Grey (T, S, S) uint8 frames -> MJPEG AVI bytes (the corpus format, as `synthetic_echonet.write_avi`).

    One encoder thread keeps the bytes identical from run to run and machine to machine.
    """
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="avi") as container:
        stream = container.add_stream("mjpeg", rate=_avi_rate(frame_rate))
        stream.height, stream.width = frames.shape[1:]
        stream.pix_fmt = "yuvj420p"
        stream.bit_rate = 8_000_000
        stream.codec_context.thread_count = 1
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="gray")))
        container.mux(stream.encode())
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------
# Sources -> rows
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A file to prepare: its path, its key (input folder name / relative path: what `video_id` hashes)."""

    path: str
    key: str
    kind: str  # "video" or "dicom"


def list_sources(inputs: Sequence[str | os.PathLike]) -> tuple[list[Source], int]:
    """Videos and DICOM files under `inputs` (recursive), in a fixed order; also the count of other files."""
    sources, ignored = [], 0
    for root in map(Path, inputs):
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a folder: expected folders of AVI, MP4 or DICOM files")
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            suffix = path.suffix.lower()
            kind = "video" if suffix in VIDEO_EXTENSIONS else "dicom" if is_dicom(path) else None
            if kind is None:
                ignored += 1
                continue
            sources.append(Source(str(path), f"{root.resolve().name}/{path.relative_to(root).as_posix()}", kind))
    return sources, ignored


class _Skip(Exception):
    """A source that is not used; `reason` is a fixed phrase (never a path or a DICOM value)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _remux(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> tuple[bytes, int]:
    """Copy an MJPEG stream's packets into a fresh AVI (no container metadata); also the packet count."""
    buffer, count = io.BytesIO(), 0
    with av.open(buffer, mode="w", format="avi") as output:
        out_stream = output.add_stream_from_template(stream)
        for packet in container.demux(stream):
            if packet.size == 0:
                continue
            packet.stream = out_stream
            output.mux(packet)
            count += 1
    return buffer.getvalue(), count


# `VideoDecodingError.kind` -> the report's reason: fixed phrases, since FFmpeg's own messages may quote the path.
_VIDEO_SKIP_REASONS = {
    NOT_FOUND: "cannot read (FileNotFoundError)",
    EMPTY: "empty file",
    NOT_A_VIDEO: "unreadable video (FFmpeg cannot open it)",
    NO_VIDEO_STREAM: "unreadable video (no video stream)",
    NO_FRAMES: "unreadable video (no frames)",
}
_CORRUPT_VIDEO = "unreadable video (corrupt or truncated data)"


def _prepare_video(path: str, image_size: int) -> tuple[bytes, int, float | None]:
    """AVI / MP4 -> (corpus bytes, frame count, frame rate or None)."""
    try:
        reader = VideoReader(path)
    except VideoDecodingError as error:
        raise _Skip(_VIDEO_SKIP_REASONS.get(error.kind, _CORRUPT_VIDEO)) from error
    with reader:
        stream, context = reader.stream, reader.stream.codec_context
        frame_rate = float(reader.rate) if reader.rate else None
        compliant = "avi" in reader.container.format.name.split(",") and context.name == "mjpeg"
        try:
            if compliant and context.width == context.height == image_size:
                data, num_frames = _remux(reader.container, stream)
                if num_frames:  # decode the first and last frame: catches a corrupt or cut file cheaply
                    decode_video_frames(data, [0, num_frames - 1])
            else:
                stream.thread_type = "AUTO"
                frames = [grey_frame(frame) for frame in reader.container.decode(stream)]
                num_frames = len(frames)
                if num_frames:
                    data = encode_clip(fit_to_square(np.stack(frames), image_size), frame_rate or DEFAULT_FRAME_RATE)
        except (av.FFmpegError, VideoDecodingError, ValueError, IndexError) as error:
            raise _Skip(_CORRUPT_VIDEO) from error
    if num_frames == 0:
        raise _Skip("unreadable video (no frames)")
    return data, num_frames, frame_rate


def _prepare_dicom(path: str, image_size: int, salt: str) -> tuple[bytes, int, float | None, str | None, str | None]:
    """Multi-frame ultrasound DICOM -> (corpus bytes, frames, frame rate or None, view, group hash or None)."""
    try:
        cine = read_dicom(path)
    except VideoDecodingError as error:
        if error.kind == NO_DICOM_SUPPORT:
            raise ImportError(f"DICOM sources need pydicom and Pillow: {INSTALL_HINT}") from error
        raise _Skip(_VIDEO_SKIP_REASONS.get(error.kind, error.reason)) from error  # fixed phrases, no PHI
    frame_rate = cine.frame_rate
    data = encode_clip(fit_to_square(cine.frames, image_size), frame_rate or DEFAULT_FRAME_RATE)
    group = salted_hash(salt, f"uid:{cine.group_uid}") if cine.group_uid else None
    return data, len(cine.frames), frame_rate, cine.view, group


def prepare_source(task: tuple[Source, int, str]) -> dict:
    """One source -> a corpus row (`row`) or a skip `reason`; run in worker processes, so no shared state."""
    source, image_size, salt = task
    video_id = salted_hash(salt, f"path:{source.key}")
    source_format = "dicom" if source.kind == "dicom" else Path(source.path).suffix.lower().lstrip(".")
    try:
        if source.kind == "dicom":
            data, num_frames, frame_rate, view, group = _prepare_dicom(source.path, image_size, salt)
        else:
            (data, num_frames, frame_rate), view, group = _prepare_video(source.path, image_size), None, None
    except _Skip as skip:
        return {"video_id": video_id, "source_format": source_format, "reason": skip.reason}
    except (OSError, MemoryError) as error:
        return {
            "video_id": video_id,
            "source_format": source_format,
            "reason": f"cannot read ({type(error).__name__})",
        }
    row = {
        "video": data,
        "video_id": video_id,
        "frame_rate": frame_rate or DEFAULT_FRAME_RATE,
        "num_frames": num_frames,
        "height": image_size,
        "width": image_size,
        "source_format": source_format,
        "view": view,
        "group": group or video_id,
        "content_hash": hashlib.sha256(data).hexdigest(),
    }
    return {"video_id": video_id, "source_format": source_format, "row": row, "frame_rate_defaulted": not frame_rate}


def _init_worker() -> None:
    torch.set_num_threads(1)  # one process per core; intra-op threads would only contend


def _ordered_map(function: Callable, items: Iterable, num_workers: int) -> Iterator:
    """`map(function, items)` over `num_workers` processes, results in input order, a bounded window in flight."""
    if num_workers <= 1:
        yield from map(function, items)
        return
    iterator = iter(items)
    with ProcessPoolExecutor(num_workers, initializer=_init_worker) as pool:
        window = deque(pool.submit(function, item) for item in itertools.islice(iterator, 4 * num_workers))
        while window:
            result = window.popleft().result()
            for item in itertools.islice(iterator, 1):
                window.append(pool.submit(function, item))
            yield result


# --------------------------------------------------------------------------------------------------
# Preparation: shards, state, report
# --------------------------------------------------------------------------------------------------


@dataclass
class PrepareReport:
    """What `prepare_corpus` wrote and skipped. Counts only: no file names, no paths."""

    files_found: int = 0
    ignored_files: int = 0  # neither video nor DICOM (CSV, text, ...)
    videos_written: int = 0
    written_by_format: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    duplicates_dropped: int = 0
    frame_rate_defaulted: int = 0
    hours_of_video: float = 0.0
    num_shards: int = 0
    bytes_written: int = 0
    seconds: float = 0.0  # preparation time, summed over resumed runs

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        lines = [
            f"{self.videos_written} videos written ({self.hours_of_video:.2f} h, "
            f"{', '.join(f'{k} {v}' for k, v in sorted(self.written_by_format.items())) or 'none'}) in "
            f"{self.num_shards} shards ({self.bytes_written / 2**20:.1f} MiB); {self.num_skipped} skipped, "
            f"{self.duplicates_dropped} duplicates dropped, {self.ignored_files} other files ignored"
        ]
        lines += [f"  {count} x {reason}" for reason, count in sorted(self.skipped.items())]
        if self.frame_rate_defaulted:
            lines.append(
                f"  {self.frame_rate_defaulted} videos without a frame rate: {DEFAULT_FRAME_RATE} fps assumed"
            )
        return "\n".join(lines)


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _shard_name(index: int) -> str:
    return f"train-{index:05d}.parquet"


def _write_shard(path: Path, rows: list[dict]) -> int:
    """Rows -> one parquet file (written beside, then renamed in place); returns its size in bytes."""
    table = pa.Table.from_pylist(rows, schema=CORPUS_SCHEMA)
    mean_row = max(1, table.nbytes // max(1, len(rows)))
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(
        table,
        tmp,
        row_group_size=max(1, _ROW_GROUP_BYTES // mean_row),
        compression={name: ("none" if name == "video" else "zstd") for name in CORPUS_SCHEMA.names},
    )
    os.replace(tmp, path)
    return path.stat().st_size


def _prepare_settings(salt: str, sources: list[Source], image_size: int, shard_size_mb: float, dedupe: bool) -> dict:
    """What a resumed preparation must share with the run it resumes."""
    return {
        "image_size": image_size,
        "shard_size_mb": shard_size_mb,
        "dedupe": dedupe,
        # Salted digests only: the state file must not reveal the salt or the paths either.
        "salt_check": salted_hash(salt, "salt-check"),
        "sources_digest": salted_hash(salt, "\n".join(s.key for s in sources)),
        "num_sources": len(sources),
    }


class _CorpusWriter:
    """A preparation in progress: the state file (the shards written and how many sources they cover), the rows of
    the shard being filled, the content hashes seen (for `dedupe`) and the report.

    The state file is rewritten atomically after every shard, so an interrupted run resumes after the last shard
    on disk; `open` deletes any shard written after it.
    """

    def __init__(self, output_dir: Path, state: dict, report: PrepareReport, start_time: float, options: dict):
        self.output_dir, self.data_dir, self.state_path = output_dir, output_dir / DATA_DIR, output_dir / STATE_FILE
        self.state, self.report, self.clock = state, report, start_time
        self.write_path_map: bool = options["write_path_map"]
        self.on_shard_written: Callable[[int], None] | None = options["on_shard_written"]
        self.target_bytes = state["settings"]["shard_size_mb"] * 2**20
        self.seen_hashes: set[str] = set()
        self.rows: list[dict] = []
        self.path_lines: list[str] = []  # path_map.jsonl lines of `rows`
        self.row_bytes = 0

    @classmethod
    def open(cls, output_dir: Path, settings: dict, ignored: int, start_time: float, **options) -> _CorpusWriter:
        """Resume the preparation in `output_dir` (refused if its settings differ), or start one. `options`:
        `write_path_map` and `on_shard_written`, as `prepare_corpus`'s."""
        state_path = output_dir / STATE_FILE
        if state_path.exists():
            state = json.loads(state_path.read_text())
            changed = sorted(k for k in settings if state["settings"].get(k) != settings[k])
            if changed:
                raise ValueError(
                    f"{output_dir} holds a corpus prepared with different {', '.join(changed)}: use the same "
                    "inputs, salt and options to resume, or a new --output_dir"
                )
            report = PrepareReport(**state["report"])
        else:
            state = {
                "version": _STATE_VERSION,
                "settings": settings,
                "next_source": 0,
                "shards": [],
                "complete": False,
            }
            report = PrepareReport(files_found=settings["num_sources"], ignored_files=ignored)
        writer = cls(output_dir, state, report, start_time, options)
        listed = {shard["file"] for shard in state["shards"]}
        for path in writer.data_dir.iterdir():  # shards written after the last saved state are redone
            if path.name not in listed:
                path.unlink()
        if writer.write_path_map and state["next_source"] == 0 and (output_dir / PATH_MAP_FILE).exists():
            (output_dir / PATH_MAP_FILE).unlink()
        if settings["dedupe"]:
            for shard in state["shards"]:
                column = pq.read_table(writer.data_dir / shard["file"], columns=["content_hash"])[0]
                writer.seen_hashes.update(column.to_pylist())
        return writer

    @property
    def next_source(self) -> int:
        return self.state["next_source"]

    def add(self, result: dict, source: Source) -> bool:
        """Count one source's result (`prepare_source`) and keep its row; True when the shard is full."""
        report, row = self.report, result.get("row")
        if row is None:
            report.skipped[result["reason"]] = report.skipped.get(result["reason"], 0) + 1
            logger.debug("Skipped %s: %s", result["video_id"], result["reason"])
            return False
        if self.state["settings"]["dedupe"] and row["content_hash"] in self.seen_hashes:
            report.duplicates_dropped += 1
            return False
        self.seen_hashes.add(row["content_hash"])
        self.rows.append(row)
        self.row_bytes += len(row["video"])
        if self.write_path_map:
            self.path_lines.append(json.dumps({"video_id": row["video_id"], "path": source.path}) + "\n")
        report.videos_written += 1
        fmt = row["source_format"]
        report.written_by_format[fmt] = report.written_by_format.get(fmt, 0) + 1
        report.frame_rate_defaulted += bool(result["frame_rate_defaulted"])
        report.hours_of_video += row["num_frames"] / row["frame_rate"] / 3600
        return self.row_bytes >= self.target_bytes

    def write_shard(self, next_source: int) -> None:
        """Write the rows kept so far as the next shard, then the state (`next_source`: the sources it covers)."""
        index = len(self.state["shards"])
        size = _write_shard(self.data_dir / _shard_name(index), self.rows)
        self.state["shards"].append({"file": _shard_name(index), "num_rows": len(self.rows), "num_bytes": size})
        if self.path_lines:
            with open(self.output_dir / PATH_MAP_FILE, "a") as f:
                f.write("".join(self.path_lines))
                f.flush()
                os.fsync(f.fileno())
        self.report.num_shards, self.report.bytes_written = len(self.state["shards"]), self.report.bytes_written + size
        self.save_state(next_source)
        self.rows, self.path_lines, self.row_bytes = [], [], 0
        if self.on_shard_written is not None:
            self.on_shard_written(index)

    def save_state(self, next_source: int, complete: bool = False) -> None:
        now = time.perf_counter()
        self.report.seconds += now - self.clock
        self.clock = now
        self.state.update(next_source=next_source, report=asdict(self.report), complete=complete)
        _write_json_atomic(self.state_path, self.state)


def prepare_corpus(
    inputs: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    salt: str | None = None,
    image_size: int = 112,
    shard_size_mb: float = 256,
    dedupe: bool = False,
    num_workers: int = 1,
    write_path_map: bool = False,
    progress: bool = True,
    on_shard_written: Callable[[int], None] | None = None,
) -> PrepareReport:
    """Prepare (or resume preparing) a sharded corpus from folders of AVI, MP4 and DICOM files.

    Args:
        inputs: folders searched recursively.
        output_dir: the corpus folder (created; a previous run's state there is resumed).
        salt: secret for the hashed ids (default `$ECHOAI_CORPUS_SALT`).
        image_size: output frames are `image_size` x `image_size`.
        shard_size_mb: a shard is closed once its rows add up to this many MiB.
        dedupe: drop a clip whose `content_hash` was already written (counted in the report).
        num_workers: preparation processes (1: in this process).
        write_path_map: also write `path_map.jsonl` (video_id, source path): sensitive, local only.
        on_shard_written: called with the shard index after each shard and its state are on disk.

    Returns:
        The `PrepareReport`, also saved as `prepare_report.json`.
    """
    salt = resolve_salt(salt)
    if image_size < 1 or shard_size_mb <= 0:
        raise ValueError(f"image_size and shard_size_mb must be positive, got {image_size} and {shard_size_mb}")
    start_time = time.perf_counter()
    output_dir = Path(output_dir)
    (output_dir / DATA_DIR).mkdir(parents=True, exist_ok=True)
    sources, ignored = list_sources(inputs)
    settings = _prepare_settings(salt, sources, image_size, shard_size_mb, dedupe)
    writer = _CorpusWriter.open(
        output_dir, settings, ignored, start_time, write_path_map=write_path_map, on_shard_written=on_shard_written
    )
    first = writer.next_source
    if first > 0:
        logger.info("Resuming after %d of %d files (%d shards kept)", first, len(sources), len(writer.state["shards"]))
    bar = tqdm(total=len(sources), initial=first, unit="file", desc="Preparing corpus", disable=not progress)
    tasks = ((source, image_size, salt) for source in sources[first:])
    for index, result in enumerate(_ordered_map(prepare_source, tasks, num_workers), start=first):
        bar.update()
        if writer.add(result, sources[index]):
            writer.write_shard(index + 1)
        bar.set_postfix(written=writer.report.videos_written, skipped=writer.report.num_skipped, refresh=False)
    bar.close()
    if writer.rows:
        writer.write_shard(len(sources))
    writer.save_state(len(sources), complete=True)
    _write_json_atomic(output_dir / REPORT_FILE, asdict(writer.report))
    if writer.report.num_skipped:
        logger.warning("Corpus at %s: %s", output_dir, writer.report.summary())
    return writer.report


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def corpus_data_files(path: str | os.PathLike) -> str | list[str]:
    """The parquet files of a corpus: a local folder's `data/*.parquet` (sorted), or a remote glob (fsspec)."""
    path = os.fspath(path)
    if path.endswith(".parquet") or "*" in path:
        return path
    if "://" not in path:
        files = sorted(str(p) for p in (Path(path) / DATA_DIR).glob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"{path} has no {DATA_DIR}/*.parquet: prepare it with scripts/prepare_corpus.py")
        return files
    return f"{path.rstrip('/')}/{DATA_DIR}/*.parquet"


def check_shards(path: str | os.PathLike) -> tuple[int, dict[str, str]]:
    """A local corpus's shard count and its damaged shards ({file: reason}), found by reading each parquet
    footer (a few KiB: a truncated or overwritten shard has none, and `datasets` would fail on it part-way
    through a run). A remote corpus is not read here: (0, {})."""
    files = corpus_data_files(path)
    if isinstance(files, str):
        return 0, {}
    damaged = {}
    for file in files:
        try:
            pq.read_metadata(file)
        except (OSError, pa.ArrowException) as error:
            damaged[file] = str(error).splitlines()[0]
    return len(files), damaged


def load_corpus(
    path: str | os.PathLike,
    streaming: bool = False,
    cache_dir: str | os.PathLike | None = None,
    storage_options: dict | None = None,
    exclude: Iterable[str] = (),
) -> Dataset | IterableDataset:
    """A prepared corpus as a `datasets.Dataset` (map-style) or, with `streaming=True`, an `IterableDataset`.

    `path` is a local corpus folder, a remote one (`hf://datasets/org/name`, `s3://bucket/name`, any
    fsspec URL; credentials through `storage_options` or the usual environment) or a parquet glob.
    A streamed corpus has one shard per parquet file (`num_shards`). `exclude`: a local corpus's shard files
    to leave out (the damaged ones `check_shards` found).
    """
    files, exclude = corpus_data_files(path), set(exclude)
    if exclude:
        files = [file for file in files if file not in exclude]
    return load_dataset(
        "parquet",
        data_files=files,
        split="train",
        streaming=streaming,
        cache_dir=None if cache_dir is None else os.fspath(cache_dir),
        storage_options=storage_options,
    )


def split_corpus_by_node(
    dataset: Dataset | IterableDataset, rank: int, world_size: int, strategy: str = "auto"
) -> Dataset | IterableDataset:
    """This process's part of the corpus: `datasets.distributed.split_dataset_by_node`.

    Map-style: contiguous slices of equal size (+-1). Streaming: whole shards per process when the shard
    count is a multiple of `world_size`, else every process reads all shards and keeps every
    `world_size`-th row (logged). Either way the parts are disjoint and together complete. Shuffle
    (with the same seed on every process) before splitting.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if isinstance(dataset, IterableDataset) and strategy == "auto" and dataset.num_shards % world_size:
        logger.info(
            "%d shards for %d processes: each process reads every shard and keeps 1 row in %d; prepare a "
            "multiple of %d shards to read only one's own", dataset.num_shards, world_size, world_size, world_size,
        )  # fmt: skip
    return split_dataset_by_node(dataset, rank=rank, world_size=world_size, strategy=strategy)


def shuffle_corpus(
    dataset: Dataset | IterableDataset, seed: int, buffer_size: int = 1000
) -> Dataset | IterableDataset:
    """Shuffle with `seed`: a stream shuffles its shard order and draws from a `buffer_size`-row buffer
    (<= 1: shard order only, rows in their shard's order -- the setting a resumed stream continues exactly);
    a map-style corpus is permuted. Call `set_epoch(epoch)` on a stream for a new order each epoch."""
    if isinstance(dataset, IterableDataset):
        return dataset.shuffle(seed=seed, buffer_size=max(1, buffer_size))
    return dataset.shuffle(seed=seed)


__all__ = [
    "CORPUS_SCHEMA",
    "PrepareReport",
    "Source",
    "check_shards",
    "corpus_data_files",
    "crop_to_mask",
    "dicom_frame_rate",
    "encode_clip",
    "fit_to_square",
    "list_sources",
    "load_corpus",
    "prepare_corpus",
    "prepare_source",
    "resolve_salt",
    "salted_hash",
    "sector_mask",
    "shuffle_corpus",
    "split_corpus_by_node",
]
