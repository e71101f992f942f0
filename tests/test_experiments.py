"""The paper's three experiments in --smoke mode on a tiny corpus: every setting gives a row of finite numbers in
results.md / results.json with a plot; runs are shared and reused; the num_frames checkpoint resampling is
exactly the model's own interpolate_pos_encoding."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import tiny_corpus
from test_training import REPO, load_script

from configuration_echoai import EchoAIConfig
from modeling_echoai import EchoAIForPreTraining, EchoAIForVideoClassification
from training_echoai import parse_config_overrides


NUM_VIDEOS = 12  # 8 train, 2 validation, 2 test


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return tiny_corpus(tmp_path_factory, num_videos=NUM_VIDEOS)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("experiment_runs")  # shared: one 16-frame pretraining serves all three


def run_experiment(corpus: Path, runs: Path, output: Path, name: str, *extra: str) -> dict:
    argv = ["--experiment", name, "--smoke", "--data_dir", str(corpus), "--output_dir", str(output)]
    return load_script("experiments").main([*argv, "--runs_dir", str(runs), *extra])


@pytest.mark.parametrize(
    ("name", "settings", "metrics"),
    [
        ("mask_ratio", [0.8, 0.9, 0.95, None], ()),  # three pretrainings, then the random start
        ("num_frames", [4, 8, 16], ("mae", "rmse")),
        ("pretraining", [(0.1, "pretrained"), (0.1, "scratch"), (1.0, "pretrained"), (1.0, "scratch")], ("mae",)),
        ("linear_probe", ["pretrained", "random"], ("mae", "rmse", "validation_mae")),
    ],
)
def test_smoke_experiment_writes_one_finite_row_per_setting_a_table_and_a_plot(
    corpus, runs, tmp_path, name, settings, metrics
):
    results = run_experiment(corpus, runs, tmp_path, name)
    rows = results["rows"]
    key = {"mask_ratio": lambda r: r["mask_ratio"], "num_frames": lambda r: r["num_frames"],
           "pretraining": lambda r: (r["label_fraction"], r["init"]), "linear_probe": lambda r: r["init"]}[name]  # fmt: skip
    assert [key(r) for r in rows] == settings
    assert all(math.isfinite(r[m]) and r[m] >= 0 for r in rows for m in metrics)
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == json.loads(json.dumps(rows))
    table = [line for line in (tmp_path / "results.md").read_text().splitlines() if line.startswith("| ")]
    # header + one row per setting (+ the mean predictor's, which mask_ratio's table adds below its EF)
    assert len(table) == 1 + len(settings) + (name == "mask_ratio")
    assert (tmp_path / f"{name}.png").stat().st_size > 0
    if name == "mask_ratio":
        pretrained, scratch = rows[:3], rows[3]
        for r in pretrained:
            assert all(math.isfinite(r[m]) and r[m] >= 0 for m in ("test_loss_own_ratio", "test_loss_common_ratio"))
        assert all((tmp_path / r["picture"]).stat().st_size > 0 for r in pretrained)
        # EF at the default fraction (all labels) for every start, the random one's shared with `pretraining`'s.
        for r in rows:
            assert list(r["ef"]) == ["1"] and math.isfinite(r["ef"]["1"]["mae"]) and r["ef"]["1"]["train_videos"] == 8
        assert "finetune_scratch_labels1_" in scratch["ef"]["1"]["seeds"][0]["run"]
        assert table[-2].startswith("| random (scratch) |")
        assert table[-1].startswith(f"| mean predictor | — | — | — | {scratch['ef']['1']['mean_predictor_mae']:.3f} |")
        rows = pretrained
        # Nested masks, same clips: the 0.9 model scores the same at its own and the common ratio.
        row = rows[1]
        assert row["test_loss_own_ratio"] == pytest.approx(row["test_loss_common_ratio"])
        # The share predicted is 1 - loss / the target's variance: finite, and at most 1 (a perfect decoder).
        assert all(math.isfinite(r["test_share_predicted"]) and r["test_share_predicted"] <= 1 for r in rows)
        # A loss is read on its target's scale: the report names the target (the tiny preset's: gradient histograms).
        target = "the hidden tubelets' histograms of oriented gradients in 4 x 4 cells, normalised per frame"
        assert {r["reconstruction_target"] for r in rows} == {target}
        assert f"Reconstruction target: {rows[0]['reconstruction_target']}." in (tmp_path / "results.md").read_text()
    assert results["mean_predictor_test_mae"] > 0  # the floor every EF row is read against
    if name != "mask_ratio":
        assert "| mean-predictor MAE | learned EF" in table[0]  # beside every model, from its own training mean
        assert all(r["mean_predictor_mae"] > 0 for r in rows)
    if name == "pretraining":
        assert rows[0]["train_videos"] == 1 and rows[2]["train_videos"] == 8  # 10 % / 100 % of 8 videos
        # The pretrained start's lead over scratch at each fraction, tested over the seeds; one seed a side: p 1/2.
        lead = rows[1]["mae"] - rows[0]["mae"]
        assert table[1].endswith(f"| {lead:.2f} (p = {0.5 if lead > 0 else 1.0:.3f}, least 0.500) |")
        assert table[2].endswith("| — |")


def test_smoke_baselines_put_the_mean_predictor_the_cnn_and_echoai_in_one_table_with_seed_spread(
    corpus, runs, tmp_path
):
    argv = ["--experiment", "baselines", "--smoke", "--data_dir", str(corpus), "--output_dir", str(tmp_path),
            "--runs_dir", str(runs), "--num_seeds", "2", "--time_budget_s", "600"]  # fmt: skip
    results = load_script("experiments").main(argv)
    rows = results["rows"]
    assert [r["model"] for r in rows] == ["mean", "r2plus1d_18", "echoai_scratch", "echoai_pretrained"]
    mean, trained = rows[0], rows[1:]
    assert mean["mae"] == pytest.approx(results["mean_predictor_test_mae"]) and mean["seeds"] == []
    for row in trained:
        assert [s["seed"] for s in row["seeds"]] == [0, 1]
        assert math.isfinite(row["mae"]) and math.isfinite(row["mae_std"]) and row["mae_std"] >= 0
        assert row["mae"] == pytest.approx(np.mean([s["mae"] for s in row["seeds"]]))
        # The same split, labels and budget rule for every model: 2 smoke steps, well inside 600 s.
        assert row["train_videos"] == 8 and row["steps"] == 2 and not any(s["stopped_by_time"] for s in row["seeds"])
        assert row["mean_predictor_mae"] == pytest.approx(mean["mae"])  # evaluate.py's floor, the same training mean
        assert 0 <= row["learned_ef"] <= 2
    assert 0 < rows[1]["parameters"] < 20_000  # the smoke-scale R(2+1)D
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == json.loads(json.dumps(rows))
    table = [line for line in (tmp_path / "results.md").read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(rows) and table[1].startswith("| mean predictor | 0 |")
    assert "mean ± SD over 2 seeds" in table[0] and "R(2+1)D-18, scratch" in table[2]
    assert (tmp_path / "baselines.png").stat().st_size > 0


def test_mask_ratio_pretrains_on_a_separate_unlabeled_corpus_in_bf16_and_names_the_runs_so(
    corpus, tmp_path, tmp_path_factory
):
    unlabeled = tiny_corpus(tmp_path_factory, num_videos=4)
    argv = ["--experiment", "mask_ratio", "--smoke", "--data_dir", str(corpus), "--output_dir", str(tmp_path / "out"),
            "--mask_ratios", "0.9", "--label_fractions", "", "--pretrain_data_dir", str(unlabeled),
            "--mixed_precision", "bf16"]  # fmt: skip
    # A fresh interpreter: accelerate keeps one precision per process, and this one's earlier runs were fp32.
    command = [sys.executable, str(REPO / "scripts" / "experiments.py"), *argv]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    (row,) = results["rows"]  # reconstruction only: no fine-tuning, so no random start either
    assert row["ef"] == {} and "mean_predictor_test_mae" not in results
    run = Path(row["run"])
    assert run.name == f"pretrain_mask0.9_T16_steps2_on_{unlabeled.name}_bf16_seed0"
    pretrain_argv = json.loads((run / "run_argv.json").read_text())["argv"]
    # All of the unlabeled corpus (no --splits), in bf16; the labelled corpus is only fine-tuned and tested on.
    assert pretrain_argv[:2] == ["--data_dir", str(unlabeled)] and "--splits" not in pretrain_argv
    assert pretrain_argv[-2:] == ["--mixed_precision", "bf16"]
    table = [line for line in (tmp_path / "out" / "results.md").read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 2 and "EF MAE" not in table[0]
    assert f"pretraining 2 steps on all of {unlabeled}" in (tmp_path / "out" / "results.md").read_text()


def test_two_pretraining_seeds_in_one_runs_folder_keep_their_own_fine_tunings(corpus, tmp_path):
    """Fine-tuning seed 1 of pretraining seed 0 and of pretraining seed 1 are two runs: neither replaces the other."""
    results = []
    for seed in (0, 1):
        extra = ["--mask_ratios", "0.8", "--num_seeds", "2", "--seed", str(seed)]
        results.append(run_experiment(corpus, tmp_path / "runs", tmp_path / f"seed{seed}", "mask_ratio", *extra))
    seeds = [run for result in results for run in result["rows"][0]["ef"]["1"]["seeds"]]
    assert len({run["run"] for run in seeds}) == 4  # fine-tuning seeds 0, 1 of the first; 1, 2 of the second
    for result in results:  # each fine-tuning still starts from its own experiment's pretraining
        pretraining = result["rows"][0]["run"]
        for run in result["rows"][0]["ef"]["1"]["seeds"]:
            argv = json.loads((Path(run["run"]) / "run_argv.json").read_text())["argv"]
            assert argv[argv.index("--model_name_or_path") + 1] == pretraining


def test_a_rerun_reuses_the_finished_runs(corpus, runs, tmp_path):
    first = run_experiment(corpus, runs, tmp_path / "first", "num_frames")
    stamps = {p: p.stat().st_mtime_ns for p in runs.glob("*/run_argv.json")}
    again = run_experiment(corpus, runs, tmp_path / "again", "num_frames")
    assert stamps and stamps == {p: p.stat().st_mtime_ns for p in runs.glob("*/run_argv.json")}
    assert [r["mae"] for r in again["rows"]] == [r["mae"] for r in first["rows"]]


def test_resampled_checkpoint_predicts_as_the_original_with_interpolated_positions(tmp_path):
    """A 16-frame checkpoint copied for 8 frames equals the original model fed 8 frames with
    interpolate_pos_encoding=True: the copy only moves the resampling from forward time to load time."""
    experiments = load_script("experiments")
    config = EchoAIConfig.from_preset("tiny", **parse_config_overrides(experiments.SMOKE_OVERRIDES), num_frames=16)
    torch.manual_seed(0)
    EchoAIForPreTraining(config).save_pretrained(tmp_path / "T16")
    experiments.EchoAIVideoProcessor(num_frames=16, image_size=config.image_size).save_pretrained(tmp_path / "T16")
    experiments.resample_checkpoint(tmp_path / "T16", tmp_path / "T8", num_frames=8)

    original = EchoAIForVideoClassification.from_pretrained(tmp_path / "T16", num_labels=1).eval()
    resampled = EchoAIForVideoClassification.from_pretrained(tmp_path / "T8", num_labels=1).eval()
    resampled.load_state_dict({k: v for k, v in original.state_dict().items() if "position_embeddings" not in k},
                              strict=False)  # the same (random) head  # fmt: skip
    assert resampled.config.num_frames == 8
    assert experiments.EchoAIVideoProcessor.from_pretrained(tmp_path / "T8").num_frames == 8
    clips = torch.randn(2, 8, config.num_channels, config.image_size, config.image_size)
    with torch.no_grad():
        expected = original(clips, interpolate_pos_encoding=True).logits
        torch.testing.assert_close(resampled(clips).logits, expected)


def test_held_out_share_predicted_is_zero_for_a_mean_decoder_and_does_not_depend_on_the_batch_size(corpus, tmp_path):
    """The mask-ratio experiment's share of the target predicted, 1 - loss / variance over all hidden tubelets: a
    decoder that outputs 0 (the mean of a per-tubelet normalised target) scores 0 however good its loss looks, and
    the loss and share summed over batches are the same as in one batch."""
    experiments = load_script("experiments")
    # Normalised pixels (not the tiny preset's gradient histograms): a target whose mean is 0 in every tubelet.
    normalised_pixels = dict(reconstruction_target="pixels", reconstruction_target_pool=1, norm_pix_loss=True)
    config = EchoAIConfig.from_preset(
        "tiny", **parse_config_overrides(experiments.SMOKE_OVERRIDES), **normalised_pixels
    )
    torch.manual_seed(0)
    model = EchoAIForPreTraining(config)
    with torch.no_grad():
        model.decoder.head.weight.zero_()
        model.decoder.head.bias.zero_()
    model.save_pretrained(tmp_path / "mean_decoder")
    experiments.EchoAIVideoProcessor(num_frames=config.num_frames, image_size=config.image_size).save_pretrained(
        tmp_path / "mean_decoder"
    )
    paths = experiments.load_echonet_dynamic(corpus)["test"]["video_path"]
    scores = [
        experiments.reconstruction_losses(tmp_path / "mean_decoder", paths, {"own": 0.9}, 2, 0, batch_size=size)
        for size in (1, 16)
    ]
    assert scores[0]["own"]["share"] == pytest.approx(0.0, abs=1e-3)
    assert scores[0]["own"]["loss"] > 0.9  # a normalised target's variance: the loss alone looks like any other
    assert scores[0]["own"]["loss"] == pytest.approx(scores[1]["own"]["loss"], rel=1e-5)
    assert scores[0]["own"]["share"] == pytest.approx(scores[1]["own"]["share"], abs=1e-5)


def test_ridge_probe_reads_a_linear_feature_and_not_noise():
    """The linear probe's ridge regression recovers EF from features that hold it linearly (beside distractors)
    and reports no learning from features that are pure noise."""
    rng = np.random.default_rng(0)
    targets = {name: rng.uniform(20, 80, size=n) for name, n in (("train", 120), ("validation", 30), ("test", 30))}
    informative = {name: np.c_[3 * y - 5, rng.normal(size=(len(y), 7))] for name, y in targets.items()}
    probe = load_script("experiments").ridge_probe(informative, targets)
    assert probe["mae"] < 1.0 and probe["learned_ef"] is True and probe["r2"] > 0.99
    # The evidence beside the verdict, as evaluate.py and finetune.py record it: the gain is the MAE difference,
    # and its interval, all above 0, holds it.
    low, high = probe["mae_gain_interval"]
    assert probe["mae_gain"] == pytest.approx(probe["mean_predictor_mae"] - probe["mae"])
    assert 0 < low <= probe["mae_gain"] <= high
    noise = {name: rng.normal(size=(len(y), 8)) for name, y in targets.items()}
    probe = load_script("experiments").ridge_probe(noise, targets)
    assert probe["learned_ef"] is False and probe["r2"] < 0.2
    assert probe["mae_gain_interval"][0] <= 0 and probe["failure"]


def test_report_header_names_a_given_checkpoint_not_this_calls_pretraining_settings():
    """With `--checkpoint` the header names that model; this call's preset and pretraining steps do not apply."""
    experiments = load_script("experiments")
    given = experiments.parse_args(["--experiment", "mask_ratio", "--checkpoint", "runs/dm0_s0"])
    assert experiments.pretraining_words(given) == (
        "pretrained model `runs/dm0_s0` (its own preset and length; not pretrained here)"
    )
    own = experiments.parse_args(["--experiment", "mask_ratio", "--pretrain_steps", "123"])
    words = experiments.pretraining_words(own)
    assert "pretraining 123 steps" in words and f"preset `{own.config_name}`" in words
