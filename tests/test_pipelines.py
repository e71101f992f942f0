"""EchoAI through transformers' pipelines: the stock video-classification pipeline and the EF pipeline on folders
saved by `scripts/finetune.py`, loaded by remote code where EchoAI is not installed; the EF pipeline against
`scripts/predict.py`; the processor's `BaseVideoProcessor` keywords."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import tiny_corpus
from remote_code import run_without_echoai
from test_training import TINY_MODEL, load_script

from data_echoai import load_echonet_dynamic
from inference_echoai import load_model_and_processor, predict_videos
from modeling_echoai import EchoAIForVideoClassification
from pipeline_echoai import TASK, EchoAIEFPipeline
from video_io_echoai import decode_all_frames
from video_processing_echoai import EchoAIVideoProcessor


NUM_VIDEOS = 12  # finetune.py evaluates on two validation and two test videos


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return tiny_corpus(tmp_path_factory, num_videos=NUM_VIDEOS)


def finetuned(corpus: Path, output: Path, *extra: str) -> Path:
    load_script("finetune").main(
        ["--data_dir", str(corpus), "--output_dir", str(output), "--from_scratch", "--config_overrides", TINY_MODEL,
         "--max_train_steps", "2", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4",
         "--eval_num_clips", "2", *extra]
    )  # fmt: skip
    return output


@pytest.fixture(scope="module")
def regression(corpus, tmp_path_factory) -> Path:
    return finetuned(corpus, tmp_path_factory.mktemp("regression"))


@pytest.fixture(scope="module")
def classification(corpus, tmp_path_factory) -> Path:
    return finetuned(
        corpus, tmp_path_factory.mktemp("classification"), "--num_labels", "2", "--class_boundaries", "50"
    )


@pytest.fixture(scope="module")
def videos(corpus) -> list[str]:
    return [str(path) for path in load_echonet_dynamic(corpus)["test"]["video_path"]]


def test_finetune_saves_the_ef_pipeline_and_names_what_the_model_predicts(regression, classification):
    config = json.loads((regression / "config.json").read_text())
    assert config["id2label"] == {"0": "EF"} and config["problem_type"] == "regression"
    assert config["custom_pipelines"][TASK]["impl"] == "pipeline_echoai.EchoAIEFPipeline"
    assert config["custom_pipelines"][TASK]["pt"] == ["AutoModelForVideoClassification"]
    assert {"pipeline_echoai.py", "inference_echoai.py", "video_processing_echoai.py"} <= set(os.listdir(regression))
    # A classifier names its classes by the boundaries, and has no EF pipeline.
    config = json.loads((classification / "config.json").read_text())
    assert config["id2label"] == {"0": "EF < 50", "1": "EF >= 50"} and "custom_pipelines" not in config
    # The model cards show the three-line usage.
    card = (regression / "README.md").read_text()
    assert f'ef = pipeline(model="{regression.name}", trust_remote_code=True)' in card
    card = (classification / "README.md").read_text()
    assert f'pipeline("video-classification", model="{classification.name}", trust_remote_code=True)' in card
    model, processor = load_model_and_processor(regression)  # the rewritten config still loads
    with pytest.raises(ValueError, match="regression model"):
        EchoAIEFPipeline(model=EchoAIForVideoClassification.from_pretrained(classification), video_processor=processor)


@pytest.mark.parametrize(("protocol", "num_clips"), [("all_clips", 4), ("k_clips", 3), ("one_clip", 4)])
def test_ef_pipeline_equals_predict_script(regression, videos, tmp_path, protocol, num_clips):
    """The pipeline is the predictor of `scripts/predict.py`, one video at a time."""
    output = tmp_path / "ef.json"
    argv = [videos[0], "--model_name_or_path", str(regression), "--protocol", protocol, "--num_clips", str(num_clips)]
    assert load_script("predict").main([*argv, "--device", "cpu", "--output", str(output)]) == 0
    (row,) = json.loads(output.read_text())
    model, processor = load_model_and_processor(regression)
    pipe = EchoAIEFPipeline(model=model, video_processor=processor)
    answer = pipe(videos[0], protocol=protocol, num_clips=num_clips, clip_batch_size=5)
    assert answer["error"] is None and answer["num_clips"] == row["num_clips"] > 0
    # predict.py writes three decimals; the unrounded numbers are predict_videos' (which predict.py runs).
    assert answer["EF"] == pytest.approx(row["EF"], abs=5e-4 + 1e-5)
    assert answer["clip_spread"] == pytest.approx(row["clip_spread"], abs=5e-4 + 1e-5)
    (expected,) = predict_videos(model, processor, [videos[0]], protocol=protocol, num_clips=num_clips, progress=False)
    assert answer["EF"] == pytest.approx(expected.ef, abs=1e-5)
    assert answer["clip_spread"] == pytest.approx(expected.clip_spread, abs=1e-5)


def test_ef_pipeline_takes_a_list_of_paths_and_frame_arrays(regression, videos):
    model, processor = load_model_and_processor(regression)
    pipe = EchoAIEFPipeline(model=model, video_processor=processor)
    expected = predict_videos(model, processor, videos, progress=False)
    answers = pipe([*videos, "missing.avi"])
    assert [a["EF"] for a in answers[:-1]] == pytest.approx([e.ef for e in expected], abs=1e-5)
    assert answers[-1]["EF"] is None and "file not found" in answers[-1]["error"]  # the others still predicted
    frames = decode_all_frames(videos[0])  # (T, H, W) uint8
    grey = pipe(frames)
    assert grey["EF"] == pytest.approx(expected[0].ef, abs=1e-5) and grey["num_clips"] == expected[0].num_clips
    rgb = pipe(np.repeat(frames[..., None], 3, axis=-1), protocol="all_clips")  # (T, H, W, 3)
    assert rgb["EF"] == pytest.approx(grey["EF"], abs=1e-5)
    with pytest.raises(ValueError, match="protocol must be one of"):
        pipe(videos[0], protocol="every_clip")
    # A model loaded in bfloat16 (`pipeline(..., dtype=torch.bfloat16)`) gets its clips in bfloat16.
    bf16 = EchoAIForVideoClassification.from_pretrained(regression, dtype=torch.bfloat16).eval()
    half = EchoAIEFPipeline(model=bf16, video_processor=processor)(videos[0], protocol="one_clip")
    (one_clip,) = predict_videos(model, processor, videos[:1], protocol="one_clip", progress=False)
    assert half["EF"] == pytest.approx(one_clip.ef, abs=0.5) and half["EF"] != one_clip.ef


def test_processor_takes_base_video_processor_keywords(videos):
    processor = EchoAIVideoProcessor(num_frames=4, period=2, image_size=32)
    frames = decode_all_frames(videos[0])  # (T, H, W)
    six = EchoAIVideoProcessor(num_frames=6, period=2, image_size=32)(frames)["pixel_values"]
    assert torch.equal(processor(frames, num_frames=6, do_sample_frames=True)["pixel_values"], six)
    assert processor.num_frames == 4  # a per-call clip length leaves the saved one alone
    whole = processor(videos[0], do_sample_frames=False)["pixel_values"]  # every frame once, one clip
    assert torch.equal(whole, processor.frames_to_pixel_values(frames[None]))
    assert isinstance(processor(frames, return_tensors="np")["pixel_values"], np.ndarray)
    with pytest.raises(TypeError, match="takes no fps per call"):
        processor(frames, fps=25)
    with pytest.raises(ValueError, match="differ in length"):
        processor([frames, frames[:-1]], do_sample_frames=False)


def test_pipelines_run_by_remote_code_without_echoai(regression, classification, videos, tmp_path):
    """A Hub user without EchoAI: the stock video-classification pipeline gives EF (regression) and class
    probabilities (classification); the EF pipeline opens with no task given and matches the installed predictor."""
    expected = {}
    for name, folder in (("regression", regression), ("classification", classification)):
        model = EchoAIForVideoClassification.from_pretrained(folder).eval()
        processor = EchoAIVideoProcessor.from_pretrained(folder)
        with torch.no_grad():  # the stock pipeline scores one clip: the processor's default, the clip at frame 0
            expected[name] = model(**processor(videos[0])).logits[0].tolist()
    model, processor = load_model_and_processor(regression)
    expected["ef"] = [p.ef for p in predict_videos(model, processor, videos, progress=False)]
    frames = decode_all_frames(videos[1])  # (T, H, W) uint8
    np.save(tmp_path / "frames.npy", frames)
    expected["array"] = predict_videos(model, processor, [frames], progress=False)[0].ef
    stdout = run_without_echoai(
        f"""
        import math
        import numpy as np
        from transformers import pipeline

        videos, expected = {videos!r}, {expected!r}
        stock = pipeline("video-classification", model={str(regression)!r}, trust_remote_code=True)
        (answer,) = stock(videos[0])
        assert answer["label"] == "EF" and math.isclose(answer["score"], expected["regression"][0], abs_tol=1e-5)

        stock = pipeline("video-classification", model={str(classification)!r}, trust_remote_code=True)
        answer = {{a["label"]: a["score"] for a in stock(videos[0])}}
        assert set(answer) == {{"EF < 50", "EF >= 50"}} and math.isclose(sum(answer.values()), 1.0, abs_tol=1e-6)
        logits = expected["classification"]
        assert math.isclose(answer["EF >= 50"], 1 / (1 + math.exp(logits[0] - logits[1])), abs_tol=1e-5)

        ef = pipeline(model={str(regression)!r}, trust_remote_code=True)  # no task: the saved EF pipeline
        assert type(ef).__name__ == "EchoAIEFPipeline" and type(ef).__module__.startswith("transformers_modules")
        answers = ef(videos)
        assert all(math.isclose(a["EF"], e, abs_tol=1e-5) for a, e in zip(answers, expected["ef"], strict=True))
        assert math.isclose(ef(np.load("frames.npy"))["EF"], expected["array"], abs_tol=1e-5)
        print("pipelines OK")
        """,
        tmp_path,
    )
    assert "pipelines OK" in stdout


def test_ef_pipeline_reads_dicom_as_predict_does(regression, tmp_path):
    pytest.importorskip("pydicom", reason="pydicom is needed for DICOM (pip install -e .[dicom])")
    from dicom_fixtures import echo_frames, write_dicom

    cine = tmp_path / "IM_0001"  # no extension: found by its DICOM preamble
    write_dicom(cine, echo_frames(24, seed=2))
    model, processor = load_model_and_processor(regression)
    answer = EchoAIEFPipeline(model=model, video_processor=processor)(str(cine))
    (expected,) = predict_videos(model, processor, [cine], progress=False)
    assert answer["error"] is None and expected.error is None
    assert answer["EF"] == pytest.approx(expected.ef, abs=1e-5) and answer["num_clips"] == expected.num_clips
