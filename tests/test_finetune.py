"""Fine-tuning end to end on a tiny synthetic corpus: from a pretraining checkpoint to a loadable EF model with
results and a model card; EF scaling, label fractions, from-scratch runs, exact resume; the accelerate configs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.commands.config.config_args import load_config_from_file
from data_fixtures import tiny_corpus
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from test_training import TINY_MODEL, load_script, pretrain_argv
from transformers import AutoModelForVideoClassification
from transformers.models.auto.video_processing_auto import AutoVideoProcessor  # the top-level name needs torchvision

import modeling_echoai
from data_echoai import load_echonet_dynamic
from modeling_echoai import EchoAIForVideoClassification


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

    card = ModelCard.load(output / "README.md")
    assert card.data.library_name == "transformers" and "not a medical device" in card.text
    found = {(r.dataset_split, r.metric_type): r for r in card.data.eval_results}
    assert {(s, m) for s in ("validation", "test") for m in ("mae", "rmse", "r2")} <= found.keys()
    test_mae = found[("test", "mae")]
    assert test_mae.task_type == "regression" and test_mae.dataset_name == "EchoAI synthetic echo phantom"
    assert test_mae.metric_value == pytest.approx(results["test"]["mae"])


def test_the_classifier_starts_from_the_pretrained_encoder_without_unexpected_keys(corpus, pretrained):
    finetune = load_script("finetune")
    args = finetune.parse_args(finetune_argv(corpus, Path("unused"), "--model_name_or_path", str(pretrained)))
    model = finetune.build_model(args, load_echonet_dynamic(corpus)["train"])  # the weights of step 0
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


def test_label_fraction_uses_a_seeded_half_of_the_training_videos(corpus, tmp_path):
    finetune = load_script("finetune")
    args = finetune.parse_args(finetune_argv(corpus, tmp_path, "--from_scratch", "--label_fraction", "0.5"))
    _, splits = finetune.load_splits(args, Accelerator(cpu=True))
    _, again = finetune.load_splits(args, Accelerator(cpu=True))
    assert len(splits["train"]) == 4 and splits["train"]["FileName"] == again["train"]["FileName"]
    assert set(splits["train"]["FileName"]) < set(load_echonet_dynamic(corpus)["train"]["FileName"])
    assert len(splits["validation"]) == 2 and len(splits["test"]) == 2  # evaluation is never cut


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


def test_resumed_finetuning_ends_with_the_weights_of_a_straight_run(corpus, pretrained, tmp_path):
    """Copy a checkpoint to a fresh output folder and resume there: the final and the best weights equal a straight
    run's, bit for bit (same batches, clips, augmentation, stochastic depth; the best model travels with the
    checkpoint). 4 steps per epoch, validation at steps 4 and 8."""
    steps = ("--max_train_steps", "8", "--checkpointing_steps", "3", "--model_name_or_path", str(pretrained))
    finetune = load_script("finetune")
    straight, interrupted, resumed = tmp_path / "straight", tmp_path / "interrupted", tmp_path / "resumed"
    finetune.main(finetune_argv(corpus, straight, *steps))
    finetune.main(finetune_argv(corpus, interrupted, *steps))
    for step in ("step_0000003", "step_0000006"):  # one before the first validation, one carrying a best model
        shutil.rmtree(resumed, ignore_errors=True)
        shutil.copytree(interrupted / "checkpoints" / step, resumed / "checkpoints" / step)
        finetune.main(finetune_argv(corpus, resumed, *steps, "--resume_from_checkpoint", "latest"))
        for name in ("checkpoints/step_0000006/model.safetensors", "model.safetensors"):
            expected, got = load_file(straight / name), load_file(resumed / name)
            assert expected.keys() == got.keys()
            for key in expected:
                torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=f"{step} {name} {key}")
        assert (
            json.loads((resumed / "all_results.json").read_text())["validation"]
            == json.loads((straight / "all_results.json").read_text())["validation"]
        )


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
