"""Pretraining corpus: preparation from a mixed folder (AVI, MP4, DICOM), de-identification, sector
masking, resuming, dedupe, and reading it back map-style, streamed, split across processes and resumed."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from data_fixtures import truncate

import corpus_echoai as corpus
from data_echoai import row_frames, row_pixel_values
from synthetic_echonet import write_avi
from training_echoai import TrainingClips
from video_io_echoai import decode_video_frames, write_video
from video_processing_echoai import EchoAIVideoProcessor, compute_mean_std


pytest.importorskip("pydicom", reason="pydicom is needed for the DICOM cases (pip install -e .[dicom])")
from dicom_fixtures import PHI, PHI_IN_PATHS, TEXT, echo_frames, fan_mask, write_dicom  # noqa: E402


SALT = "test-salt-not-secret"
IMAGE_SIZE = 64


def grey_video(num_frames: int, height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(height, width))
    return np.stack([np.roll(base, t, axis=1) for t in range(num_frames)]).astype(np.uint8)


EXPECTED_SKIPS = {
    "unreadable video (FFmpeg cannot open it)": 1,
    "unreadable DICOM": 1,
    "single-frame image": 1,
    "not ultrasound (Modality CT)": 1,
    "DICOM pixel data not decodable (Explicit VR Little Endian)": 1,
}


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mixed") / "echo_sources"
    (root / "avi").mkdir(parents=True)
    write_avi(root / "avi" / "a.avi", grey_video(40, IMAGE_SIZE, IMAGE_SIZE, 0), fps=50)  # compliant: remuxed
    write_avi(root / "avi" / "b.avi", grey_video(36, IMAGE_SIZE, IMAGE_SIZE, 1), fps=25)
    write_avi(root / "avi" / "c.avi", grey_video(30, 80, 100, 2), fps=30)  # other size: re-encoded
    write_video(root / "clip.mp4", grey_video(24, 48, 64, 3), fps=30)
    (root / "avi" / "corrupt.avi").write_bytes(b"RIFF" + bytes(range(256)) * 8)
    (root / "notes.txt").write_text("not a video")
    study = root / "Doe_Jane_PID998877"
    study.mkdir()
    write_dicom(study / "PID998877_cine.dcm", echo_frames(30, 0))
    write_dicom(study / "IM_0002", echo_frames(24, 1), jpeg=True, regions=True)  # no extension: found by preamble
    write_dicom(study / "still.dcm", echo_frames(1, 2))
    write_dicom(study / "ct.dcm", echo_frames(8, 3), modality="CT")
    (study / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 64)
    write_dicom(study / "cut.dcm", echo_frames(20, 4))
    truncate(study / "cut.dcm", 0.5)  # an interrupted copy: header intact, pixel data cut
    return root


def prepare(inputs, output_dir, **kwargs) -> corpus.PrepareReport:
    kwargs = {"salt": SALT, "image_size": IMAGE_SIZE, "progress": False, **kwargs}
    return corpus.prepare_corpus([inputs] if isinstance(inputs, Path) else inputs, output_dir, **kwargs)


def rows(output_dir: Path) -> list[dict]:
    return [
        row for shard in sorted((output_dir / "data").glob("*.parquet")) for row in pq.read_table(shard).to_pylist()
    ]


@pytest.fixture(scope="module")
def prepared(mixed_folder, tmp_path_factory) -> tuple[Path, corpus.PrepareReport]:
    output_dir = tmp_path_factory.mktemp("corpus") / "out"
    return output_dir, prepare(mixed_folder, output_dir, shard_size_mb=0.05)  # 50 KiB: several shards


def test_counts_and_skip_reasons(prepared):
    output_dir, report = prepared
    assert report.files_found == 11 and report.ignored_files == 1
    assert report.written_by_format == {"avi": 3, "mp4": 1, "dicom": 2}
    assert report.skipped == EXPECTED_SKIPS
    assert report.num_shards == len(list((output_dir / "data").glob("*.parquet"))) > 1
    saved = json.loads((output_dir / corpus.REPORT_FILE).read_text())
    assert saved["videos_written"] == 6 and saved["skipped"] == EXPECTED_SKIPS
    table = rows(output_dir)
    assert len(table) == 6 and len({r["video_id"] for r in table}) == 6
    by_format = {}
    for row in table:
        by_format.setdefault(row["source_format"], []).append(row)
        assert (row["height"], row["width"]) == (IMAGE_SIZE, IMAGE_SIZE)
    assert sorted(r["num_frames"] for r in by_format["avi"]) == [30, 36, 40]
    assert sorted((r["num_frames"], r["frame_rate"]) for r in by_format["dicom"]) == [(24, 50.0), (30, 50.0)]
    # Both DICOMs are one study: one group, a salted hash rather than the UID.
    assert len({r["group"] for r in by_format["dicom"]}) == 1
    assert report.hours_of_video == pytest.approx(sum(r["num_frames"] / r["frame_rate"] for r in table) / 3600)


def test_rows_decode_through_the_processor(prepared):
    output_dir, _ = prepared
    processor = EchoAIVideoProcessor(num_frames=8, period=2, image_size=IMAGE_SIZE)
    dataset = corpus.load_corpus(output_dir, cache_dir=output_dir.parent / "hf_cache")
    assert len(dataset) == 6
    for row in dataset:
        pixel_values = row_pixel_values(row, processor, torch.Generator().manual_seed(0))
        assert pixel_values.shape == (8, 3, IMAGE_SIZE, IMAGE_SIZE)
        clips = row_pixel_values(row, processor, training=False, num_clips=3)
        assert clips.shape == (3, 8, 3, IMAGE_SIZE, IMAGE_SIZE)
    # Same seed, same clip; and TrainingClips reads corpus rows (their `video` bytes).
    row = dataset[0]
    first = row_pixel_values(row, processor, torch.Generator().manual_seed(5))
    assert torch.equal(first, row_pixel_values(row, processor, torch.Generator().manual_seed(5)))
    clips = TrainingClips(dataset, processor, seed=1)
    clips.set_epoch(0)
    item = clips[0]
    assert item["error"] is None and item["pixel_values"].shape == (8, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.equal(item["pixel_values"], clips[0]["pixel_values"])
    # Normalisation statistics from corpus rows: the same whether the rows come as a table or a stream.
    table = compute_mean_std(dataset, num_videos=6, read_frames=row_frames)
    stream = compute_mean_std(corpus.load_corpus(output_dir, streaming=True), read_frames=row_frames)
    np.testing.assert_allclose(table, stream, rtol=1e-12)
    assert 0.0 < table[0][0] < 1.0 and table[1][0] > 0.0


def test_remuxed_avi_keeps_its_frames(mixed_folder, prepared):
    output_dir, _ = prepared
    row = next(r for r in rows(output_dir) if r["source_format"] == "avi" and r["num_frames"] == 40)
    original = decode_video_frames(mixed_folder / "avi" / "a.avi", np.arange(40)).frames
    np.testing.assert_array_equal(decode_video_frames(row["video"], np.arange(40)).frames, original)
    assert row["frame_rate"] == 50.0


def test_sector_kept_and_text_outside_it_masked(prepared):
    output_dir, _ = prepared
    source = echo_frames(30, 0)
    mask = corpus.sector_mask(source)
    fan = fan_mask()
    assert not mask[TEXT].any(), "the burnt-in text must be outside the detected sector"
    assert not mask[100:, :].any() or not mask[112:, :].any()  # the ECG trace is dropped
    assert (mask & fan).sum() / fan.sum() > 0.97 and (mask & ~fan).sum() / fan.sum() < 0.03
    row = next(r for r in rows(output_dir) if r["source_format"] == "dicom" and r["num_frames"] == 30)
    decoded = decode_video_frames(row["video"], np.arange(30)).frames.astype(int)  # (T, S, S)
    # Where a source pixel lands in the output: the crop to the sector's bounding box, resize and pad.
    ys, xs = np.nonzero(mask)

    def to_output(image: np.ndarray) -> np.ndarray:
        crop = image[None, ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.uint8) * 255
        return corpus.fit_to_square(crop, IMAGE_SIZE)[0] > 128

    sector, text = to_output(mask), np.zeros_like(mask)
    text[TEXT] = True
    text = to_output(text)
    assert text.sum() > 20  # the text lies inside the sector's bounding box: only the mask removes it
    assert decoded[:, text].max() <= 2, "burnt-in text outside the sector must be black"
    # Everything more than one JPEG block (8 px) from the sector is black.
    near = torch.nn.functional.max_pool2d(torch.from_numpy(sector)[None].float(), 17, 1, 8)[0].numpy() > 0
    assert (~near).sum() > 0.1 * IMAGE_SIZE**2 and decoded[:, ~near].max() <= 2
    assert decoded[:, sector].mean() > 60  # the speckle is kept


def test_no_phi_in_any_output(mixed_folder, tmp_path, caplog, capsys):
    spec = importlib.util.spec_from_file_location(
        "prepare_script", Path(__file__).parents[1] / "scripts/prepare_corpus.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    output_dir = tmp_path / "deid"
    with caplog.at_level(logging.DEBUG):
        script.main([str(mixed_folder), "--output_dir", str(output_dir), "--salt", SALT, "--image_size", "64",
                     "--num_workers", "1", "--no_progress"])  # fmt: skip
    captured = capsys.readouterr()
    texts = [caplog.text, captured.out, captured.err]
    for path in output_dir.rglob("*"):
        texts.append(str(path.relative_to(tmp_path)))
        if path.is_file():
            texts.append(path.read_bytes().decode("latin-1"))
    for row in rows(output_dir):  # parquet columns may be compressed: check the values too
        texts.append(repr({k: v for k, v in row.items() if k != "video"}))
        texts.append(row["video"].decode("latin-1"))
    assert "videos written" in captured.out
    for value in [*PHI.values(), *PHI_IN_PATHS, str(mixed_folder)]:
        for text in texts:
            assert value not in text, f"{value!r} leaked into the output"


def test_salt_is_required(mixed_folder, tmp_path, monkeypatch):
    monkeypatch.delenv(corpus.SALT_ENV, raising=False)
    with pytest.raises(ValueError, match="ECHOAI_CORPUS_SALT"):
        corpus.prepare_corpus([mixed_folder], tmp_path / "out", progress=False)
    monkeypatch.setenv(corpus.SALT_ENV, SALT)
    assert corpus.resolve_salt(None) == SALT


def test_path_map_only_on_request(mixed_folder, prepared, tmp_path):
    output_dir, _ = prepared
    assert not (output_dir / corpus.PATH_MAP_FILE).exists()
    report = prepare(mixed_folder, tmp_path / "mapped", write_path_map=True)
    lines = [json.loads(line) for line in (tmp_path / "mapped" / corpus.PATH_MAP_FILE).read_text().splitlines()]
    assert len(lines) == report.videos_written
    assert {line["video_id"] for line in lines} == {r["video_id"] for r in rows(tmp_path / "mapped")}


def test_interrupted_then_resumed_gives_the_same_corpus(mixed_folder, prepared, tmp_path):
    reference, reference_report = prepared

    def interrupt(index: int) -> None:
        if index == 1:
            raise KeyboardInterrupt

    output_dir = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        prepare(mixed_folder, output_dir, shard_size_mb=0.05, on_shard_written=interrupt)
    assert len(list((output_dir / "data").glob("*.parquet"))) == 2
    (output_dir / "data" / "train-00002.parquet").write_bytes(b"half-written shard")  # a shard past the state
    report = prepare(mixed_folder, output_dir, shard_size_mb=0.05)
    assert rows(output_dir) == rows(reference)
    assert {k: v for k, v in vars(report).items() if k != "seconds"} == {
        k: v for k, v in vars(reference_report).items() if k != "seconds"
    }
    with pytest.raises(ValueError, match="image_size"):
        prepare(mixed_folder, output_dir, shard_size_mb=0.05, image_size=32)


def test_dedupe_drops_an_exact_copy(mixed_folder, tmp_path):
    copies = tmp_path / "copies"
    copies.mkdir()
    shutil.copy(mixed_folder / "avi" / "a.avi", copies / "a_copy.avi")
    report = prepare([mixed_folder, copies], tmp_path / "dedupe", dedupe=True)
    assert report.duplicates_dropped == 1 and report.videos_written == 6
    assert prepare([mixed_folder, copies], tmp_path / "kept").videos_written == 7


def test_two_processes_see_disjoint_complete_parts(prepared):
    output_dir, _ = prepared
    everything = {r["video_id"] for r in rows(output_dir)}
    dataset = corpus.load_corpus(output_dir, cache_dir=output_dir.parent / "hf_cache")
    stream = corpus.load_corpus(output_dir, streaming=True)
    assert stream.num_shards > 1
    for source in (dataset, stream, corpus.shuffle_corpus(stream, seed=3, buffer_size=4)):
        parts = [{r["video_id"] for r in corpus.split_corpus_by_node(source, rank, 2)} for rank in (0, 1)]
        assert parts[0] and parts[1] and not parts[0] & parts[1] and parts[0] | parts[1] == everything
    # An odd world size against the shard count: split by rows, still disjoint and complete.
    parts = [{r["video_id"] for r in corpus.split_corpus_by_node(stream, rank, 5)} for rank in range(5)]
    assert sum(map(len, parts)) == len(everything) and set().union(*parts) == everything


def test_streaming_resumes_where_it_stopped(prepared):
    output_dir, _ = prepared
    order = [r["video_id"] for r in corpus.load_corpus(output_dir, streaming=True)]
    stream = corpus.load_corpus(output_dir, streaming=True)
    k = 4
    iterator = iter(stream)
    seen = [next(iterator)["video_id"] for _ in range(k)]
    state = stream.state_dict()
    resumed = corpus.load_corpus(output_dir, streaming=True)
    resumed.load_state_dict(state)
    assert seen + [r["video_id"] for r in resumed] == order
