"""Evaluation and prediction: scripts/evaluate.py end to end per protocol, all-clips batching against the
processor's own clips, scripts/predict.py with unreadable files, and beat detection on the phantom."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from data_fixtures import tiny_corpus, truncate

from configuration_echoai import EchoAIConfig
from data_echoai import load_echonet_dynamic
from inference_echoai import (
    ModelLoadingError,
    beat_clip_indices,
    detect_beats,
    load_model_and_processor,
    predict_videos,
)
from modeling_echoai import EchoAIForVideoClassification
from synthetic_echonet import render_phantom
from video_processing_echoai import EchoAIVideoProcessor, clip_frame_indices


REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SPLIT = "train"  # the tiny corpus has 6 train videos, 1 validation, 1 test; metrics need >= 2


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"echoai_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_regression_model() -> EchoAIForVideoClassification:
    torch.manual_seed(0)
    config = EchoAIConfig(
        image_size=32, patch_size=8, num_frames=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        decoder_intermediate_size=32, num_labels=1, regression_target_mean=55, regression_target_std=12,
    )  # fmt: skip
    model = EchoAIForVideoClassification(config)
    with torch.no_grad():  # a visible spread of predictions, as a fine-tuned head gives
        model.classifier.weight.normal_(0.0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return tiny_corpus(tmp_path_factory)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("finetuned")
    tiny_regression_model().save_pretrained(folder)
    EchoAIVideoProcessor(num_frames=4, image_size=32).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def split_rows(corpus):
    return load_echonet_dynamic(corpus)[SPLIT]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert len(data) > 5_000, f"{path} is only {len(data)} bytes"


@pytest.mark.filterwarnings("ignore:.*undefined in .* bootstrap resamples:RuntimeWarning")  # 6 videos: expected
@pytest.mark.parametrize(
    "protocol, extra",
    [
        ("one_clip", []),
        ("all_clips", ["--beat_by_beat", "--per_device_eval_batch_size", "48"]),
        ("k_clips", ["--num_clips", "3", "--num_workers", "1"]),
    ],
)
def test_evaluate_writes_predictions_metrics_strata_and_figures(
    corpus, model_dir, split_rows, tmp_path, protocol, extra
):
    output = tmp_path / protocol
    argv = [
        "--model_name_or_path", str(model_dir), "--data_dir", str(corpus), "--split", SPLIT, "--protocol", protocol,
        "--bootstrap", "50", "--output_dir", str(output), *extra,
    ]  # fmt: skip
    assert load_script("evaluate").main(argv) == 0

    predictions = pd.read_csv(output / "predictions.csv")
    assert len(predictions) == len(split_rows)
    assert list(predictions["FileName"]) == list(split_rows["FileName"])
    for column in ("EF", "EF_predicted", "clip_spread", "num_clips"):
        assert predictions[column].notna().all(), column
    expected_clips = {
        "one_clip": [1] * len(split_rows),
        "k_clips": [3] * len(split_rows),
        "all_clips": [len(clip_frame_indices(n, 4, 2, "all")) for n in split_rows["NumberOfFrames"]],
    }[protocol]
    assert predictions["num_clips"].tolist() == expected_clips
    assert (predictions["clip_spread"][predictions["num_clips"] == 1] == 0).all()
    assert (predictions["clip_spread"][predictions["num_clips"] > 1] > 0).all()

    metrics = json.loads((output / "metrics.json").read_text())
    for key in ("n", "mae", "rmse", "r2", "pearson_r2", "bias", "loa_lower", "loa_upper", "auc_ef_below_40"):
        assert key in metrics, key
    for key in ("mae", "rmse", "r2", "bias"):
        assert f"{key}_ci_low" in metrics and f"{key}_ci_high" in metrics
    assert metrics["n"] == len(split_rows) and metrics["bootstrap"] == 50
    errors = predictions["EF_predicted"] - predictions["EF"]
    assert metrics["mae"] == pytest.approx(errors.abs().mean(), rel=1e-6)
    # The mean predictor on the same videos, at the model's training mean (55), and the verdict beside it.
    assert metrics["mean_predictor"]["ef"] == 55
    assert metrics["mean_predictor"]["mae"] == pytest.approx((predictions["EF"] - 55).abs().mean(), rel=1e-6)
    assert metrics["learned_ef"] == (metrics["failure"] is None)
    # The verdict's evidence is recorded whichever way it goes: the gain over the mean predictor and its interval.
    assert metrics["mae_gain"] == pytest.approx(metrics["mean_predictor"]["mae"] - metrics["mae"], rel=1e-6)
    low, high = metrics["mae_gain_interval"]
    assert low <= metrics["mae_gain"] <= high

    strata = pd.read_csv(output / "strata.csv")
    assert set(strata["stratum"]) == {"EF range", "FPS tercile", "frames tercile"}
    for stratum in strata["stratum"].unique():  # every video lands in exactly one bin of each stratum
        assert strata.loc[strata["stratum"] == stratum, "n"].sum() == len(split_rows)
    assert_png(output / "scatter.png")
    assert_png(output / "bland_altman.png")

    if "--beat_by_beat" in extra:
        assert (predictions["num_beats"] >= 1).all()
        assert predictions["EF_beat_by_beat"].notna().all()
        detection = metrics["beat_detection"]
        assert detection["num_videos_with_beats"] == len(split_rows)
        # Phantom cycles are found within a few frames of the traced ED / ES.
        assert detection["ed_error_frames_median"] <= 3 and detection["es_error_frames_median"] <= 3
        assert np.allclose(predictions["ED_error_ms"], predictions["ED_error_frames"] * 1000 / predictions["FPS"])
        assert "mae" in metrics["beat_by_beat"]


@pytest.mark.parametrize(
    "protocol, sampling",
    [("all_clips", dict(clip_sampling="all")), ("k_clips", dict(num_clips=3)), ("one_clip", dict(num_clips=1))],
)
def test_batched_predictions_equal_clip_by_clip_predictions(model_dir, split_rows, protocol, sampling):
    """Decode once + index clips + batches spanning videos == the processor re-decoding every clip."""
    model, processor = load_model_and_processor(model_dir)
    order = np.argsort(split_rows["NumberOfFrames"])
    paths = [split_rows["video_path"][i] for i in (order[0], order[-1], order[1])]
    # A batch size that splits videos across batches and packs several videos into one.
    results = predict_videos(model, processor, paths, protocol=protocol, num_clips=3, batch_size=7, progress=False)
    for path, result in zip(paths, results, strict=True):
        pixel_values = processor(path, **sampling)["pixel_values"]  # (K, T, C, H, W), decoded per clip
        with torch.no_grad():
            slow = torch.cat([model(pixel_values=chunk).logits.view(-1) for chunk in pixel_values.split(16)])
        assert result.error is None
        assert result.num_clips == len(slow)
        np.testing.assert_allclose(result.clip_predictions, slow.numpy(), rtol=0, atol=1e-5)
        assert result.ef == pytest.approx(float(slow.double().mean()), abs=1e-5)


def test_compiled_prediction_compiles_once_and_equals_eager(model_dir, split_rows):
    """`compile_backend`: the partial last batch is padded to the batch size, so the whole run is one compiled
    graph, and the predictions are the eager ones (padding clips dropped)."""
    model, processor = load_model_and_processor(model_dir)
    paths = list(split_rows["video_path"][:2])
    # A batch size that leaves a partial last batch, whatever the corpus's clip count.
    num_clips = sum(r.num_clips for r in predict_videos(model, processor, paths, batch_size=64, progress=False))
    batch_size = next(b for b in range(7, 64) if num_clips % b)
    eager = predict_videos(model, processor, paths, batch_size=batch_size, progress=False)
    compilations = []

    def counting_backend(graph_module, example_inputs):
        compilations.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    compiled = predict_videos(
        model, processor, paths, batch_size=batch_size, progress=False, compile_backend=counting_backend
    )
    assert len(compilations) == 1
    for fast, slow in zip(compiled, eager, strict=True):
        assert fast.num_clips == slow.num_clips
        np.testing.assert_allclose(fast.clip_predictions, slow.clip_predictions, rtol=0, atol=1e-5)

    for name in ("predict", "evaluate"):
        required = ["videos"] if name == "predict" else []
        args = load_script(name).parse_args([*required, "--model_name_or_path", "m", "--torch_compile"])
        assert args.prediction["compile_backend"] == "inductor"
        args = load_script(name).parse_args([*required, "--model_name_or_path", "m"])
        assert args.prediction["compile_backend"] is None


def test_predict_lists_unreadable_videos_and_predicts_the_rest(corpus, model_dir, tmp_path, capsys):
    folder = tmp_path / "videos"
    folder.mkdir()
    sources = sorted((corpus / "Videos").glob("*.avi"))[:3]
    for source in sources:
        shutil.copy(source, folder / source.name)
    truncate(folder / sources[0].name)  # an interrupted copy: header intact, frames missing
    (folder / "empty.avi").write_bytes(b"")
    output = tmp_path / "ef.json"

    code = load_script("predict").main([str(folder), "--model_name_or_path", str(model_dir), "--output", str(output)])
    assert code == 0
    rows = {row["video"]: row for row in json.loads(output.read_text())}
    assert len(rows) == 4
    assert "truncated" in rows[sources[0].name]["error"] and rows[sources[0].name]["EF"] is None
    assert "empty file" in rows["empty.avi"]["error"]
    for source in sources[1:]:
        row = rows[source.name]
        assert row["error"] is None and math.isfinite(row["EF"]) and row["num_clips"] > 1 and row["clip_spread"] > 0
    printed = capsys.readouterr().out
    assert "2 video(s) could not be read" in printed and "empty file" in printed

    csv_path = tmp_path / "ef.csv"
    assert load_script("predict").main([str(folder / sources[1].name), "--model_name_or_path", str(model_dir),
                                        "--protocol", "one_clip", "--output", str(csv_path)]) == 0  # fmt: skip
    assert pd.read_csv(csv_path)["num_clips"].tolist() == [1]


def test_predict_fails_clearly_without_readable_videos_model_or_processor(model_dir, tmp_path, capsys):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "a.avi").write_bytes(b"not a video at all")
    predict = load_script("predict")
    assert predict.main([str(folder), "--model_name_or_path", str(model_dir)]) == 1
    assert "none of the 1 video(s) could be read" in capsys.readouterr().err

    no_processor = tmp_path / "model_only"
    tiny_regression_model().save_pretrained(no_processor)
    assert predict.main([str(folder), "--model_name_or_path", str(no_processor)]) == 2
    assert "no video processor" in capsys.readouterr().err
    with pytest.raises(ModelLoadingError, match="holds no model"):
        load_model_and_processor(folder)
    with pytest.raises(ModelLoadingError, match="not found"):
        load_model_and_processor(tmp_path / "missing")


@pytest.mark.parametrize("seed", [11, 12, 13, 14, 15])
def test_beat_detection_finds_the_phantoms_cycles_and_traced_frames(seed):
    video = render_phantom(np.random.SeedSequence(seed))
    frames_per_cycle = video.fps * 60.0 / video.heart_rate
    detection = detect_beats(video.frames, video.fps)
    assert abs(len(detection.beats) - len(video.frames) / frames_per_cycle) <= 1
    assert detection.heart_rate == pytest.approx(video.heart_rate, rel=0.1)
    tolerance = max(3.0, 0.1 * frames_per_cycle)
    assert min(abs(ed - video.ed_frame) for ed, _ in detection.beats) <= tolerance
    assert min(abs(es - video.es_frame) for _, es in detection.beats) <= tolerance
    for ed, es in detection.beats:
        assert ed < es <= ed + frames_per_cycle

    # One clip per beat, centred on its systole, always inside the video.
    clips = beat_clip_indices(detection.beats, len(video.frames), num_frames=8, period=2)
    assert clips.shape == (len(detection.beats), 8)
    assert clips.min() >= 0 and clips.max() < len(video.frames)


def test_beat_detection_finds_nothing_in_a_still_video():
    still = np.full((60, 32, 32), 80, dtype=np.uint8)
    assert detect_beats(still, fps=50).beats == []


PICTURES_WITHOUT_PYPLOT = """
import argparse, sys
from pathlib import Path
import torch
from PIL import Image
from configuration_echoai import EchoAIConfig
from inference_echoai import bland_altman_plot, scatter_plot
from modeling_echoai import EchoAIForPreTraining
from training_echoai import save_reconstruction
from video_processing_echoai import EchoAIVideoProcessor

out = Path(sys.argv[1])
sizes = dict(image_size=32, patch_size=8, num_frames=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
             intermediate_size=64, decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
             decoder_intermediate_size=32)
clip = torch.randn(1, 4, 3, 32, 32)
processor = EchoAIVideoProcessor(num_frames=4, image_size=32)
model = EchoAIForPreTraining(EchoAIConfig(**sizes)).eval()
save_reconstruction(model, clip, model(pixel_values=clip), processor, out / "reconstruction.png")
motion = EchoAIConfig(**sizes, reconstruction_target="motion", reconstruction_target_pool=4, norm_pix_loss=False)
model = EchoAIForPreTraining(motion).eval()
save_reconstruction(model, clip, model(pixel_values=clip), processor, out / "reconstruction_motion.png")
hog = EchoAIConfig(**sizes, reconstruction_target="hog", reconstruction_target_pool=4, norm_pix_loss=False)
model = EchoAIForPreTraining(hog).train()
save_reconstruction(model, clip, model(pixel_values=clip), processor, out / "reconstruction_hog.png")
metrics = {"mae": 1.0, "rmse": 1.0, "r2": 0.5, "bias": 0.0, "loa_lower": -2.0, "loa_upper": 2.0}
scatter_plot([50, 60, 40], [52, 58, 45], metrics, out / "scatter.png")
bland_altman_plot([50, 60, 40], [52, 58, 45], metrics, out / "bland_altman.png")
sys.path.insert(0, "scripts")
import experiments
args = argparse.Namespace(experiment="mask_ratio", mask_ratio=0.9, smoke=True, config_name="tiny")
rows = [{"mask_ratio": r, "test_loss_own_ratio": 1.0, "test_loss_common_ratio": 1.1, "ef": {}} for r in (0.8, 0.9)]
experiments.plot(args, rows, out / "experiment.png")
ef = {"0.25": {"mae": 3.0, "mae_std": 0.5, "mean_predictor_mae": 8.6}}
experiments.plot(args, [*({**r, "ef": ef} for r in rows), {"mask_ratio": None, "ef": ef}], out / "experiment_ef.png")
assert "matplotlib.pyplot" not in sys.modules, "a picture went through pyplot"
for name in ("reconstruction", "reconstruction_motion", "reconstruction_hog", "scatter", "bland_altman", "experiment",
             "experiment_ef"):
    image = Image.open(out / f"{name}.png")
    print(name, *image.size, round(image.info["dpi"][0]))
"""


def test_every_picture_is_a_bare_figure_of_its_own_size_drawn_without_pyplot(tmp_path):
    """Reconstructions, evaluation plots and experiment plots all come from `make_figure`: pyplot is never
    imported (so no process-wide backend is chosen for a caller), and each keeps its size in pixels and dpi."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-c", PICTURES_WITHOUT_PYPLOT, str(tmp_path)], cwd=REPO, env=env, capture_output=True,
        text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    sizes = {line.split()[0]: tuple(map(int, line.split()[1:])) for line in result.stdout.splitlines()}
    # 4 frames shown 2 inches wide, 2.1 inches per row (3 rows; a motion target adds its true and predicted
    # motion; a HOG target shows its true and predicted edges in place of a reconstruction), 80 dpi; 5 x 5 and 6 x 4.5 inches at 120; 5 x 3.6 at 100 (10 x 3.6 with the mask ratios' EF beside their reconstruction).
    assert sizes == {
        "reconstruction": (640, 504, 80), "reconstruction_motion": (640, 840, 80),
        "reconstruction_hog": (640, 672, 80), "scatter": (600, 600, 120),
        "bland_altman": (720, 540, 120), "experiment": (500, 360, 100), "experiment_ef": (1000, 360, 100),
    }  # fmt: skip
