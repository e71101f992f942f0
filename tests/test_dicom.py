"""DICOM through inference: `scripts/predict.py` and `scripts/evaluate.py` read ultrasound cines with the corpus's
DICOM reader (`dicom_echoai`), lossless transfer syntaxes predict exactly as a lossless AVI of the same sector
frames, unusable files get a one-line reason while the rest of the folder is predicted, no tag value leaks, and
the remote-code processor needs pydicom only when it is given a DICOM."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import test_evaluation
import torch
from data_fixtures import copy_corpus, file_list, tiny_corpus
from test_evaluation import load_script

from data_echoai import load_echonet_dynamic
from video_io_echoai import decode_all_frames, probe_video, write_video
from video_processing_echoai import EchoAIVideoProcessor


pydicom = pytest.importorskip("pydicom", reason="pydicom is needed for the DICOM cases (pip install -e .[dicom])")
from dicom_fixtures import PHI, echo_frames, write_dicom  # noqa: E402
from pydicom.uid import MPEG2MPML, JPEG2000Lossless, JPEGLSLossless, RLELossless  # noqa: E402

from dicom_echoai import crop_to_mask, fit_to_square, sector_mask  # noqa: E402


model_dir = test_evaluation.model_dir  # the fixture: a tiny saved EF model (4 frames of 32², period 2)
FRAMES = echo_frames(12, 0)  # (T, H, W): fan of speckle, burnt-in text and an ECG trace outside it
LOSSLESS = {"explicit.dcm": None, "rle.dcm": RLELossless, "jpegls.dcm": JPEGLSLossless, "j2k.dcm": JPEG2000Lossless}
UNUSABLE = {
    "mpeg2.dcm": "DICOM pixel data not decodable (MPEG2 Main Profile / Main Level)",
    "cut.dcm": "DICOM pixel data not decodable (Explicit VR Little Endian)",
    "still.dcm": "single-frame image",
    "no_pixels.dcm": "DICOM without pixel data",
}


def sector_frames(frames: np.ndarray) -> np.ndarray:
    """The sector of raw frames, zero outside it, padded to a square: what a DICOM of `frames` reads as."""
    cropped = crop_to_mask(frames, sector_mask(frames))
    return fit_to_square(cropped, max(cropped.shape[1:]))


@pytest.fixture(scope="module")
def cines(tmp_path_factory) -> Path:
    """A folder of the same cine in every syntax, its sector frames as a lossless AVI, and unusable DICOMs."""
    folder = tmp_path_factory.mktemp("cines")
    write_video(folder / "sector.avi", sector_frames(FRAMES), fps=50, codec="ffv1", pix_fmt="gray")
    for name, syntax in LOSSLESS.items():
        write_dicom(folder / name, FRAMES, **({"transfer_syntax": syntax} if syntax else {}))
    write_dicom(folder / "IM_0001", FRAMES, jpeg=True)  # JPEG baseline, no extension: found by its preamble
    write_dicom(folder / "mpeg2.dcm", FRAMES, jpeg=True)
    ds = pydicom.dcmread(folder / "mpeg2.dcm")
    ds.file_meta.TransferSyntaxUID = MPEG2MPML  # a syntax no installed handler decodes
    ds.save_as(folder / "mpeg2.dcm")
    write_dicom(folder / "cut.dcm", FRAMES)
    (folder / "cut.dcm").write_bytes((folder / "cut.dcm").read_bytes()[:-5000])  # pixel data cut short
    write_dicom(folder / "still.dcm", FRAMES[:1])
    write_dicom(folder / "no_pixels.dcm", FRAMES, pixel_data=False)
    (folder / "notes.txt").write_text("not a video")
    return folder


@pytest.fixture(scope="module")
def predicted(cines, model_dir, tmp_path_factory) -> dict:
    """`scripts/predict.py` on the folder: exit code, its rows by file name, what it printed and logged."""
    output = tmp_path_factory.mktemp("predicted") / "ef.json"
    stdout, stderr, logs = io.StringIO(), io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(logs)
    logging.getLogger().addHandler(handler)
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.DEBUG)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = load_script("predict").main([str(cines), "--model_name_or_path", str(model_dir),
                                                "--output", str(output)])  # fmt: skip
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(level)
    rows = {row["video"]: row for row in json.loads(output.read_text())}
    texts = {"stdout": stdout.getvalue(), "stderr": stderr.getvalue(), "log": logs.getvalue()}
    return {"code": code, "rows": rows, "texts": {**texts, "output": output.read_text()}}


def test_lossless_dicom_gives_the_pixels_and_ef_of_a_lossless_avi_of_the_same_frames(cines, model_dir, predicted):
    processor = EchoAIVideoProcessor.from_pretrained(model_dir)
    expected = processor(cines / "sector.avi", clip_sampling="all")["pixel_values"]
    assert probe_video(cines / "sector.avi").num_frames == len(FRAMES)
    for name in LOSSLESS:  # JPEG-LS and JPEG 2000 written by this test decode, bit for bit
        assert torch.equal(processor(cines / name, clip_sampling="all")["pixel_values"], expected), name
        info = probe_video(cines / name)
        assert (info.num_frames, info.fps) == (len(FRAMES), 50.0)  # frame rate from FrameTime
    assert torch.equal(processor((cines / "rle.dcm").read_bytes(), clip_sampling="all")["pixel_values"], expected)
    rows = predicted["rows"]
    reference = rows["sector.avi"]
    assert reference["error"] is None and reference["num_clips"] == len(FRAMES) - 6  # all clips: 4 frames, period 2
    for name in LOSSLESS:
        row = rows[name]
        assert row["error"] is None and row["num_clips"] == reference["num_clips"], row
        assert row["EF"] == pytest.approx(reference["EF"], abs=1e-3)  # as written, rounded to 3 decimals
        assert row["clip_spread"] == pytest.approx(reference["clip_spread"], abs=1e-3)


@pytest.mark.parametrize("photometric, tolerance", [("MONOCHROME1", 0), ("RGB", 0), ("YBR_FULL", 1)])
def test_photometric_interpretations_read_as_the_same_grey_frames(cines, tmp_path, photometric, tolerance):
    write_dicom(tmp_path / "colour.dcm", FRAMES, photometric=photometric)
    assert pydicom.dcmread(tmp_path / "colour.dcm").PhotometricInterpretation == photometric
    grey = decode_all_frames(cines / "explicit.dcm").astype(int)
    frames = decode_all_frames(tmp_path / "colour.dcm").astype(int)
    assert frames.shape == grey.shape and np.abs(frames - grey).max() <= tolerance


def test_jpeg_baseline_dicom_is_close_to_the_lossless_frames(cines, model_dir, predicted):
    sector = sector_frames(FRAMES).astype(int)
    decoded = decode_all_frames(cines / "IM_0001").astype(int)
    assert decoded.shape == sector.shape and np.abs(decoded - sector).mean() < 3  # quality 95
    row, reference = predicted["rows"]["IM_0001"], predicted["rows"]["sector.avi"]
    assert row["error"] is None and row["num_clips"] == reference["num_clips"]
    assert math.isfinite(row["EF"]) and abs(row["EF"] - reference["EF"]) < 1.0


def test_unusable_dicoms_get_a_one_line_reason_and_the_folder_goes_on(predicted):
    assert predicted["code"] == 0
    rows = predicted["rows"]
    assert set(rows) == {"sector.avi", "IM_0001", *LOSSLESS, *UNUSABLE}  # notes.txt is not a video
    for name, reason in UNUSABLE.items():
        assert rows[name]["error"] == reason and rows[name]["EF"] is None, rows[name]
    printed = predicted["texts"]["stdout"]
    assert f"{len(UNUSABLE)} video(s) could not be read" in printed
    for name, reason in UNUSABLE.items():
        assert f"  {name}: {reason}\n" in printed
    for text in predicted["texts"].values():
        assert "Traceback" not in text


def test_no_dicom_tag_value_reaches_predict_outputs(predicted):
    for value in PHI.values():
        for where, text in predicted["texts"].items():
            assert value not in text, f"{value!r} leaked into predict.py's {where}"


@pytest.mark.filterwarnings("ignore:All .* references are at or above")  # a tiny split: undefined AUCs
def test_evaluate_resolves_echonet_names_to_dicom_files(tmp_path_factory, model_dir, tmp_path):
    corpus = copy_corpus(tiny_corpus(tmp_path_factory), tmp_path / "echonet")
    train = file_list(corpus).query("Split == 'TRAIN'")["FileName"].tolist()[:2]
    names = {train[0]: f"{train[0]}.dcm", train[1]: train[1]}  # with the .dcm extension, and without any
    for stem, file_name in names.items():
        avi = corpus / "Videos" / f"{stem}.avi"
        write_dicom(corpus / "Videos" / file_name, decode_all_frames(avi))
        avi.unlink()
    rows = load_echonet_dynamic(corpus)["train"]
    paths = dict(zip(rows["FileName"], rows["video_path"], strict=True))
    for stem, file_name in names.items():
        assert paths[stem] == str(corpus / "Videos" / file_name)
    output = tmp_path / "evaluation"
    argv = ["--model_name_or_path", str(model_dir), "--data_dir", str(corpus), "--split", "train",
            "--protocol", "one_clip", "--bootstrap", "10", "--output_dir", str(output)]  # fmt: skip
    assert load_script("evaluate").main(argv) == 0
    predictions = pd.read_csv(output / "predictions.csv").set_index("FileName")
    assert predictions.loc[list(names), "EF_predicted"].notna().all()
    assert json.loads((output / "metrics.json").read_text())["num_unreadable"] == 0


def test_remote_code_processor_needs_pydicom_only_for_dicom(cines, model_dir, tmp_path):
    """The saved processor loads by remote code where EchoAI and pydicom are absent, reads an AVI, and names the
    `dicom` extra for a DICOM; with pydicom back, it reads the DICOM as the installed package does."""
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(model_dir, checkpoint)
    EchoAIVideoProcessor.from_pretrained(model_dir).save_pretrained(checkpoint)
    assert {"video_io_echoai.py", "dicom_echoai.py"} <= set(os.listdir(checkpoint))
    processor = EchoAIVideoProcessor.from_pretrained(model_dir)
    torch.save(processor(cines / "jpegls.dcm")["pixel_values"], tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys
        import torch

        hidden = {{"configuration_echoai", "modeling_echoai", "video_processing_echoai", "video_io_echoai",
                  "dicom_echoai", "data_echoai", "corpus_echoai", "pydicom"}}

        class Hide(importlib.abc.MetaPathFinder):
            # Stand in for a machine where neither EchoAI nor pydicom is installed.
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in hidden:
                    raise ModuleNotFoundError(name)

        sys.meta_path.insert(0, Hide())
        from transformers.models.auto.video_processing_auto import AutoVideoProcessor
        processor = AutoVideoProcessor.from_pretrained({str(checkpoint)!r}, trust_remote_code=True)
        assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
        assert processor({str(cines / "sector.avi")!r})["pixel_values"].shape == (1, 4, 3, 32, 32)
        try:
            processor({str(cines / "jpegls.dcm")!r})
            raise SystemExit("a DICOM was read without pydicom")
        except Exception as error:
            assert type(error).__name__ == "VideoDecodingError", repr(error)
            assert 'pip install "echoai[dicom]"' in str(error) and "\\n" not in str(error), str(error)
        hidden.discard("pydicom")
        pixel_values = processor({str(cines / "jpegls.dcm")!r})["pixel_values"]
        assert torch.equal(pixel_values, torch.load({str(tmp_path / "expected.pt")!r}))
        print("remote DICOM OK")
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote DICOM OK" in result.stdout
