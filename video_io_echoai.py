"""Video input for EchoAI: open a video file or its bytes, read its frame rate and length, decode only the
frames a clip needs, as grey uint8.

Every reader in EchoAI goes through `open_video`: the video processor (files and a prepared corpus's bytes),
the EchoNet-Dynamic and video-folder loaders (which check each file once), corpus preparation and prediction.
It returns a `VideoReader` (AVI, MP4: PyAV) or, for a DICOM file (by its .dcm / .dicom extension or the
"DICM" preamble, `is_dicom`), a `dicom_echoai.DicomReader` with the same interface and error vocabulary.

* Sources: a path (`str` / `os.PathLike`) or the bytes of a whole file (a corpus row's `video` column).
* Frame rate (`frame_rate`): the stream's average rate, else FFmpeg's guess from its timestamps; None when
  neither is known. The timestamp base rate is not a frame rate (it is only a grid the timestamps fit) and is
  never reported as one; without a rate, frames are numbered by counting from the start instead of seeking.
* Frame count: the container header's (AVI, MP4), else counted from packets without decoding.
* Decoding: seek to the key frame at or before the first wanted frame, decode forward, stop after the last
  wanted one. In an intra-only stream (MJPEG, as EchoNet-Dynamic's AVIs and the corpus format: every frame
  stands alone) the packets of unwanted frames are skipped undecoded, so a 16-frame, period-2 clip decodes 16
  frames, not 31. Frame numbers come from presentation timestamps, so they stay right after a seek; a stream
  without timestamps is decoded from the start, counting frames.
* Errors: one exception, `VideoDecodingError`, whose message names the video (its path, or the name given
  for bytes), what is wrong (`file not found`, `empty file`, `not a video`, `truncated after frame k`,
  `corrupt data at frame k`) and the fix. `kind` holds that phrase alone, for callers that count reasons.

This file imports only the standard library, numpy and PyAV (and `dicom_echoai` when a DICOM is opened): it
ships beside `video_processing_echoai.py` as Hub remote code.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np


VIDEO_EXTENSIONS = (".avi", ".mp4")
DICOM_EXTENSIONS = (".dcm", ".dicom")
VideoSource = str | os.PathLike | bytes

# The kinds of `VideoDecodingError`, the first words of its reason.
NOT_FOUND, EMPTY, NOT_A_VIDEO, NO_VIDEO_STREAM, NO_FRAMES, TRUNCATED, CORRUPT = (
    "file not found",
    "empty file",
    "not a video",
    "no video stream",
    "no frames",
    "truncated",
    "corrupt data",
)
_DEFAULT_FIX = (
    "re-export or re-copy the file, or remove it from the dataset (the EchoNet loader "
    "`data_echoai.load_echonet_dynamic` reports and excludes such files)"
)


class VideoDecodingError(RuntimeError):
    """A video that cannot be used: missing, empty, not a video, truncated or corrupt.

    Attributes:
        path: the video's path, or the name given for bytes.
        kind: what is wrong, one of the module's phrases (`EMPTY`, `NOT_A_VIDEO`, `TRUNCATED`, ...).
        reason: `kind` with its details, in a few words.
    """

    def __init__(self, path: str | os.PathLike, reason: str, fix: str | None = None, kind: str | None = None):
        self.path, self.reason, self.kind = os.fspath(path), reason, kind or reason
        super().__init__(f"{self.path}: {reason}. Fix: {fix or _DEFAULT_FIX}.")


@dataclass(frozen=True)
class VideoInfo:
    """What the container header says about a video's first video stream."""

    num_frames: int
    fps: float  # 0.0 when the stream states no frame rate
    height: int
    width: int


@dataclass(frozen=True)
class DecodedFrames:
    """Frames returned by `VideoReader.read`, and how many frames the decoder had to produce."""

    frames: np.ndarray  # (N, H, W) uint8, in the order of the requested indices
    num_decoded: int
    num_video_frames: int


def frame_rate(stream: av.video.stream.VideoStream) -> Fraction | None:
    """Frames per second of a stream: its average rate, else FFmpeg's guess; None when neither is known."""
    rate = stream.average_rate or stream.guessed_rate
    return Fraction(rate) if rate else None


_FULL_RANGE = 2  # AVCOL_RANGE_JPEG


def grey_frame(frame: av.VideoFrame) -> np.ndarray:
    """The frame's luma as (H, W) uint8 in full range, what `frame.to_ndarray(format="gray")` gives.

    For YUV frames the luma plane is copied directly instead of converting through swscale; limited-range
    ("TV", 16-235) luma is expanded to 0-255 as swscale does.
    """
    name = frame.format.name
    if not (name.startswith(("yuv", "nv")) or name == "gray"):
        return frame.to_ndarray(format="gray")
    plane = frame.planes[0]
    luma = np.frombuffer(plane, dtype=np.uint8).reshape(plane.height, plane.line_size)[:, : plane.width]
    if name == "gray" or name.startswith("yuvj") or frame.color_range == _FULL_RANGE:
        return luma.copy()
    return np.clip(np.round((luma.astype(np.float32) - 16.0) * (255.0 / 219.0)), 0, 255).astype(np.uint8)


def is_dicom(source: VideoSource) -> bool:
    """Whether a path or a file's bytes is DICOM: the "DICM" preamble at byte 128, or a .dcm / .dicom name."""
    if isinstance(source, bytes):
        return source[128:132] == b"DICM"
    if os.fspath(source).lower().endswith(DICOM_EXTENSIONS):
        return True
    try:
        with open(source, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def check_source(source: VideoSource, name: str) -> None:
    """Raise `VideoDecodingError` for a path that does not exist and for an empty file or empty bytes."""
    if not isinstance(source, bytes) and not os.path.exists(source):
        raise VideoDecodingError(name, NOT_FOUND, fix="check the path (and `--data_dir`)")
    if (len(source) if isinstance(source, bytes) else os.path.getsize(source)) == 0:
        raise VideoDecodingError(name, f"{EMPTY} (0 bytes)", kind=EMPTY)


def _open_container(source: VideoSource, name: str) -> av.container.InputContainer:
    check_source(source, name)
    opened = io.BytesIO(source) if isinstance(source, bytes) else os.fspath(source)
    try:
        container = av.open(opened)
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as error:
        raise VideoDecodingError(name, f"{NOT_A_VIDEO} (FFmpeg cannot open it: {error})", kind=NOT_A_VIDEO) from error
    if not container.streams.video:
        container.close()
        raise VideoDecodingError(name, f"{NOT_A_VIDEO} (it has no video stream)", kind=NO_VIDEO_STREAM)
    return container


def _count_frames(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> int:
    """Frames in the stream: the header's count (AVI, MP4), else counted from packets without decoding."""
    if stream.frames > 0:
        return int(stream.frames)
    count = sum(1 for packet in container.demux(stream) if packet.size)
    container.seek(0)
    return count


class VideoReader:
    """An open video (a path or a file's bytes): its header facts, and any of its frames decoded on request.

    Use as a context manager, or call `close`. `name` names the video in errors (default: its path, or
    "video bytes"); for bytes of a de-identified corpus, pass an id rather than a source path.

    Raises (on opening):
        VideoDecodingError: the file is missing, empty, not a video, or its video stream has no frames.
    """

    def __init__(self, source: VideoSource, name: str | None = None):
        self.name = name or ("video bytes" if isinstance(source, bytes) else os.fspath(source))
        self.container = _open_container(source, self.name)
        self.stream = self.container.streams.video[0]
        self.rate = frame_rate(self.stream)
        self.num_frames = _count_frames(self.container, self.stream)
        if self.num_frames < 1:
            self.close()
            raise VideoDecodingError(self.name, f"{NOT_A_VIDEO} (its video stream has {NO_FRAMES})", kind=NO_FRAMES)

    @property
    def info(self) -> VideoInfo:
        context = self.stream.codec_context
        fps = float(self.rate) if self.rate else 0.0
        return VideoInfo(num_frames=self.num_frames, fps=fps, height=context.height, width=context.width)

    def close(self) -> None:
        self.container.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def read(self, frame_indices: Sequence[int] | np.ndarray) -> DecodedFrames:
        """Decode only the frames at `frame_indices` (any order, repeats allowed) as grey uint8 (N, H, W).

        Raises:
            IndexError: a wanted frame lies past the frame count the header announces.
            VideoDecodingError: corrupt data, or the stream ends before a wanted frame (a truncated file).
        """
        indices = np.asarray(frame_indices, dtype=np.int64).reshape(-1)
        if indices.size == 0 or indices.min() < 0:
            raise ValueError(f"frame_indices must be non-empty and non-negative, got {indices.tolist()}")
        wanted, first = set(indices.tolist()), int(indices.min())
        stream, rate = self.stream, self.rate
        intra_only = bool(getattr(stream.codec_context.codec, "intra_only", False)) and rate is not None
        can_seek = first > 0 and rate is not None and stream.time_base is not None
        attempts = [(True, intra_only), (False, intra_only)] if can_seek else [(False, intra_only)]
        if intra_only:  # a stream whose packets lack timestamps after all: decode everything, counting
            attempts.append((False, False))
        num_decoded = 0
        for seek, skip_unwanted in attempts:
            self._rewind(first if seek else 0)
            frames, position, decoded, usable = self._decode_pass(wanted, seek, skip_unwanted)
            num_decoded += decoded
            if usable:
                break
        self._check_complete(wanted, frames, position)
        return DecodedFrames(np.stack([frames[i] for i in indices.tolist()]), num_decoded, self.num_frames)

    def read_all(self) -> np.ndarray:
        """Every frame, grey (T, H, W) uint8."""
        return self.read(np.arange(self.num_frames)).frames

    def _rewind(self, frame: int) -> None:
        """Seek to the key frame at or before `frame` (0: the start)."""
        if frame == 0:
            self.container.seek(0)
            return
        start_pts, time_base = self.stream.start_time or 0, self.stream.time_base
        self.container.seek(start_pts + int(frame / self.rate / time_base), stream=self.stream, backward=True)

    def _frame_number(self, pts: int | None) -> int | None:
        if pts is None or self.rate is None:
            return None
        return round((pts - (self.stream.start_time or 0)) * self.stream.time_base * self.rate)

    def _decode_pass(
        self, wanted: set[int], seeked: bool, skip_unwanted: bool
    ) -> tuple[dict[int, np.ndarray], int, int, bool]:
        """One pass forward from the current position, keeping the wanted frames: an intra-only stream
        (`skip_unwanted`) decodes only the wanted packets, any other stream every frame it meets.

        Returns (frames by number, the last frame number reached, frames decoded, whether the pass was usable:
        it had timestamps and its seek did not land past the first wanted frame).
        """
        first, last = min(wanted), max(wanted)
        frames: dict[int, np.ndarray] = {}
        position, num_decoded = -1, 0
        try:
            for number, decode in self._packets() if skip_unwanted else self._frames():
                if not skip_unwanted:
                    num_decoded += 1  # decoded already, wanted or not
                if (skip_unwanted or seeked) and (number is None or (not frames and number > first)):
                    return frames, position, num_decoded, False
                position = number if number is not None else position + 1
                if position in wanted:
                    for frame in decode():
                        num_decoded += skip_unwanted  # a full decode counted it above
                        frames[position] = grey_frame(frame)
                if position >= last:
                    break
        except av.FFmpegError as error:
            raise self._corrupt(position, error) from error
        return frames, position, num_decoded, True

    def _packets(self) -> Iterator[tuple[int | None, Callable[[], list[av.VideoFrame]]]]:
        """(frame number, its decoder) per packet, undecoded."""
        for packet in self.container.demux(self.stream):
            if packet.size:  # size 0: the demuxer's end-of-stream marker
                yield self._frame_number(packet.pts), packet.decode

    def _frames(self) -> Iterator[tuple[int | None, Callable[[], list[av.VideoFrame]]]]:
        """(frame number, the frame) per decoded frame."""
        if not self.stream.codec_context.is_open:  # frame threads for inter-coded streams, set before opening
            self.stream.thread_type = "AUTO"
        for frame in self.container.decode(self.stream):
            yield self._frame_number(frame.pts), lambda frame=frame: [frame]

    def _corrupt(self, position: int, error: Exception) -> VideoDecodingError:
        return VideoDecodingError(self.name, f"{CORRUPT} at frame {position + 1} ({error})", kind=CORRUPT)

    def _check_complete(self, wanted: set[int], frames: dict[int, np.ndarray], position: int) -> None:
        missing = sorted(wanted - frames.keys())
        if missing and missing[0] >= self.num_frames:
            raise IndexError(f"{self.name}: frame {missing[0]} requested from a video of {self.num_frames} frames")
        if missing:
            where = f"after frame {position}" if position >= 0 else "before its first frame"
            raise VideoDecodingError(
                self.name,
                f"{TRUNCATED} {where}: frame {missing[0]} was requested and the header announces "
                f"{self.num_frames} frames",
                kind=TRUNCATED,
            )


def open_video(source: VideoSource, name: str | None = None):
    """An open video: a `dicom_echoai.DicomReader` for DICOM (`is_dicom`), else a `VideoReader`.

    Both have `name`, `num_frames`, `rate`, `info`, `read`, `read_all` and `close`, and raise `VideoDecodingError`.
    """
    if isinstance(source, bytes) or not os.fspath(source).lower().endswith(VIDEO_EXTENSIONS):
        if is_dicom(source):
            try:  # loaded as Hub remote code, beside this file
                from .dicom_echoai import DicomReader
            except ImportError:  # installed as top-level modules
                from dicom_echoai import DicomReader
            return DicomReader(source, name)
    return VideoReader(source, name)


def probe_video(source: VideoSource, check_last_frame: bool = False, name: str | None = None) -> VideoInfo:
    """Read a video's header (cheap); with `check_last_frame`, also decode its last frame. A DICOM is decoded whole.

    Decoding the last frame (a seek and a few frames' decode) catches truncated files whose header still
    announces the full length, which a header read alone cannot.
    """
    with open_video(source, name) as reader:
        if check_last_frame:
            reader.read([reader.num_frames - 1])
        return reader.info


def decode_video_frames(
    source: VideoSource, frame_indices: Sequence[int] | np.ndarray, name: str | None = None
) -> DecodedFrames:
    """Decode only the frames at `frame_indices` of a video: `open_video(source).read(frame_indices)`."""
    with open_video(source, name) as reader:
        return reader.read(frame_indices)


def decode_all_frames(source: VideoSource, name: str | None = None) -> np.ndarray:
    """Every frame of a video, grey (T, H, W) uint8."""
    with open_video(source, name) as reader:
        return reader.read_all()


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray,
    fps: int = 30,
    codec: str = "mpeg4",
    gop_size: int = 12,
    pix_fmt: str = "yuv420p",
):
    """Write grey (T, H, W) uint8 frames with an inter-frame codec (a key frame every `gop_size` frames).

    The counterpart of EchoNet-style MJPEG (see `corpus_echoai.encode_clip`): videos whose decoding must seek
    to a key frame and decode forward, for tests and benchmarks. `codec="ffv1", pix_fmt="gray"` stores the
    frames losslessly (they decode to the same bytes).
    """
    with av.open(os.fspath(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.height, stream.width = frames.shape[1:]
        stream.pix_fmt = pix_fmt
        stream.codec_context.gop_size = gop_size
        for frame in frames:
            if pix_fmt == "gray":
                image = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="gray")
            else:
                image = av.VideoFrame.from_ndarray(np.repeat(frame[:, :, None], 3, axis=2), format="rgb24")
            container.mux(stream.encode(image))
        container.mux(stream.encode())


__all__ = [
    "DICOM_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "DecodedFrames",
    "VideoDecodingError",
    "VideoInfo",
    "VideoReader",
    "check_source",
    "decode_all_frames",
    "decode_video_frames",
    "frame_rate",
    "grey_frame",
    "is_dicom",
    "open_video",
    "probe_video",
    "write_video",
]
