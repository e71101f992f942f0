"""Loaders (EchoNet-Dynamic layout, video folders, cached synthetic corpus), the phantom, and batching."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest
import torch
from data_fixtures import TINY_NUM_VIDEOS, TINY_SEED, copy_corpus, file_list, tiny_corpus, truncate
from datasets import Value

from data_echoai import (
    EchoAIDataCollator,
    EchoNetTransform,
    load_echonet_dynamic,
    load_video_folder,
    rasterize_polygon,
    synthetic_echonet_dir,
)
from synthetic_echonet import (
    FILE_LIST_COLUMNS,
    PHANTOM_VERSION,
    TRACING_COLUMNS,
    make_synthetic_echonet,
    render_phantom,
    write_avi,
)
from video_io_echoai import decode_video_frames, probe_video, write_video
from video_processing_echoai import EchoAIVideoProcessor


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tiny_corpus(tmp_path_factory)


def small_processor(**kwargs) -> EchoAIVideoProcessor:
    return EchoAIVideoProcessor(num_frames=4, period=2, image_size=32, **kwargs)


# ---- the synthetic corpus ------------------------------------------------------------------------


def test_synthetic_corpus_has_echonet_layout(corpus):
    files = file_list(corpus)
    assert list(files.columns) == FILE_LIST_COLUMNS
    assert list(pd.read_csv(corpus / "VolumeTracings.csv").columns) == TRACING_COLUMNS
    assert len(files) == TINY_NUM_VIDEOS
    assert files["FileName"].str.fullmatch(r"0X[0-9A-F]{16}").all()
    assert files["Split"].value_counts().to_dict() == {"TRAIN": 6, "VAL": 1, "TEST": 1}
    assert files["EF"].between(10, 85).all()
    np.testing.assert_allclose(files["EF"], 100 * (files["EDV"] - files["ESV"]) / files["EDV"], atol=1e-4)
    for row in files.itertuples():
        info = probe_video(corpus / "Videos" / f"{row.FileName}.avi")
        assert (info.num_frames, info.fps, info.height, info.width) == (row.NumberOfFrames, row.FPS, 112, 112)
        assert 60 <= row.NumberOfFrames <= 200 and 24 <= row.FPS <= 60


def test_synthetic_corpus_is_deterministic_by_seed(tmp_path):
    first = make_synthetic_echonet(tmp_path / "a", num_videos=2, seed=7, num_workers=1)
    second = make_synthetic_echonet(tmp_path / "b", num_videos=2, seed=7, num_workers=2)
    other = make_synthetic_echonet(tmp_path / "c", num_videos=2, seed=8, num_workers=1)
    for name in ("FileList.csv", "VolumeTracings.csv"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
        assert (first / name).read_bytes() != (other / name).read_bytes()
    for row in file_list(first).itertuples():
        frames = [decode_video_frames(c / "Videos" / f"{row.FileName}.avi", range(row.NumberOfFrames)).frames
                  for c in (first, second)]  # fmt: skip
        assert np.array_equal(*frames)


def test_tracings_lie_on_the_dark_lv_cavity_of_their_frame(corpus):
    # The labels are only learnable if the traced geometry is what the pixels show.
    tracings = pd.read_csv(corpus / "VolumeTracings.csv")
    for (name, frame), rows in tracings.groupby(["FileName", "Frame"]):
        image = decode_video_frames(corpus / "Videos" / name, [frame]).frames[0].astype(float)
        chords = rows.iloc[1:]
        centres = np.round([(chords.X1 + chords.X2) / 2, (chords.Y1 + chords.Y2) / 2]).astype(int)
        inside = image[centres[1], centres[0]].mean()
        # Just past the lateral end of the widest chord lies the bright myocardial wall.
        widest = chords.assign(w=np.hypot(chords.X2 - chords.X1, chords.Y2 - chords.Y1)).sort_values("w").iloc[-1]
        direction = np.array([widest.X2 - widest.X1, widest.Y2 - widest.Y1]) / widest.w
        wall = np.array([widest.X2, widest.Y2]) + 3 * direction
        assert inside < 45 < image[int(round(wall[1])), int(round(wall[0]))]


def _speckle_residual(frame: np.ndarray) -> np.ndarray:
    """Lateral tissue beside the LV minus its 5x5 local mean: the speckle, without anatomy or gain."""
    patch = frame[56:90, 88:108].astype(np.float64)
    padded = np.pad(patch, 2, mode="edge")
    local = sum(padded[i : i + patch.shape[0], j : j + patch.shape[1]] for i in range(5) for j in range(5)) / 25
    return (patch - local)[2:-2, 2:-2].ravel()


@pytest.mark.parametrize("seed", [21, 22])
def test_phantom_speckle_decorrelates_over_time(seed):
    # A speckle pattern shared by every frame would let a model recognise the video instead of reading
    # the heart: neighbouring frames may look alike, frames 40 apart must not.
    speckle = [_speckle_residual(frame) for frame in render_phantom(np.random.SeedSequence(seed)).frames]

    def correlation(lag: int) -> float:
        return np.mean([np.corrcoef(speckle[t], speckle[t + lag])[0, 1] for t in range(0, len(speckle) - 40, 5)])

    assert correlation(1) > 0.3
    assert abs(correlation(40)) < 0.1


def test_phantom_videos_decode_with_neutral_chroma(tmp_path):
    # Grey frames must decode grey: R = G = B (EchoNet's videos are 3-channel grey).
    frames = np.tile(np.linspace(0, 255, 112).round().astype(np.uint8), (3, 112, 1))
    frames[1] = np.random.default_rng(0).integers(0, 256, size=(112, 112), dtype=np.uint8)
    write_avi(tmp_path / "grey.avi", frames, fps=50)
    with av.open(str(tmp_path / "grey.avi")) as container:
        decoded = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]).astype(int)
    assert decoded.shape == (3, 112, 112, 3)
    assert np.abs(decoded[..., 0] - decoded[..., 1]).max() <= 1
    assert np.abs(decoded[..., 2] - decoded[..., 1]).max() <= 1
    assert np.abs(decoded[0, ..., 1] - frames[0]).max() <= 2


def test_tracings_list_es_first_and_ed_last(corpus):
    # EchoNet-Dynamic's loader (echonet.datasets.Echo) takes a video's last traced frame as the large
    # (diastolic) one and its first as the small one; EchoAI decides by volume. Both must agree.
    dataset = load_echonet_dynamic(corpus)
    tracings = pd.read_csv(corpus / "VolumeTracings.csv")
    for split in dataset.values():
        for row in split:
            frames = tracings.loc[tracings.FileName == row["FileName"] + ".avi", "Frame"]
            blocks = frames[frames.ne(frames.shift())].tolist()  # one entry per contiguous block
            assert blocks == [row["ESFrame"], row["EDFrame"]]


def test_synthetic_echonet_dir_caches_atomically(tmp_path):
    path = synthetic_echonet_dir(num_videos=2, seed=1, cache_dir=tmp_path)
    assert path == tmp_path / "synthetic_echonet" / f"v{PHANTOM_VERSION}_2_1"  # a new phantom, a new folder
    stamp = (path / "FileList.csv").stat().st_mtime_ns
    assert synthetic_echonet_dir(num_videos=2, seed=1, cache_dir=tmp_path) == path
    assert (path / "FileList.csv").stat().st_mtime_ns == stamp  # reused, not regenerated
    assert [p.name for p in (tmp_path / "synthetic_echonet").iterdir()] == [path.name]  # no partial folders left


def test_synthetic_echonet_dir_honours_echoai_cache(tmp_path, monkeypatch, corpus):
    monkeypatch.setenv("ECHOAI_CACHE", str(corpus.parent.parent))
    assert synthetic_echonet_dir(num_videos=TINY_NUM_VIDEOS, seed=TINY_SEED) == corpus


# ---- load_echonet_dynamic ------------------------------------------------------------------------


def test_load_echonet_dynamic_splits_columns_and_dtypes(corpus):
    dataset, report = load_echonet_dynamic(corpus, return_report=True)
    assert list(dataset) == ["train", "validation", "test"]
    assert [len(dataset[s]) for s in dataset] == [6, 1, 1]
    assert report.num_excluded == 0 and report.num_loaded == TINY_NUM_VIDEOS
    features = dataset["train"].features
    assert {name: f.dtype for name, f in features.items() if isinstance(f, Value)} == {
        "FileName": "string", "video_path": "string", "EF": "float32", "ESV": "float32", "EDV": "float32",
        "FrameHeight": "int32", "FrameWidth": "int32", "FPS": "float32", "NumberOfFrames": "int32",
        "Split": "string", "EDFrame": "int32", "ESFrame": "int32",
    }  # fmt: skip
    files = file_list(corpus).set_index("FileName")
    for row in dataset["train"]:
        assert row["EF"] == pytest.approx(files.loc[row["FileName"], "EF"], rel=1e-6)
        assert row["video_path"].endswith(f"Videos/{row['FileName']}.avi")


def test_ed_is_the_traced_frame_with_the_larger_volume(corpus):
    dataset = load_echonet_dynamic(corpus)
    tracings = pd.read_csv(corpus / "VolumeTracings.csv")
    for row in dataset["train"]:
        traced = tracings[tracings.FileName == row["FileName"] + ".avi"]
        assert sorted(traced.Frame.unique()) == sorted([row["EDFrame"], row["ESFrame"]])
        # The phantom's LV is wider at ED: compare the widest chord of each frame.
        width = traced.assign(w=np.hypot(traced.X2 - traced.X1, traced.Y2 - traced.Y1)).groupby("Frame").w
        assert (
            width.apply(lambda w: w.iloc[1:].max())[row["EDFrame"]]
            > width.apply(lambda w: w.iloc[1:].max())[row["ESFrame"]]
        )


def test_loader_tolerates_released_file_quirks(corpus, tmp_path):
    data = copy_corpus(corpus, tmp_path / "quirks")
    files = file_list(data)
    files.loc[:2, "FileName"] = files.loc[:2, "FileName"] + ".avi"  # names with the extension
    files["Split"] = files["Split"].str.lower()  # split names in another case
    files.to_csv(data / "FileList.csv")  # with an unnamed pandas index column
    tracings = pd.read_csv(data / "VolumeTracings.csv")
    untraced = files.loc[5, "FileName"]
    tracings[tracings.FileName != untraced + ".avi"].to_csv(data / "VolumeTracings.csv", index=False)
    dataset, report = load_echonet_dynamic(data, return_report=True)
    assert sum(map(len, dataset.values())) == TINY_NUM_VIDEOS and report.num_excluded == 0
    assert "Unnamed: 0" not in dataset["train"].column_names
    rows = {r["FileName"]: r for split in dataset.values() for r in split}
    assert set(rows) == set(files["FileName"].str.removesuffix(".avi"))
    assert (rows[untraced]["EDFrame"], rows[untraced]["ESFrame"]) == (-1, -1)
    assert (rows[untraced]["EDTracing"], rows[untraced]["ESTracing"]) == ([], [])
    assert report.without_tracings == [untraced]


def rectangle_tracing(name: str, frame: int, left: float, top: float, right: float, bottom: float) -> list[list]:
    """A frame's VolumeTracings rows for a rectangle: a vertical long axis, then horizontal chords from `left` to
    `right` at every integer-plus-half y from `top` to `bottom`."""
    long_axis = [f"{name}.avi", (left + right) / 2, top, (left + right) / 2, bottom, frame]
    ys = np.arange(top, bottom + 0.5)
    return [long_axis, *([f"{name}.avi", left, y, right, y, frame] for y in ys)]


def test_tracing_outlines_fill_the_traced_area(corpus, tmp_path):
    """The loader's outline is the chords' left ends then their right ends in reverse: filled, a rectangle traced
    by horizontal chords gives exactly the pixels whose centres it covers (a wrong vertex order would cross itself
    and fill a bow tie)."""
    data = copy_corpus(corpus, tmp_path / "rectangles")
    tracings = pd.read_csv(data / "VolumeTracings.csv")
    name = file_list(data)["FileName"][0]
    rows = rectangle_tracing(name, 3, 4.5, 9.5, 15.5, 20.5) + rectangle_tracing(name, 7, 20.5, 30.5, 25.5, 33.5)
    tracings = pd.concat([tracings[tracings.FileName != f"{name}.avi"], pd.DataFrame(rows, columns=TRACING_COLUMNS)])
    tracings.to_csv(data / "VolumeTracings.csv", index=False)
    row = next(r for split in load_echonet_dynamic(data).values() for r in split if r["FileName"] == name)
    assert (row["EDFrame"], row["ESFrame"]) == (3, 7)
    assert (
        len(row["EDTracing"]) == 2 * 12 and row["EDTracing"][0] == [4.5, 9.5] and row["EDTracing"][-1] == [15.5, 9.5]
    )
    expected = np.zeros((40, 48), dtype=bool)
    expected[10:21, 5:16] = True  # rows 10..20 (y), columns 5..15 (x): 11 x 11 pixel centres
    np.testing.assert_array_equal(rasterize_polygon(row["EDTracing"], 40, 48), expected)
    es = rasterize_polygon(row["ESTracing"], 40, 48)
    assert es.sum() == 5 * 3 and es[31:34, 21:26].all()


def test_rasterize_polygon_needs_an_area():
    with pytest.raises(ValueError, match="at least 3 vertices"):
        rasterize_polygon([[0.0, 0.0], [5.0, 5.0]], 8, 8)


def test_every_phantom_video_has_both_outlines(corpus):
    for split in load_echonet_dynamic(corpus).values():
        for row in split:
            assert len(row["EDTracing"]) > 3 and len(row["ESTracing"]) > 3  # the phantom traces every video


@pytest.fixture
def broken_corpus(corpus, tmp_path):
    """A copy of the corpus with one problem per video, and the reason each should be reported with."""
    data = copy_corpus(corpus, tmp_path / "broken")
    files = file_list(data)
    names = files["FileName"].tolist()
    videos = data / "Videos"
    (videos / f"{names[0]}.avi").write_bytes(b"")
    truncate(videos / f"{names[1]}.avi", 0.4)
    (videos / f"{names[2]}.avi").unlink()
    files.loc[3, "EF"] = math.nan
    files.loc[4, "EF"] = 120.0
    files.to_csv(data / "FileList.csv", index=False)
    expected = {
        names[0]: "empty file",
        names[1]: "truncated",
        names[2]: "video missing",
        names[3]: "EF missing",
        names[4]: "EF outside [0, 100]",
    }
    return data, expected


def test_loader_reports_and_excludes_unusable_rows(broken_corpus, caplog):
    data, expected = broken_corpus
    with caplog.at_level(logging.WARNING, logger="data_echoai"):
        dataset, report = load_echonet_dynamic(data, return_report=True)
    loaded = {r["FileName"] for split in dataset.values() for r in split}
    assert loaded.isdisjoint(expected) and len(loaded) == TINY_NUM_VIDEOS - len(expected)
    assert report.num_excluded == len(expected) and report.num_loaded == len(loaded)
    by_name = {name: reason for reason, names in report.excluded.items() for name in names}
    for name, reason in expected.items():
        assert reason in by_name[name]
        assert name in caplog.text  # the warning names the files
    assert "excluded 5" in caplog.text


def test_strict_loading_fails_naming_files_and_reasons(broken_corpus):
    data, expected = broken_corpus
    with pytest.raises(ValueError, match="strict=True") as error:
        load_echonet_dynamic(data, strict=True)
    for name, reason in expected.items():
        assert name in str(error.value) and reason in str(error.value)


def test_non_echonet_folder_gets_one_clear_error(tmp_path):
    (tmp_path / "Videos").mkdir()
    with pytest.raises(
        FileNotFoundError, match="FileList.csv.* not found: expected an EchoNet-Dynamic folder"
    ) as error:
        load_echonet_dynamic(tmp_path)
    assert "VolumeTracings.csv" in str(error.value) and "EchoNet-Dynamic" in str(error.value)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_echonet_dynamic(tmp_path / "does-not-exist")


# ---- unlabeled folders ---------------------------------------------------------------------------


def test_load_video_folder_recurses_and_reports_unreadable(corpus, tmp_path):
    root = tmp_path / "videos"
    (root / "site_a").mkdir(parents=True)
    (root / "site_b" / "2024").mkdir(parents=True)
    source = next((corpus / "Videos").iterdir())
    (root / "site_a" / "one.AVI").write_bytes(source.read_bytes())
    frames = np.random.default_rng(0).integers(0, 255, (20, 64, 64), dtype=np.uint8)
    write_video(root / "site_b" / "2024" / "two.mp4", frames)
    (root / "site_b" / "broken.mp4").write_bytes(b"\x00" * 100)
    (root / "notes.txt").write_text("not a video")
    dataset, report = load_video_folder(root, return_report=True)
    assert dataset["FileName"] == ["site_a/one", "site_b/2024/two"]
    assert dataset["NumberOfFrames"][1] == 20 and dataset["FrameWidth"][1] == 64
    assert report.excluded and report.excluded[next(iter(report.excluded))] == ["site_b/broken"]
    with pytest.raises(ValueError, match="broken"):
        load_video_folder(root, strict=True)


# ---- batches -------------------------------------------------------------------------------------


def test_dataloader_with_two_workers_yields_labelled_batches(corpus):
    train = load_echonet_dynamic(corpus, check_videos=False)["train"]
    dataset = train.with_transform(EchoNetTransform(small_processor(), training=True))
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=EchoAIDataCollator())
    batches = list(loader)
    assert [len(b["labels"]) for b in batches] == [3, 3]
    for batch in batches:
        assert batch["pixel_values"].shape == (3, 4, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
        assert batch["num_skipped"].item() == 0
    labels = torch.cat([b["labels"] for b in batches])
    assert torch.allclose(labels, torch.tensor(train["EF"]))


def test_evaluation_transform_is_deterministic_with_several_clips(corpus):
    test = load_echonet_dynamic(corpus, check_videos=False)["test"]
    dataset = test.with_transform(EchoNetTransform(small_processor(), training=False, num_clips=3))
    first, second = dataset[0], dataset[0]
    assert first["pixel_values"].shape == (3, 4, 3, 32, 32)
    assert torch.equal(first["pixel_values"], second["pixel_values"])


def test_corrupt_video_in_a_training_batch_is_skipped_and_counted(corpus, tmp_path, caplog):
    data = copy_corpus(corpus, tmp_path / "late-damage")
    train = load_echonet_dynamic(data)["train"]  # all readable when loaded ...
    damaged = train[1]["video_path"]
    truncate(Path(damaged), 0.01)  # ... but cut to its header later, so no clip can be decoded
    dataset = train.with_transform(EchoNetTransform(small_processor(num_channels=1), training=True))
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=EchoAIDataCollator())
    with caplog.at_level(logging.WARNING, logger="data_echoai"):
        batches = list(loader)
    assert sum(b["num_skipped"].item() for b in batches) == 1
    assert [len(b["labels"]) for b in batches] == [2, 3]
    assert batches[0]["pixel_values"].shape == (2, 4, 1, 32, 32)
    assert torch.allclose(batches[0]["labels"], torch.tensor([train[0]["EF"], train[2]["EF"]]))
    assert damaged in caplog.text
