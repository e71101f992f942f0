"""Fine-tuning end to end on a tiny synthetic corpus: from a pretraining checkpoint to a loadable EF model with
results and a model card; EF scaling, label fractions, from-scratch runs, exact resume; the accelerate configs."""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.commands.config.config_args import load_config_from_file
from data_fixtures import tiny_corpus
from datasets import Dataset
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from test_training import TINY_MODEL, load_script, pretrain_argv
from transformers import AutoModelForVideoClassification
from transformers.models.auto.video_processing_auto import AutoVideoProcessor  # the top-level name needs torchvision

import modeling_echoai
from data_echoai import load_echonet_dynamic
from inference_echoai import predict_videos
from modeling_echoai import EchoAIForVideoClassification
from training_echoai import card_procedure
from video_processing_echoai import EchoAIVideoProcessor


REPO = Path(__file__).resolve().parents[1]
NUM_VIDEOS = 12  # 8 train, 2 validation, 2 test: R² and the SD need two videos per evaluation split


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return tiny_corpus(tmp_path_factory, num_videos=NUM_VIDEOS)


@pytest.fixture(scope="module")
def pretrained(corpus, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("pretrained")
    load_script("pretrain").main(pretrain_argv(corpus, output, "--max_train_steps", "2"))
    return output


def finetune_argv(corpus: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--data_dir", str(corpus), "--output_dir", str(output_dir), "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "2", "--logging_steps", "1", *extra,
    ]  # fmt: skip


def assert_same_weight_file(expected_path: Path, got_path: Path, msg: str = "") -> None:
    """Two safetensors files hold the same tensors under the same names, bit for bit."""
    expected, got = load_file(expected_path), load_file(got_path)
    assert expected.keys() == got.keys(), msg
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=f"{msg} {key}")


def train_ef(corpus: Path) -> np.ndarray:
    return np.asarray(load_echonet_dynamic(corpus)["train"]["EF"], dtype=np.float64)


def test_finetuning_from_a_pretraining_checkpoint_saves_a_loadable_ef_model_results_and_card(
    corpus, pretrained, tmp_path
):
    output = tmp_path / "run"
    result = load_script("finetune").main(
        finetune_argv(
            corpus, output, "--model_name_or_path", str(pretrained), "--max_train_steps", "6", "--eval_num_clips", "2"
        )  # fmt: skip
    )
    assert result.state.global_step == 6 and result.state.epoch == 1  # 4 steps per epoch: one full epoch

    # `output_dir` is the model: loads through the Auto class with its processor and predicts EF in %.
    model = AutoModelForVideoClassification.from_pretrained(output).eval()
    assert isinstance(model, EchoAIForVideoClassification) and model.config.problem_type == "regression"
    processor = AutoVideoProcessor.from_pretrained(output)
    assert processor.to_dict() == AutoVideoProcessor.from_pretrained(pretrained).to_dict()  # preprocessing reused
    videos = sorted((corpus / "Videos").glob("*.avi"))[:2]
    with torch.no_grad():
        logits = model(processor(videos)["pixel_values"]).logits
    assert logits.shape == (2, 1)
    # EF scale: the untrained-ish head sits near the training mean, not near 0 (unit scale).
    assert model.config.regression_target_mean == pytest.approx(train_ef(corpus).mean())
    assert (logits - model.config.regression_target_mean).abs().max() < 3 * model.config.regression_target_std

    results = json.loads((output / "all_results.json").read_text())
    for split in ("validation", "test"):
        assert results[split]["n"] == 2
        assert {"mae", "rmse", "r2"} <= results[split].keys()
        assert results[split]["mae"] >= 0 and results[split]["rmse"] >= results[split]["mae"]
    assert results["steps"] == 6 and results["train_videos"] == 8 and results["seconds"] > 0
    assert results["best_step"] in (4, 6) and "2 evenly spaced clips" in results["eval_protocol"]
    # Beside the model, the mean predictor on the same videos, and whether the model beat it.
    splits = load_echonet_dynamic(corpus)
    for split in ("validation", "test"):
        references = np.asarray(splits[split]["EF"], dtype=np.float64)
        baseline = results[split]["mean_predictor"]
        assert baseline["ef"] == pytest.approx(train_ef(corpus).mean())
        assert baseline["mae"] == pytest.approx(np.abs(references - train_ef(corpus).mean()).mean())
        assert baseline["rmse"] >= baseline["mae"] and results[split]["prediction_sd"] >= 0
    assert isinstance(results["learned_ef"], bool) and results["learned_ef"] == (results["failure"] is None)
    assert results["last_step"]["step"] == 6 and "mae" in results["last_step"]["validation"]  # not only the best
    # The start is named with its weights' sha256, which tells two builds saved under one name apart.
    weights_sha = hashlib.sha256((pretrained / "model.safetensors").read_bytes()).hexdigest()
    assert results["start"] == {"model_name_or_path": str(pretrained), "sha256": weights_sha, "revision": None}

    card = ModelCard.load(output / "README.md")
    assert card.data.library_name == "transformers" and "not a medical device" in card.text
    found = {(r.dataset_split, r.metric_type): r for r in card.data.eval_results}
    assert {(s, m) for s in ("validation", "test") for m in ("mae", "rmse", "r2")} <= found.keys()
    test_mae = found[("test", "mae")]
    assert test_mae.task_type == "regression" and test_mae.dataset_name == "EchoAI synthetic echo phantom"
    assert test_mae.metric_value == pytest.approx(results["test"]["mae"])
    assert (
        f"| start | {pretrained} (weights sha256 {weights_sha[:12]}…) |" in card.text and "| preset |" not in card.text
    )
    assert card.data.base_model is None  # a local folder is no Hub model to link to
    assert "| split | metric | this model | mean predictor |" in card.text
    assert (
        f"| test | MAE | {results['test']['mae']:.3f} | {results['test']['mean_predictor']['mae']:.3f} |" in card.text
    )
    # Six steps of a tiny model learn no EF: said at the top of the card (and in the log, as a WARNING).
    warning = "Warning: this model did not learn to estimate EF"
    assert (warning in card.text.split("## ")[0]) == (not results["learned_ef"])


def test_the_r2plus1d_baseline_trains_through_the_finetuning_script(corpus, tmp_path):
    """`--baseline r2plus1d_18` goes through the same splits, clips, loop, loss and evaluation as EchoAI: a
    two-step run moves the weights of a zero-step run with the same seed, and evaluation loads what it saved."""
    from baselines_echoai import load_baseline
    from inference_echoai import load_model_and_processor

    finetune = load_script("finetune")
    fields = "image_size=32,num_frames=4,base_width=2,stem_width=2,blocks_per_stage=1"
    runs = {}
    for steps in (0, 2):
        runs[steps] = finetune.main(
            finetune_argv(corpus, tmp_path / f"steps{steps}", "--baseline", "r2plus1d_18", "--config_overrides",
                          fields, "--max_train_steps", str(steps))
        )  # fmt: skip
    trained = runs[2]
    assert trained.state.global_step == 2 and len(trained.losses) == 2
    assert all(math.isfinite(loss) for loss in trained.losses)
    start, end = (
        load_file(tmp_path / "steps0" / "model.safetensors"),
        load_file(tmp_path / "steps2" / "model.safetensors"),
    )
    assert start.keys() == end.keys()
    assert not torch.equal(start["head.weight"], end["head.weight"]) and not torch.equal(
        start["stem.0.weight"], end["stem.0.weight"]
    )

    results = json.loads((tmp_path / "steps2" / "all_results.json").read_text())
    assert results["model"] == "r2plus1d_18" and results["learning_rate"] == 1e-3 and results["layer_decay"] is None
    assert results["parameters"] < 20_000 and results["steps"] == 2
    assert "mean_predictor" in results["test"] and isinstance(results["learned_ef"], bool)
    for split in ("validation", "test"):  # the verdict's evidence beside it, for the baseline as for EchoAI
        gain, (low, high) = results[split]["mae_gain"], results[split]["mae_gain_interval"]
        assert gain == pytest.approx(results[split]["mean_predictor"]["mae"] - results[split]["mae"], rel=1e-6)
        assert low <= gain <= high
    assert not (tmp_path / "steps2" / "README.md").exists()  # no EchoAI model card for the baseline
    model = load_baseline(tmp_path / "steps2")
    assert model.config.regression_target_mean == pytest.approx(train_ef(corpus).mean())
    model, processor = load_model_and_processor(tmp_path / "steps2")  # evaluate.py and predict.py score it too
    videos = sorted((corpus / "Videos").glob("*.avi"))[:2]
    with torch.no_grad():
        assert model(processor(videos)["pixel_values"]).logits.shape == (2, 1)

    with pytest.raises(SystemExit):  # EchoAI's transformer knobs do not apply
        finetune.parse_args(finetune_argv(corpus, tmp_path, "--baseline", "r2plus1d_18", "--layer_decay", "0.75"))


def test_max_train_seconds_stops_after_the_step_that_spends_the_budget(corpus, tmp_path):
    output = tmp_path / "run"
    result = load_script("finetune").main(
        finetune_argv(corpus, output, "--from_scratch", "--config_overrides", TINY_MODEL, "--max_train_steps", "6",
                      "--max_train_seconds", "0.001")
    )  # fmt: skip
    assert result.stopped_by_time and result.state.global_step == 1
    results = json.loads((output / "all_results.json").read_text())
    assert results["stopped_by_time"] and results["steps"] == 1 and results["max_train_seconds"] == 0.001
    assert results["train_seconds"] >= 0.001 and results["last_step"]["step"] == 1  # validated where it stopped


def test_classification_validation_scores_the_per_video_class_logits_the_saved_model_predicts(corpus, tmp_path):
    """Classification is validated through the same per-video predictor as EF: class logits averaged over the
    evaluation clips; the kept model's validation accuracy is what those logits of the saved model give."""
    output = tmp_path / "run"
    load_script("finetune").main(
        finetune_argv(corpus, output, "--from_scratch", "--config_overrides", TINY_MODEL, "--max_train_steps", "4",
                      "--num_labels", "2", "--class_boundaries", "50", "--eval_num_clips", "2")
    )  # fmt: skip
    results = json.loads((output / "all_results.json").read_text())
    model = EchoAIForVideoClassification.from_pretrained(output).eval()
    processor = AutoVideoProcessor.from_pretrained(output)
    validation = load_echonet_dynamic(corpus)["validation"]
    predictions = predict_videos(model, processor, validation["video_path"], protocol="k_clips", num_clips=2,
                                 progress=False)  # fmt: skip
    assert all(p.logits.shape == (2,) and math.isnan(p.ef) for p in predictions)
    classes = np.digitize(validation["EF"], [50.0])
    accuracy = float(np.mean([p.logits.argmax() == c for p, c in zip(predictions, classes, strict=True)]))
    assert results["validation"]["accuracy"] == accuracy and results["validation"]["n"] == len(validation)


def test_the_classifier_starts_from_the_pretrained_encoder_without_unexpected_keys(corpus, pretrained):
    finetune = load_script("finetune")
    # --drop_path_rate given (the default is 0) to check below that the flag reaches the classifier's config
    argv = finetune_argv(corpus, Path("unused"), "--model_name_or_path", str(pretrained), "--drop_path_rate", "0.1")
    model = finetune.build_model(finetune.parse_args(argv), load_echonet_dynamic(corpus)["train"])  # step 0's weights
    pretrained_weights = load_file(pretrained / "model.safetensors")
    encoder = {k: v for k, v in model.state_dict().items() if k.startswith("echoai.")}
    assert encoder and encoder.keys() <= pretrained_weights.keys()
    for name, value in encoder.items():
        torch.testing.assert_close(value, pretrained_weights[name], rtol=0, atol=0, msg=name)
    _, info = EchoAIForVideoClassification.from_pretrained(pretrained, num_labels=1, output_loading_info=True)
    assert info["unexpected_keys"] == set() or info["unexpected_keys"] == []  # the decoder is dropped quietly
    assert model.config.drop_path_rate == 0.1 and model.config.regression_target_std == pytest.approx(
        train_ef(corpus).std()
    )


def test_reinit_top_layers_draws_the_top_layers_afresh_and_keeps_the_rest_of_the_checkpoint(
    corpus, pretrained, capsys
):
    finetune, train = load_script("finetune"), load_echonet_dynamic(corpus)["train"]
    checkpoint = load_file(pretrained / "model.safetensors")

    def build(num_layers: int, seed: int = 0) -> EchoAIForVideoClassification:
        argv = finetune_argv(corpus, Path("unused"), "--model_name_or_path", str(pretrained), "--reinit_top_layers",
                             str(num_layers))  # fmt: skip
        torch.manual_seed(seed)  # as `build_accelerator` seeds a run
        return finetune.build_model(finetune.parse_args(argv), train)

    model = build(1)
    depth = model.config.num_hidden_layers
    fresh = (f"echoai.encoder.layer.{depth - 1}.", "echoai.layernorm.")
    encoder = {name: value for name, value in model.state_dict().items() if name.startswith("echoai.")}
    replaced = [name for name in encoder if name.startswith(fresh)]
    assert replaced and any(name.startswith("echoai.layernorm.") for name in replaced) and len(replaced) < len(encoder)
    for name, value in encoder.items():
        if name not in replaced:  # the lower layers and the embeddings: the checkpoint's, bit for bit
            torch.testing.assert_close(value, checkpoint[name], rtol=0, atol=0, msg=name)
        elif value.ndim == 1:  # LayerNorm weights and every bias: the initialisation's ones and zeros
            expected = 1.0 if "norm" in name and name.endswith(".weight") else 0.0
            assert torch.equal(value, torch.full_like(value, expected)), name
        else:  # matrices: new draws at the initialisation's scale, not the checkpoint's values
            assert not torch.equal(value, checkpoint[name]), name
            assert value.std().item() == pytest.approx(model.config.initializer_range, rel=0.3), name
    again, other_seed = build(1).state_dict(), build(1, seed=1).state_dict()
    assert all(torch.equal(again[name], encoder[name]) for name in replaced)  # seeded: a run repeats
    assert not all(torch.equal(other_seed[name], encoder[name]) for name in replaced)
    whole = build(depth).state_dict()  # every layer: the embeddings alone are left of the checkpoint
    first_layer = [name for name in encoder if ".layer.0." in name and encoder[name].ndim > 1]
    assert first_layer and not any(torch.equal(whole[name], checkpoint[name]) for name in first_layer)
    with pytest.raises(ValueError, match=f"can re-initialise 1 to {depth} top layers"):
        build(depth + 1)
    args = finetune.parse_args(["--model_name_or_path", str(pretrained), "--reinit_top_layers", "2"])
    assert "a pretrained encoder with its top 2 layers re-initialised" in card_procedure(
        args, model.config, "regression"
    )
    for flag in ("--reinit_top_layers", "--linear_probe_steps"):
        for flags in (
            ("--from_scratch", "1"),
            ("--baseline", "r2plus1d_18", "1"),
            ("--model_name_or_path", "x", "-1"),
        ):
            with pytest.raises(SystemExit):
                finetune.parse_args([*flags[:-1], flag, flags[-1]])
            assert flag in capsys.readouterr().err
    with pytest.raises(SystemExit):  # heads-only steps are steps: a time budget would stretch them
        finetune.parse_args(["--model_name_or_path", "x", "--max_train_seconds", "60", "--linear_probe_steps", "10"])
    assert "give one of the two" in capsys.readouterr().err
    args = finetune.parse_args(["--model_name_or_path", str(pretrained), "--linear_probe_steps", "200"])
    assert "the heads alone trained for the first 200 steps (LP-FT)" in card_procedure(
        args, model.config, "regression"
    )


def test_lv_segmentation_loss_trains_from_scratch_and_saves_a_model_that_predicts_ef_as_usual(corpus, tmp_path):
    output = tmp_path / "seg"
    argv = [
        "--from_scratch",
        "--config_overrides",
        TINY_MODEL,
        "--max_train_steps",
        "4",
        "--lv_segmentation_weight",
        "1",
    ]
    result = load_script("finetune").main(finetune_argv(corpus, output, *argv))
    results = json.loads((output / "all_results.json").read_text())
    assert results["lv_segmentation_weight"] == 1.0 and result.state.global_step == 4
    segmentation = results["lv_segmentation"]
    assert segmentation["steps"] == 4 and segmentation["window"] == 4
    assert 0 < segmentation["loss_first_steps"] < 10 and math.isfinite(segmentation["loss_last_steps"])
    assert any(key.startswith("lv_head.") for key in load_file(output / "model.safetensors"))
    card = (output / "README.md").read_text()
    assert "LV segmentation loss weight (ED/ES tracings) | 1.0" in card
    assert results["start"] is None and "| preset | tiny |" in card and "| start |" not in card  # from scratch
    model = AutoModelForVideoClassification.from_pretrained(output)
    assert model.config.lv_segmentation_weight == 1.0
    video = load_echonet_dynamic(corpus)["test"]["video_path"][:1]
    (prediction,) = predict_videos(model, AutoVideoProcessor.from_pretrained(output), video, "k_clips", 2)
    assert math.isfinite(prediction.ef) and prediction.num_clips == 2


def test_lv_segmentation_weight_builds_the_head_on_a_checkpoint_and_on_the_baseline(corpus, pretrained, tmp_path):
    finetune, train = load_script("finetune"), load_echonet_dynamic(corpus)["train"]
    checkpoint = ("--model_name_or_path", str(pretrained))
    args = finetune.parse_args(finetune_argv(corpus, tmp_path, *checkpoint, "--lv_segmentation_weight", "0.5"))
    model = finetune.build_model(args, train)
    assert model.config.lv_segmentation_weight == 0.5 and model.lv_head is not None
    model.save_pretrained(tmp_path / "with_head")
    again = finetune.build_model(finetune.parse_args(finetune_argv(corpus, tmp_path, "--model_name_or_path",
                                                                   str(tmp_path / "with_head"),
                                                                   "--lv_segmentation_weight", "0")), train)  # fmt: skip
    assert again.lv_head is None and again.config.lv_segmentation_weight == 0  # the flag is off: the head goes
    cnn = finetune.build_model(finetune.parse_args(finetune_argv(corpus, tmp_path, "--baseline", "r2plus1d_18",
                                                                 "--config_overrides", "base_width=2,stem_width=2",
                                                                 "--lv_segmentation_weight", "0.5")), train)  # fmt: skip
    assert cnn.config.lv_segmentation_weight == 0.5 and cnn.lv_head is not None  # the same supervision for the CNN
    with pytest.raises(SystemExit):
        finetune.parse_args(finetune_argv(corpus, tmp_path, "--from_scratch", "--lv_segmentation_weight", "-1"))


def test_the_lv_segmentation_loss_is_on_by_default_only_where_the_training_split_has_tracings(corpus, caplog):
    finetune, train = load_script("finetune"), load_echonet_dynamic(corpus)["train"]
    assert all(frame >= 0 for frame in train["EDFrame"])  # the synthetic corpus traces every video

    def settled(data: Dataset, *flags: str) -> float:
        args = finetune.parse_args(["--from_scratch", *flags])
        finetune.resolve_lv_segmentation_weight(args, data)
        return args.lv_segmentation_weight

    with caplog.at_level("INFO", logger="finetune"):
        assert settled(train) == finetune.DEFAULT_LV_SEGMENTATION_WEIGHT == 1.0
    assert f"{len(train)} of {len(train)} training videos have ED/ES tracings" in caplog.text
    model = finetune.build_model(finetune.parse_args(finetune_argv(corpus, Path("unused"), "--from_scratch",
                                                                   "--config_overrides", TINY_MODEL)), train)  # fmt: skip
    assert model.config.lv_segmentation_weight == 1.0 and model.lv_head is not None
    assert settled(train, "--lv_segmentation_weight", "0") == 0.0
    assert settled(train, "--lv_segmentation_weight", "0.5") == 0.5
    one_traced = Dataset.from_dict({"EDFrame": [-1, 7, -1]})
    assert settled(one_traced) == 1.0
    untraced = Dataset.from_dict({"EDFrame": [-1, -1]})
    assert settled(untraced) == 0.0 and settled(Dataset.from_dict({"EF": [50.0]})) == 0.0
    with pytest.raises(ValueError, match=r"--lv_segmentation_weight 1 needs ED/ES tracings, but none of the 2 .*"
                                         r"pass --lv_segmentation_weight 0"):  # fmt: skip
        settled(untraced, "--lv_segmentation_weight", "1")
    baseline = finetune.parse_args(["--baseline", "r2plus1d_18"])
    finetune.resolve_lv_segmentation_weight(baseline, train)
    assert baseline.lv_segmentation_weight == 1.0  # the CNN learns from the same tracings (its mask head)
    off = finetune.parse_args(["--baseline", "r2plus1d_18", "--lv_segmentation_weight", "0"])
    finetune.resolve_lv_segmentation_weight(off, untraced)
    assert off.lv_segmentation_weight == 0.0


def test_label_fraction_uses_a_seeded_half_of_the_training_videos(corpus, tmp_path):
    finetune = load_script("finetune")
    args = finetune.parse_args(finetune_argv(corpus, tmp_path, "--from_scratch", "--label_fraction", "0.5"))
    _, splits = finetune.load_splits(args, Accelerator(cpu=True))
    _, again = finetune.load_splits(args, Accelerator(cpu=True))
    assert len(splits["train"]) == 4 and splits["train"]["FileName"] == again["train"]["FileName"]
    assert set(splits["train"]["FileName"]) < set(load_echonet_dynamic(corpus)["train"]["FileName"])
    assert len(splits["validation"]) == 2 and len(splits["test"]) == 2  # evaluation is never cut


def test_a_label_fraction_trains_as_many_steps_as_the_whole_split_unless_told(corpus, tmp_path):
    finetune = load_script("finetune")

    def epochs(*extra: str, start: tuple[str, ...] = ("--from_scratch",)) -> int:
        return finetune.parse_args(finetune_argv(corpus, tmp_path, *start, *extra)).num_train_epochs

    assert epochs() == 45 and epochs("--label_fraction", "0.25") == 4 * epochs()
    assert epochs("--label_fraction", "0.3") == 150 and epochs("--label_fraction", "0.7") == 65  # 64.3 rounds up
    assert epochs("--label_fraction", "0.25", "--num_train_epochs", "7") == 7
    # A checkpoint fine-tunes twice as long as a random start; the baseline is a random start.
    checkpoint = ("--model_name_or_path", str(tmp_path / "pretrained"))
    assert epochs(start=checkpoint) == 90 and epochs("--label_fraction", "0.25", start=checkpoint) == 360
    assert epochs(start=("--baseline", "r2plus1d_18")) == 45


def test_eval_steps_validates_at_the_first_epoch_end_past_each_multiple_and_after_the_last_step(
    corpus, tmp_path, capsys
):
    """4 steps per epoch (8 videos, batch 2), validation every 6 steps: epoch ends 4, 8, 12, 16 validate at 8 (past
    6) and 12 (at 12), not 16 (no multiple of 6 since 12), then after the last step as every run does."""
    finetune = load_script("finetune")
    assert [step for step in (4, 8, 12, 16) if finetune.validation_due(step, 4, 6)] == [8, 12]
    assert all(finetune.validation_due(step, 4, None) for step in (4, 8))  # by default, every epoch
    finetune.main(
        finetune_argv(corpus, tmp_path / "run", "--from_scratch", "--config_overrides", TINY_MODEL,
                      "--max_train_steps", "16", "--eval_steps", "6")
    )  # fmt: skip
    validated = [int(step) for step in re.findall(r"^epoch \d+ step (\d+) validation", capsys.readouterr().out, re.M)]
    assert validated == [8, 12, 16]
    with pytest.raises(SystemExit):
        finetune.parse_args(finetune_argv(corpus, tmp_path, "--from_scratch", "--eval_steps", "0"))
    assert "--eval_steps must be positive, got 0" in capsys.readouterr().err


def test_from_scratch_with_half_the_labels_trains_and_scales_to_its_own_subset(corpus, tmp_path):
    output = tmp_path / "run"
    result = load_script("finetune").main(
        finetune_argv(
            corpus,
            output,
            "--from_scratch",
            "--config_overrides",
            TINY_MODEL,
            "--label_fraction",
            "0.5",
            "--num_train_epochs",
            "2",
            "--regression_loss",
            "huber",
        )  # fmt: skip
    )
    results = json.loads((output / "all_results.json").read_text())
    assert results["train_videos"] == 4 and results["steps"] == 4 == result.state.global_step
    model = AutoModelForVideoClassification.from_pretrained(output)
    assert model.config.hidden_size == 32 and model.config.regression_loss == "huber"
    finetune = load_script("finetune")
    _, splits = finetune.load_splits(finetune.parse_args(finetune_argv(corpus, output, "--from_scratch",
                                                                       "--label_fraction", "0.5")), Accelerator(cpu=True))  # fmt: skip
    assert model.config.regression_target_mean == pytest.approx(np.mean(splits["train"]["EF"]))
    # The card says what was trained: from scratch (no pretraining claimed), with the tiny preset's stem and pooling.
    card = (output / "README.md").read_text()
    assert "trained from a random initialisation, without masked-autoencoder pretraining" in card
    assert "pretrained\nas a masked video autoencoder" not in card
    assert "EF regression from a randomly initialised" in card
    assert "| Stem | 3 strided 3-D convolutions (24/48/96 channels)" in card


@pytest.mark.parametrize("heads_first", [(), ("--linear_probe_steps", "4")], ids=["whole", "linear_probe_first"])
def test_resumed_finetuning_ends_with_the_weights_of_a_straight_run(corpus, pretrained, tmp_path, heads_first):
    """Copy a checkpoint to a fresh output folder and resume there: the final and the best weights equal a straight
    run's, bit for bit (same batches, clips, augmentation, stochastic depth; the best model travels with the
    checkpoint). 4 steps per epoch, validation at steps 4 and 8. With `--linear_probe_steps 4` one checkpoint falls
    in the heads-only steps, whose encoder is still the pretrained one bit for bit, and one after the encoder
    joined."""
    steps = (
        "--max_train_steps",
        "8",
        "--checkpointing_steps",
        "3",
        "--model_name_or_path",
        str(pretrained),
        *heads_first,
    )
    finetune = load_script("finetune")
    straight, interrupted, resumed = tmp_path / "straight", tmp_path / "interrupted", tmp_path / "resumed"
    finetune.main(finetune_argv(corpus, straight, *steps))
    finetune.main(finetune_argv(corpus, interrupted, *steps))
    for step in ("step_0000003", "step_0000006"):  # one before the first validation, one carrying a best model
        shutil.rmtree(resumed, ignore_errors=True)
        shutil.copytree(interrupted / "checkpoints" / step, resumed / "checkpoints" / step)
        finetune.main(finetune_argv(corpus, resumed, *steps, "--resume_from_checkpoint", "latest"))
        for name in ("checkpoints/step_0000006/model.safetensors", "model.safetensors"):
            assert_same_weight_file(straight / name, resumed / name, msg=f"{step} {name}")
        assert (
            json.loads((resumed / "all_results.json").read_text())["validation"]
            == json.loads((straight / "all_results.json").read_text())["validation"]
        )
    if heads_first:
        checkpoint, early = load_file(pretrained / "model.safetensors"), straight / "checkpoints" / "step_0000003"
        encoder = {k: v for k, v in load_file(early / "model.safetensors").items() if k.startswith("echoai.")}
        assert encoder and all(torch.equal(value, checkpoint[name]) for name, value in encoder.items())
        final = load_file(straight / "checkpoints" / "step_0000006" / "model.safetensors")
        assert not all(torch.equal(final[name], checkpoint[name]) for name in encoder)
        assert json.loads((straight / "all_results.json").read_text())["linear_probe_steps"] == 4


def test_weight_average_is_validated_kept_and_resumed_without_changing_the_training(corpus, pretrained, tmp_path):
    """`--ema_decay`: the live weights train exactly as without it, and are validated and tested beside the
    average as the plain run is; the saved model is the average at the kept step (the one each checkpoint
    carries); a run resumed from a checkpoint ends with a straight run's weights and results."""
    steps = ("--max_train_steps", "8", "--checkpointing_steps", "4", "--model_name_or_path", str(pretrained))
    average = ("--ema_decay", "0.9")
    finetune = load_script("finetune")
    plain, straight, resumed = tmp_path / "plain", tmp_path / "straight", tmp_path / "resumed"
    finetune.main(finetune_argv(corpus, plain, *steps))
    finetune.main(finetune_argv(corpus, straight, *steps, *average))
    for step in ("step_0000004", "step_0000008"):  # the live weights of both runs, bit for bit
        name = f"checkpoints/{step}/model.safetensors"
        assert_same_weight_file(plain / name, straight / name, msg=step)

    results = json.loads((straight / "all_results.json").read_text())
    assert results["ema_decay"] == 0.9 and "exponential moving average (decay 0.9)" in results["eval_protocol"]
    # The live weights, validated beside the average, are the plain run: its kept step, validation and test.
    plain_results = json.loads((plain / "all_results.json").read_text())
    assert "live_weights" not in plain_results
    assert results["live_weights"] == {key: plain_results[key] for key in ("best_epoch", "best_step", "validation",
                                                                           "test")}  # fmt: skip
    kept = straight / "checkpoints" / f"step_{results['best_step']:07d}"
    ema_state = torch.load(kept / "custom_checkpoint_1.pkl", weights_only=False)  # [0] is the best model
    assert ema_state["num_updates"] == results["best_step"]
    saved, live = load_file(straight / "model.safetensors"), load_file(kept / "model.safetensors")
    for key in saved:
        torch.testing.assert_close(saved[key], ema_state["average"][key].to(saved[key].dtype), rtol=0, atol=0)
    assert any(not torch.equal(saved[key], live[key]) for key in saved)  # the average, not the live weights
    assert "weight average (EMA) decay" in (straight / "README.md").read_text()

    shutil.copytree(straight / "checkpoints" / "step_0000004", resumed / "checkpoints" / "step_0000004")
    finetune.main(finetune_argv(corpus, resumed, *steps, *average, "--resume_from_checkpoint", "latest"))
    assert_same_weight_file(straight / "model.safetensors", resumed / "model.safetensors")
    resumed_results = json.loads((resumed / "all_results.json").read_text())
    for key in ("validation", "live_weights"):
        assert resumed_results[key] == results[key], key
    for bad in ("1", "-0.5"):
        with pytest.raises(SystemExit):
            finetune.parse_args(finetune_argv(corpus, tmp_path, "--from_scratch", "--ema_decay", bad))


@pytest.mark.parametrize(
    ("name", "distributed_type", "num_machines", "num_processes"),
    [("4gpu_bf16", "MULTI_GPU", 1, 4), ("fsdp", "FSDP", 1, 4), ("multinode", "MULTI_GPU", 2, 8)],
)
def test_accelerate_configs_load_with_accelerate(name, distributed_type, num_machines, num_processes):
    config = load_config_from_file(str(REPO / "configs" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type == distributed_type and config.mixed_precision == "bf16"
    assert (config.num_machines, config.num_processes) == (num_machines, num_processes)
    if name == "fsdp":
        fsdp = config.fsdp_config
        assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD"
        assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert hasattr(modeling_echoai, fsdp["fsdp_transformer_layer_cls_to_wrap"])  # the class FSDP wraps exists
        assert fsdp["fsdp_use_orig_params"], "parameter groups need the original parameters"
    if name == "multinode":
        assert config.machine_rank == 0 and config.main_process_ip and config.main_process_port


def test_recipe_defaults_are_the_ones_the_readme_states():
    """From scratch and from a checkpoint alike: lr 1e-3, no layer decay, no stochastic depth (the MAE recipe held
    a `tiny` checkpoint at the mean predictor). Both: every 4th frame, mild augmentation (the processor's
    defaults), the `tiny` preset with stem and extreme-state pooling. A checkpoint is fine-tuned whole: with its top
    layers re-initialised it reads EF within the seed spread of the whole one at every label count
    (docs/EXPERIMENTS.md, items 55-59)."""
    finetune = load_script("finetune")
    scratch = finetune.parse_args(["--from_scratch"])
    assert (scratch.learning_rate, scratch.layer_decay, scratch.drop_path_rate) == (1e-3, 1.0, 0.0)
    assert scratch.period == 4 and scratch.config_name == "tiny"
    pretrained = finetune.parse_args(["--model_name_or_path", "outputs/pretrain"])
    assert (pretrained.learning_rate, pretrained.layer_decay, pretrained.drop_path_rate) == (1e-3, 1.0, 0.0)
    assert pretrained.reinit_top_layers == pretrained.linear_probe_steps == 0
    explicit = finetune.parse_args(["--from_scratch", "--learning_rate", "3e-4", "--layer_decay", "0.8"])
    assert (explicit.learning_rate, explicit.layer_decay) == (3e-4, 0.8)
    assert scratch.lv_segmentation_weight is pretrained.lv_segmentation_weight is None  # settled by the training split
    assert load_script("pretrain").parse_args([]).period == 4
    processor = EchoAIVideoProcessor()
    augmentation = (processor.augment_padding, processor.brightness_jitter, processor.contrast_jitter)
    assert augmentation == (4, 0.02, 0.1) and processor.gamma_jitter == 0.1
