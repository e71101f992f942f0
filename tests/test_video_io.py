"""video_io_echoai: one reader for files and bytes, its frame rate, partial decoding and its error messages."""

from __future__ import annotations

import re
from fractions import Fraction

import numpy as np
import pytest
from data_fixtures import file_list, tiny_corpus, truncate

import corpus_echoai
from synthetic_echonet import write_avi
from video_io_echoai import VideoDecodingError, VideoReader, decode_video_frames, probe_video, write_video


@pytest.fixture(scope="module")
def echo_video(tmp_path_factory):
    """The tiny corpus's longest video (MJPEG AVI, every frame a key frame) and its frame count."""
    corpus = tiny_corpus(tmp_path_factory)
    row = file_list(corpus).sort_values("NumberOfFrames").iloc[-1]
    return corpus / "Videos" / f"{row.FileName}.avi", int(row.NumberOfFrames)


def noisy_ramp(num_frames: int, size: int = 48, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (np.arange(num_frames)[:, None, None] * 2 + rng.integers(0, 20, (num_frames, size, size))).astype(np.uint8)


@pytest.fixture(scope="module")
def inter_coded_video(tmp_path_factory):
    """MPEG-4 in MP4 at 24 fps, a key frame every 12 frames: decoding must seek and decode forward."""
    path = tmp_path_factory.mktemp("inter") / "gop24.mp4"
    write_video(path, noisy_ramp(90), fps=24, gop_size=12)
    return path, 90


@pytest.mark.parametrize("which", ["echo_video", "inter_coded_video"])
def test_bytes_and_path_give_identical_frames(request, which):
    path, num_frames = request.getfixturevalue(which)
    wanted = [0, 5, num_frames // 2, num_frames - 1, 5]
    from_path = decode_video_frames(path, wanted)
    from_bytes = decode_video_frames(path.read_bytes(), wanted)
    assert np.array_equal(from_bytes.frames, from_path.frames)
    assert from_bytes.num_decoded == from_path.num_decoded
    assert probe_video(path.read_bytes()) == probe_video(path)


@pytest.mark.parametrize("which", ["echo_video", "inter_coded_video"])
def test_a_clip_in_the_middle_seeks_and_equals_full_decoding(request, which):
    path, num_frames = request.getfixturevalue(which)
    start = num_frames // 2 - 7
    clip = np.arange(start, start + 31, 2)  # 16 frames, period 2, neither at the start nor at the end
    with VideoReader(path) as reader:
        everything = reader.read_all()
        decoded = reader.read(clip)  # the same open reader seeks back for a second read
    assert everything.shape[0] == num_frames
    assert np.array_equal(decoded.frames, everything[clip])
    # Seeked, not decoded from the start: at most one key-frame interval (12) before the clip's first frame.
    assert decoded.num_decoded <= 31 + 12 < start + 31


def test_frame_rate_is_the_stated_one_at_24_and_50_fps(tmp_path):
    frames = noisy_ramp(60)
    write_avi(tmp_path / "mjpeg24.avi", frames, fps=24)
    write_avi(tmp_path / "mjpeg50.avi", frames, fps=50)
    write_video(tmp_path / "mpeg4_24.mp4", frames, fps=24)
    for name, fps in (("mjpeg24.avi", 24), ("mjpeg50.avi", 50), ("mpeg4_24.mp4", 24)):
        info = probe_video(tmp_path / name)
        assert (info.fps, info.num_frames) == (fps, 60), name
        with VideoReader(tmp_path / name) as reader:
            assert reader.rate == Fraction(fps)
            # Frame numbers come from timestamps times the rate: a wrong rate would pick the wrong frames.
            assert np.array_equal(reader.read([41, 30]).frames, reader.read_all()[[41, 30]])
    # Corpus preparation reads the rate with the same reader.
    source = corpus_echoai.Source(str(tmp_path / "mjpeg24.avi"), "videos/mjpeg24.avi", "video")
    assert corpus_echoai.prepare_source((source, 48, "salt"))["row"]["frame_rate"] == 24.0


def assert_names_video_and_fix(error: VideoDecodingError, name: str) -> None:
    message = str(error)
    assert message.startswith(f"{name}: ") and "Fix: " in message


@pytest.mark.parametrize("as_bytes", [False, True])
def test_empty_file(tmp_path, as_bytes):
    path = tmp_path / "empty.avi"
    path.write_bytes(b"")
    source, name = (b"", "corpus clip 0123") if as_bytes else (path, str(path))
    with pytest.raises(VideoDecodingError, match=r"empty file \(0 bytes\)") as error:
        VideoReader(source, name=name if as_bytes else None)
    assert error.value.kind == "empty file"
    assert_names_video_and_fix(error.value, name)


@pytest.mark.parametrize("as_bytes", [False, True])
def test_text_file_renamed_avi_is_not_a_video(tmp_path, as_bytes):
    path = tmp_path / "notes.avi"
    path.write_text("not a video, only a text file with a video's extension\n")
    source = path.read_bytes() if as_bytes else path
    with pytest.raises(VideoDecodingError, match="not a video") as error:
        probe_video(source)
    assert error.value.kind == "not a video"
    assert_names_video_and_fix(error.value, "video bytes" if as_bytes else str(path))


def test_truncated_file_says_after_which_frame(tmp_path, echo_video):
    source, num_frames = echo_video
    path = tmp_path / "cut.avi"
    path.write_bytes(source.read_bytes())
    truncate(path, 0.5)
    with pytest.raises(VideoDecodingError, match=r"truncated after frame \d+") as error:
        probe_video(path, check_last_frame=True)  # the header still announces every frame
    assert error.value.kind == "truncated"
    assert_names_video_and_fix(error.value, str(path))
    last = int(re.search(r"truncated after frame (\d+)", str(error.value)).group(1))
    assert 0 < last < num_frames - 1
    # Frame k is the last one the file still holds (the cut may fall inside it): the frames before it decode as
    # in the whole file, the next one raises.
    before = np.arange(last)
    assert np.array_equal(decode_video_frames(path, before).frames, decode_video_frames(source, before).frames)
    with pytest.raises(VideoDecodingError, match=f"truncated after frame {last}"):
        decode_video_frames(path, [last + 1])
