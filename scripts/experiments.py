#!/usr/bin/env python
"""The seed paper's three experiments at CPU scale, and the baselines, one command each, on the real training scripts.

    python scripts/experiments.py --experiment mask_ratio     # pretrain at mask 0.8 / 0.9 / 0.95: held-out loss, EF
    python scripts/experiments.py --experiment num_frames     # EF MAE with 4 / 8 / 16 frames, one 16-frame checkpoint
    python scripts/experiments.py --experiment pretraining    # EF MAE, pretrained vs from scratch, 10 % / 100 % labels
    python scripts/experiments.py --experiment baselines      # mean predictor, R(2+1)D-18, EchoAI: same time budget
    python scripts/experiments.py --experiment linear_probe   # ridge regression of EF on frozen encoder features
    python scripts/experiments.py --experiment pretraining --data_dir EchoNet-Dynamic --config_overrides ''
    python scripts/experiments.py --experiment mask_ratio --smoke --output_dir /tmp/smoke   # seconds, for tests

Every run is `scripts/pretrain.py`, `scripts/finetune.py` and `scripts/evaluate.py` called in-process through
their `main(argv)`; nothing here trains. Runs land in `--runs_dir` (default `<output_dir>/runs`) under a name
that says what they are, with the argv that made them (`run_argv.json`); a later call with the same argv
reuses the run, so experiments pointed at one `--runs_dir` share the 16-frame, mask-0.9 pretraining (and
the `num_frames` 16-frame fine-tuning is the `pretraining` experiment's 100 %-labels pretrained run).

* `mask_ratio`: pretrain with each mask ratio (same steps, seed, data: the training split only). Then, on the
  test split (`--recon_num_clips` evenly spaced clips per video, no augmentation) and with masks drawn from
  one seeded generator, `EchoAIForPreTraining` in eval mode scores its reconstruction loss (the MSE on its own
  target) of the hidden tubelets twice: at the model's own ratio, and at one common ratio (`--mask_ratio`) so the
  models face the same task; and, at its own ratio, the share of the target's variance it predicts (near 0: the
  decoder collapsed to the target's mean, and the loss alone would not say so).
  The masks are nested (the generator's noise is shared, a higher ratio hides a superset). One
  reconstruction picture per model (`training_echoai.save_reconstruction`). Then EF, what a ratio is for: each
  checkpoint, and a random start beside them, fine-tuned alike at each `--label_fractions` (default 1.0) for
  `--num_seeds` seeds and scored on the test split.
* `num_frames`: one pretraining at `--pretrain_num_frames`; for each frame count the checkpoint is copied
  with its position tables resampled to the new length (`resize_position_embeddings`, the same resampling
  `interpolate_pos_encoding=True` applies at forward time), then fine-tuned with a processor of that frame
  count on all the labels, for `--num_seeds` seeds, and evaluated on the test split.
* `pretraining`: fine-tune from the checkpoint and `--from_scratch` (same preset and overrides, same steps,
  same recipe) at each `--label_fractions`, for `--num_seeds` fine-tuning seeds; mean and spread.
* `baselines`: one row per `--models` entry on the same split and labels (all of them): the mean predictor (the
  training split's mean EF for every test video), EchoNet-Dynamic's R(2+1)D-18 from scratch (`finetune.py
  --baseline r2plus1d_18`, its own recipe), and EchoAI from scratch and pretrained (finetune.py's default recipe;
  `model_argv` is where a new EchoAI recipe enters). Every trained model gets the same `--time_budget_s` seconds of
  training (`--max_train_seconds`: evaluation excluded, the schedule decays within the budget, the step count
  depends on the machine and is reported) or `--finetune_steps`, whichever runs out first, for `--num_seeds` seeds.
  Pretraining is outside the budget (its time is reported). The R(2+1)D takes the clip geometry (`num_frames`,
  `image_size`, `num_channels`) of `--config_overrides` plus `--baseline_overrides`.
* `linear_probe`: the pretrained encoder frozen, and a randomly initialised one of the same config beside it; each
  video's feature is the classification head's input (`config.pooling` of the last hidden states, averaged over
  `--eval_num_clips` evenly spaced clips, no augmentation); a ridge regression of EF on the training split's
  features, its penalty chosen by validation MAE, scored on the test split. It asks whether pretraining put EF
  into the features at all, apart from how fine-tuning moves them (the MAE paper's linear-probe protocol).

`--pretrain_data_dir` pretrains on all of a larger unlabeled corpus instead of the labelled training split (the
paper's setting: far more unlabeled videos than labels), and `--mixed_precision bf16` trains every run in bf16
autocast (faster on a CPU with bf16 units).

`--checkpoint` names an existing pretraining output to use instead of pretraining here (e.g. one pretrained on a
larger unlabeled corpus with `scripts/pretrain.py`).

EF results are `scripts/evaluate.py` on the test split (`k_clips` with `--eval_num_clips` evenly spaced
clips averaged per video, `one_clip` when 1) of the model `finetune.py` kept (best validation MAE, one clip;
validated about 20 times per run, every `--finetune_steps` / 20 steps, whatever the label fraction: at 10 % of a
small split an epoch is a few steps, and validating after each would cost more than the training).
Every EF table shows the mean predictor beside the model (its test MAE, from the model's own training mean) and
whether the model learned EF at all (`metrics_echoai.check_against_mean_predictor` on the test split); the linear
probe's table also shows by how much (its gain over the mean predictor with the 95 % bootstrap interval).

Writes `results.md` (table), `results.json` (everything, with wall times) and `<experiment>.png` (plus
`reconstruction_mask*.png` for `mask_ratio`) into `--output_dir`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from configuration_echoai import EchoAIConfig
from data_echoai import load_echonet_dynamic, synthetic_echonet_dir
from inference_echoai import make_figure, predict_videos
from metrics_echoai import VERDICT_KEYS, check_against_mean_predictor, compute_ef_metrics, permutation_test
from modeling_echoai import EchoAIForPreTraining, EchoAIForVideoClassification, make_mask, token_grid
from training_echoai import (
    describe_reconstruction_target,
    from_pretrained_with_geometry,
    parse_config_overrides,
    save_reconstruction,
    share_of_target_predicted,
)
from video_processing_echoai import EchoAIVideoProcessor


SCRIPTS = Path(__file__).resolve().parent


logger = logging.getLogger("experiments")

# CPU scale: the tiny preset as it is (112 x 112, its convolutional stem and extreme-state pooling: the recipe
# that reads EF, docs/EXPERIMENTS.md). Smoke: a few thousand parameters on 32 x 32 frames, as the tests' TINY_MODEL.
DEFAULT_OVERRIDES = ""
SMOKE_OVERRIDES = (
    "image_size=32,patch_size=8,hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,"
    "decoder_hidden_size=16,decoder_num_hidden_layers=1,decoder_num_attention_heads=2,decoder_intermediate_size=32"
)
# The R(2+1)D-18 baseline at smoke scale: a few thousand parameters (the full network is the default).
BASELINE_SMOKE_OVERRIDES = "base_width=2,stem_width=2,blocks_per_stage=1"
GEOMETRY = ("num_frames", "image_size", "num_channels")  # what every model of the baselines table shares
BASELINE_MODELS = {  # --models of the baselines experiment: the table's row names
    "mean": "mean predictor",
    "r2plus1d_18": "R(2+1)D-18, scratch",
    "echoai_scratch": "EchoAI, scratch",
    "echoai_pretrained": "EchoAI, pretrained",
}
LEARNED = {True: "yes", False: "no", None: "n/a"}  # the verdict of check_against_mean_predictor, or none recorded
# With a time budget and no --finetune_steps the budget alone decides (the schedule follows the larger fraction).
BUDGET_STEP_CAP = 1_000_000
# Defaults of the full runs / of --smoke, for the flags left unset.
SCALE = {
    "pretrain_steps": (1000, 2),
    "finetune_steps": (400, 2),
    "per_device_train_batch_size": (8, 1),  # smoke: 10 % of a 12-video corpus is one video
    "eval_num_clips": (4, 1),
    "recon_num_clips": (2, 1),
    "num_seeds": (None, 1),  # None: 2 for `pretraining` and `baselines`, 1 otherwise
    "time_budget_s": (300.0, 0.0),  # baselines: seconds of training per run; 0: steps only
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--experiment", choices=EXPERIMENTS, required=True)
    add("--output_dir", default=None, help="results.md, results.json, plots (default outputs/experiments/<name>).")
    add("--runs_dir", default=None, help="Pretraining / fine-tuning runs, reused when complete (<output_dir>/runs).")
    add("--smoke", action="store_true", help="A few steps of a few-thousand-parameter model: seconds, for tests.")
    add("--data_dir", default=None, help="EchoNet-layout folder (default: the synthetic corpus).")
    add("--synthetic_num_videos", type=int, default=200, help="Size of the synthetic corpus (75/12.5/12.5 split).")
    add("--config_name", default="tiny", help="Preset of every model.")
    add("--config_overrides", default=None, help=f"Config overrides of every model (default {DEFAULT_OVERRIDES!r}).")
    add("--seed", type=int, default=0, help="Seed of pretraining, masks, and the first fine-tuning seed.")
    add(
        "--checkpoint", default=None,
        help="An existing pretraining output (scripts/pretrain.py) used as the pretrained model instead of "
        "pretraining here; --pretrain_steps and --mask_ratio then do not apply to it.",
    )  # fmt: skip
    add("--num_seeds", type=int, default=None, help="Fine-tuning seeds (seed, seed+1, ...); default 2 / 1.")
    add("--pretrain_steps", type=int, default=None, help="Pretraining steps (default 1000; smoke 2).")
    add("--finetune_steps", type=int, default=None, help="Fine-tuning steps, every setting (default 400; smoke 2).")
    add("--per_device_train_batch_size", type=int, default=None, help="Default 8; smoke 1.")
    add("--eval_num_clips", type=int, default=None, help="Test clips averaged per video (default 4; smoke 1).")
    add("--recon_num_clips", type=int, default=None, help="Test clips per video for reconstruction (2; smoke 1).")
    add("--num_threads", type=int, default=1, help="torch CPU threads (0: torch's default); see torch_threads().")
    add("--mask_ratio", type=float, default=0.9, help="Mask ratio of the shared pretraining and common evaluation.")
    add("--mask_ratios", default="0.8,0.9,0.95", help="mask_ratio: the ratios compared.")
    add("--pretrain_num_frames", type=int, default=16, help="Frames per clip of the shared pretraining.")
    add("--frames", default="4,8,16", help="num_frames: the frame counts compared.")
    add(
        "--label_fractions", default=None,
        help="pretraining: the label fractions compared (default 0.1,1.0). mask_ratio: the fractions each "
        "ratio's checkpoint (and a random start) is fine-tuned at, for EF (default 1.0; '' for reconstruction only).",
    )  # fmt: skip
    add(
        "--pretrain_data_dir", default=None,
        help="An unlabeled EchoNet-layout corpus to pretrain on, all of its videos (e.g. a larger phantom made with "
        "scripts/make_synthetic_echonet.py); default: the training split of --data_dir.",
    )  # fmt: skip
    add(
        "--mixed_precision", choices=("no", "bf16"), default="no",
        help="Precision of every pretraining and fine-tuning (the scripts' --mixed_precision); evaluation is fp32.",
    )  # fmt: skip
    add(
        "--models", default=",".join(BASELINE_MODELS), help=f"baselines: the table's rows, of {list(BASELINE_MODELS)}."
    )
    add(
        "--time_budget_s", type=float, default=None,
        help="baselines: seconds of training per run, the same for every model (default 300; smoke 0: steps only). "
        "Without --finetune_steps the budget alone decides how many steps each model gets.",
    )  # fmt: skip
    add(
        "--baseline_overrides", default=None,
        help="baselines: R(2+1)D config fields beside the geometry of --config_overrides, e.g. 'base_width=16,stem_width=12' "
        f"(default: none, the full R(2+1)D-18; smoke {BASELINE_SMOKE_OVERRIDES!r}).",
    )  # fmt: skip
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    unknown = [m for m in names(args.models) if m not in BASELINE_MODELS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {list(BASELINE_MODELS)}")
    settle_defaults(args)
    return args


def settle_defaults(args: argparse.Namespace) -> None:
    """Fill the flags left unset with the full-run or the --smoke value (SCALE and the overrides' defaults)."""
    if args.time_budget_s is None:
        full, smoke = SCALE["time_budget_s"]
        args.time_budget_s = smoke if args.smoke else full
    if args.experiment == "baselines" and args.finetune_steps is None and args.time_budget_s and not args.smoke:
        args.finetune_steps = BUDGET_STEP_CAP  # smoke runs stay a few steps, budget or not
    for name, (full, smoke) in SCALE.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
    if args.num_seeds is None:
        args.num_seeds = 2 if args.experiment in ("pretraining", "baselines") else 1
    if args.label_fractions is None:
        args.label_fractions = "1.0" if args.experiment == "mask_ratio" else "0.1,1.0"
    if args.baseline_overrides is None:
        args.baseline_overrides = BASELINE_SMOKE_OVERRIDES if args.smoke else ""
    if args.config_overrides is None:
        args.config_overrides = SMOKE_OVERRIDES if args.smoke else DEFAULT_OVERRIDES
    args.output_dir = Path(args.output_dir or f"outputs/experiments/{args.experiment}")
    args.runs_dir = Path(args.runs_dir) if args.runs_dir else args.output_dir / "runs"


# --------------------------------------------------------------------------------------------------
# Runs of the real scripts, cached by their argv
# --------------------------------------------------------------------------------------------------


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"echoai_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name: str, output_dir: Path, argv: list[str]) -> float:
    """`scripts/<name>.py` main(argv + --output_dir) unless `output_dir` already holds a run of the same argv.
    Returns the run's wall time in seconds (the recorded one when reused)."""
    record = output_dir / "run_argv.json"
    if record.is_file():
        previous = json.loads(record.read_text())
        if previous["argv"] == argv:
            logger.info("Reusing %s (%s)", output_dir, name)
            return previous["seconds"]
    shutil.rmtree(output_dir, ignore_errors=True)  # a partial run or one of other settings
    logger.info("Running %s -> %s", name, output_dir)
    start = time.perf_counter()
    status = load_script(name).main([*argv, "--output_dir", str(output_dir)])
    if name == "evaluate" and status:
        raise RuntimeError(f"scripts/evaluate.py failed ({status}) for {output_dir}")
    seconds = time.perf_counter() - start
    record.write_text(json.dumps({"argv": argv, "seconds": round(seconds, 2)}, indent=2))
    return seconds


def overrides(args: argparse.Namespace, **fields) -> str:
    return ",".join(filter(None, [args.config_overrides, *(f"{k}={v}" for k, v in fields.items())]))


def pretrain(args: argparse.Namespace, corpus: Path, mask_ratio: float, num_frames: int) -> tuple[Path, float]:
    """A masked-autoencoder pretraining on the training split only (the test split stays unseen), or the
    `--checkpoint` given (0 seconds: it was not made here)."""
    if args.checkpoint:
        if num_frames != args.pretrain_num_frames or mask_ratio != args.mask_ratio:
            raise ValueError(f"--checkpoint {args.checkpoint} is one pretraining; this experiment needs several")
        return Path(args.checkpoint), 0.0
    # Unlabeled videos: all of --pretrain_data_dir, or the labelled corpus's training split (its test split unseen).
    data = (
        ["--data_dir", args.pretrain_data_dir]
        if args.pretrain_data_dir
        else ["--data_dir", str(corpus), "--splits", "train"]
    )
    output = args.runs_dir / (
        f"pretrain_mask{mask_ratio:g}_T{num_frames}_steps{args.pretrain_steps}{corpus_tag(args)}{precision_tag(args)}"
        f"_seed{args.seed}"
    )  # fmt: skip
    argv = [
        *data, "--config_name", args.config_name,
        "--config_overrides", overrides(args, mask_ratio=mask_ratio, num_frames=num_frames),
        "--max_train_steps", str(args.pretrain_steps), "--per_device_train_batch_size",
        str(args.per_device_train_batch_size), "--seed", str(args.seed), "--reconstruction_steps", "0",
        "--logging_steps", "50", *precision(args),
    ]  # fmt: skip
    return output, run_script("pretrain", output, argv)


def corpus_tag(args: argparse.Namespace) -> str:
    """Run folders of a pretraining on --pretrain_data_dir (and their fine-tunings) name that corpus."""
    return f"_on_{Path(args.pretrain_data_dir).name}" if args.pretrain_data_dir else ""


def precision_tag(args: argparse.Namespace) -> str:
    """Run folders of bf16 runs say so, so that they never take the place of the fp32 runs of the same settings."""
    return "_bf16" if args.mixed_precision == "bf16" else ""


def precision(args: argparse.Namespace) -> list[str]:
    """The scripts' precision flag, only when not their fp32 default (so fp32 runs keep the argv they were cached by)."""
    return ["--mixed_precision", args.mixed_precision] if args.mixed_precision != "no" else []


def finetune_and_test(
    args: argparse.Namespace, corpus: Path, name: str, start: Path | None, label_fraction: float, seed: int
) -> dict:
    """Fine-tune (from `start`, or from scratch when None) then score the kept model on the test split."""
    init = (
        ["--model_name_or_path", str(start)]
        if start
        else ["--from_scratch", "--config_name", args.config_name, "--config_overrides", overrides(args)]
    )
    return train_and_test(args, corpus, name, init, label_fraction, seed)


def train_and_test(
    args: argparse.Namespace, corpus: Path, name: str, init: list[str], label_fraction: float, seed: int,
    time_budget_s: float = 0.0,
) -> dict:  # fmt: skip
    """`finetune.py` with the model arguments `init` (and `--max_train_seconds time_budget_s` when > 0), then
    `evaluate.py` of the kept model on the test split; the test metrics, the mean predictor's and the verdict."""
    budget = f"_budget{time_budget_s:g}s" if time_budget_s else ""
    output = args.runs_dir / (
        f"finetune_{name}_labels{label_fraction:g}_steps{args.finetune_steps}{budget}{precision_tag(args)}_seed{seed}"
    )
    argv = [
        "--data_dir", str(corpus), *init, "--max_train_steps", str(args.finetune_steps),
        "--per_device_train_batch_size", str(args.per_device_train_batch_size), "--per_device_eval_batch_size", "16",
        "--label_fraction", str(label_fraction), "--seed", str(seed), "--eval_num_clips", "1", "--logging_steps", "50",
        "--eval_steps", str(max(1, args.finetune_steps // 20)),
        *(["--max_train_seconds", f"{time_budget_s:g}"] if time_budget_s else []), *precision(args),
    ]  # fmt: skip
    finetune_seconds = run_script("finetune", output, argv)
    protocol = ["--protocol", "k_clips", "--num_clips", str(args.eval_num_clips)]
    evaluate_argv = [
        "--model_name_or_path", str(output), "--data_dir", str(corpus), "--split", "test",
        *(protocol if args.eval_num_clips > 1 else ["--protocol", "one_clip"]), "--bootstrap", "0",
        "--per_device_eval_batch_size", "16",
    ]  # fmt: skip
    evaluate_seconds = run_script("evaluate", output / "test", evaluate_argv)
    metrics = json.loads((output / "test" / "metrics.json").read_text())
    trained = json.loads((output / "all_results.json").read_text())
    # A run reused from before the mean-predictor check and the time budget lacks their fields: None, shown n/a.
    return {
        "mae": metrics["mae"], "rmse": metrics["rmse"], "r2": metrics["r2"], "n": metrics["n"],
        "mean_predictor_mae": (metrics.get("mean_predictor") or {}).get("mae"),
        "learned_ef": metrics.get("learned_ef"), "failure": metrics.get("failure"),
        "train_videos": trained["train_videos"], "parameters": trained.get("parameters"), "steps": trained["steps"],
        "best_step": trained["best_step"], "train_seconds": trained.get("train_seconds"),
        "stopped_by_time": trained.get("stopped_by_time"), "seed": seed, "finetune_seconds": finetune_seconds,
        "evaluate_seconds": evaluate_seconds, "run": str(output),
    }  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Held-out reconstruction and checkpoint resampling
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def reconstruction_losses(
    checkpoint: Path, video_paths: list[str], mask_ratios: dict[str, float], num_clips: int, seed: int,
    picture: Path | None = None, batch_size: int = 16,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """Per named mask ratio, the reconstruction loss (the MSE on the model's own target,
    `modeling_echoai.target_patches`) of the hidden tubelets of fixed test clips, in eval mode, and the share of the
    target's variance the decoder predicts over all those tubelets (`share_of_target_predicted`).
    `{name: {"loss": ..., "share": ...}}`.

    Clips: `num_clips` evenly spaced per video, no augmentation. Masks: one generator seeded by `seed` per
    ratio, so every model sees the same masks at a given ratio, and ratios share the noise (nested masks).
    Every clip hides the same number of tubelets, so the mean of batch losses weighted by batch size is the
    mean over all hidden tubelets.
    """
    model = EchoAIForPreTraining.from_pretrained(checkpoint).eval()
    processor = EchoAIVideoProcessor.from_pretrained(checkpoint)
    clips = torch.cat(
        [
            processor(path, clip_sampling="uniform", num_clips=num_clips, do_augment=False)["pixel_values"]
            for path in video_paths
        ]
    )  # (V·K, T, C, H, W)
    grid = token_grid(model.config, clips, interpolate_pos_encoding=False)
    losses = {}
    for name, ratio in mask_ratios.items():
        generator = torch.Generator().manual_seed(seed)
        mask = make_mask(len(clips), grid, ratio, model.config.mask_strategy, generator=generator)  # (V·K, L)
        total, target_sum, target_squares, target_count = 0.0, 0.0, 0.0, 0
        for start in range(0, len(clips), batch_size):
            batch, batch_mask = clips[start : start + batch_size], mask[start : start + batch_size]
            outputs = model(pixel_values=batch, bool_masked_pos=batch_mask)
            total += float(outputs.loss) * len(batch)
            target = model.reconstruction_target(batch, batch_mask).double()
            target_sum += float(target.sum())
            target_squares += float(target.square().sum())
            target_count += target.numel()
            if picture is not None and start == 0 and ratio == model.config.mask_ratio:
                save_reconstruction(model, batch, outputs, processor, picture)
        loss = total / len(clips)
        variance = target_squares / target_count - (target_sum / target_count) ** 2
        losses[name] = {"loss": loss, "share": share_of_target_predicted(loss, variance)}
    return losses


def resample_checkpoint(source: Path, target: Path, num_frames: int) -> Path:
    """A copy of a pretraining checkpoint and its processor for clips of `num_frames` frames, with the position
    tables resampled once (`from_pretrained_with_geometry`), so every fine-tuning run starts from the same file."""
    if (target / "model.safetensors").is_file():
        return target
    resized = from_pretrained_with_geometry(EchoAIForPreTraining, str(source), {"num_frames": num_frames})
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    resized.save_pretrained(partial)
    EchoAIVideoProcessor.from_pretrained(source, num_frames=num_frames).save_pretrained(partial)
    partial.rename(target)
    return target


# --------------------------------------------------------------------------------------------------
# Experiments: each returns (rows, extra results)
# --------------------------------------------------------------------------------------------------


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def seed_summary(runs: list[dict]) -> dict:
    """Mean and SD (ddof=1; NaN for one seed) over seeds of each test metric, the seeds that learned EF, the
    training videos (the same for every seed) and the seeds' runs themselves."""
    summary = {"train_videos": runs[0]["train_videos"]}
    for key in ("mae", "rmse", "r2"):
        values = np.array([r[key] for r in runs], dtype=float)
        summary[key] = float(values.mean())
        summary[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
    summary["mean_predictor_mae"] = runs[0]["mean_predictor_mae"]  # same training subset for every seed
    summary["learned_ef"] = sum(r["learned_ef"] is True for r in runs)
    summary["seeds"] = runs
    return summary


def pretrained_name(args: argparse.Namespace, mask_ratio: float, num_frames: int | None = None) -> str:
    """The fine-tuning runs' name for a start pretrained here: the shared pretraining's (mask `--mask_ratio`) is the
    same in every experiment, so `pretraining`, `num_frames` and `mask_ratio` reuse one another's runs. It names
    everything that tells one pretraining from another (ratio, corpus, seed), so that no two pretrainings'
    fine-tunings share a folder: a run whose argv differs is redone in place, and would replace the other's."""
    ratio = "" if mask_ratio == args.mask_ratio else f"_mask{mask_ratio:g}"
    pretraining = (
        f"_from_{Path(args.checkpoint).name}" if args.checkpoint else f"{corpus_tag(args)}_pretrainseed{args.seed}"
    )
    return f"pretrained{ratio}_T{num_frames or args.pretrain_num_frames}{pretraining}"


def fine_tuned_over_seeds(
    args: argparse.Namespace, corpus: Path, name: str, start: Path | None, label_fraction: float
) -> dict:
    """`start` (None: a random start) fine-tuned at `label_fraction` for `--num_seeds` seeds: `seed_summary`."""
    return seed_summary(
        [finetune_and_test(args, corpus, name, start, label_fraction, args.seed + i) for i in range(args.num_seeds)]
    )


def fine_tuned_at_each_fraction(args: argparse.Namespace, corpus: Path, name: str, start: Path | None) -> dict:
    """{label fraction: `fine_tuned_over_seeds`} at each `--label_fractions`."""
    return {f"{fraction:g}": fine_tuned_over_seeds(args, corpus, name, start, fraction)
            for fraction in floats(args.label_fractions)}  # fmt: skip


def experiment_mask_ratio(args: argparse.Namespace, corpus: Path) -> list[dict]:
    test_paths = load_echonet_dynamic(corpus)["test"]["video_path"]
    rows = []
    for ratio in floats(args.mask_ratios):
        checkpoint, seconds = pretrain(args, corpus, ratio, args.pretrain_num_frames)
        picture = args.output_dir / f"reconstruction_mask{ratio:g}.png"
        losses = reconstruction_losses(
            checkpoint, test_paths, {"own": ratio, "common": args.mask_ratio}, args.recon_num_clips, args.seed,
            picture=picture,
        )  # fmt: skip
        target = describe_reconstruction_target(EchoAIConfig.from_pretrained(checkpoint))
        rows.append(
            {"mask_ratio": ratio, "test_loss_own_ratio": losses["own"]["loss"],
             "test_loss_common_ratio": losses["common"]["loss"], "test_share_predicted": losses["own"]["share"],
             "reconstruction_target": target, "pretrain_seconds": seconds, "picture": picture.name,
             "run": str(checkpoint),
             "ef": fine_tuned_at_each_fraction(args, corpus, pretrained_name(args, ratio), checkpoint)}
        )  # fmt: skip
    if floats(args.label_fractions):  # what pretraining at any ratio is worth: a random start, fine-tuned the same way
        rows.append({"mask_ratio": None, "ef": fine_tuned_at_each_fraction(args, corpus, "scratch", None)})
    return rows


def experiment_num_frames(args: argparse.Namespace, corpus: Path) -> list[dict]:
    checkpoint, pretrain_seconds = pretrain(args, corpus, args.mask_ratio, args.pretrain_num_frames)
    rows = []
    for num_frames in (int(v) for v in floats(args.frames)):
        start = checkpoint
        if num_frames != args.pretrain_num_frames:
            start = resample_checkpoint(checkpoint, args.runs_dir / f"{checkpoint.name}_resampled_T{num_frames}",
                                        num_frames)  # fmt: skip
        ef = fine_tuned_over_seeds(args, corpus, pretrained_name(args, args.mask_ratio, num_frames), start, 1.0)
        rows.append({"num_frames": num_frames, **ef, "pretrain_seconds": pretrain_seconds})
    return rows


def experiment_pretraining(args: argparse.Namespace, corpus: Path) -> list[dict]:
    checkpoint, pretrain_seconds = pretrain(args, corpus, args.mask_ratio, args.pretrain_num_frames)
    starts = {
        "pretrained": (fine_tuned_at_each_fraction(args, corpus, pretrained_name(args, args.mask_ratio), checkpoint),
                       pretrain_seconds),
        "scratch": (fine_tuned_at_each_fraction(args, corpus, "scratch", None), 0.0),
    }  # fmt: skip
    return [
        {"label_fraction": float(fraction), "init": init, **ef[fraction], "pretrain_seconds": seconds}
        for fraction in starts["scratch"][0]
        for init, (ef, seconds) in starts.items()
    ]


def model_argv(args: argparse.Namespace, corpus: Path, model: str) -> tuple[list[str], float]:
    """What makes each trained model of the baselines table: its `finetune.py` model arguments (everything else --
    data, labels, budget, batch, seeds, evaluation -- is shared), and the seconds spent before fine-tuning.

    EchoAI rows use finetune.py's default recipe; a new EchoAI recipe (flags or `--config_overrides`) enters here."""
    if model == "r2plus1d_18":
        geometry = {k: v for k, v in parse_config_overrides(args.config_overrides).items() if k in GEOMETRY}
        fields = ",".join(filter(None, [*(f"{k}={v}" for k, v in geometry.items()), args.baseline_overrides]))
        return ["--baseline", "r2plus1d_18", "--config_overrides", fields], 0.0
    if model == "echoai_scratch":
        return ["--from_scratch", "--config_name", args.config_name, "--config_overrides", overrides(args)], 0.0
    if model == "echoai_pretrained":
        checkpoint, pretrain_seconds = pretrain(args, corpus, args.mask_ratio, args.pretrain_num_frames)
        return ["--model_name_or_path", str(checkpoint)], pretrain_seconds
    raise ValueError(f"no finetune.py arguments for {model!r}; add them to model_argv")


def frozen_features(
    model: EchoAIForVideoClassification, processor, paths: list[str], num_clips: int
) -> tuple[np.ndarray, np.ndarray]:
    """Which videos were readable (V,), and their features (readable, width): the head's input (the pooled last
    hidden states; the model is built with `num_labels=0`, so its "logits" skip the classifier), averaged over
    `num_clips` evenly spaced clips by the per-video predictor evaluation uses (`predict_videos`)."""
    protocol = "k_clips" if num_clips > 1 else "one_clip"
    results = predict_videos(model, processor, paths, protocol=protocol, num_clips=num_clips, progress=False)
    for result in results:
        if result.error is not None:
            logger.warning("Could not read %s: %s", result.path, result.error)
    readable = np.array([result.error is None for result in results])
    return readable, np.stack([result.logits for result in results if result.error is None])


def ridge_probe(features: dict[str, np.ndarray], targets: dict[str, np.ndarray]) -> dict:
    """Ridge regression of EF on standardised features: fit on train, penalty by validation MAE, test scores."""
    mean, scale = features["train"].mean(0), features["train"].std(0) + 1e-6
    x = {name: (f - mean) / scale for name, f in features.items()}
    y_mean = targets["train"].mean()
    gram, moment = x["train"].T @ x["train"], x["train"].T @ (targets["train"] - y_mean)
    best = None
    for alpha in np.logspace(-2, 4, 13) * len(x["train"]):
        weights = np.linalg.solve(gram + alpha * np.eye(len(gram)), moment)
        validation_mae = float(np.abs(x["validation"] @ weights + y_mean - targets["validation"]).mean())
        if best is None or validation_mae < best[0]:
            best = (validation_mae, alpha, weights)
    validation_mae, alpha, weights = best
    predictions = x["test"] @ weights + y_mean
    scores = compute_ef_metrics(predictions, targets["test"])
    verdict = check_against_mean_predictor(predictions, targets["test"], y_mean)
    train_r2 = 1 - np.square(x["train"] @ weights + y_mean - targets["train"]).mean() / targets["train"].var()
    return {**{k: float(scores[k]) for k in ("mae", "rmse", "r2")}, **{k: verdict[k] for k in VERDICT_KEYS},
            "mean_predictor_mae": verdict["mean_predictor"]["mae"], "alpha": float(alpha),
            "validation_mae": validation_mae, "train_r2": float(train_r2)}  # fmt: skip


def experiment_linear_probe(args: argparse.Namespace, corpus: Path) -> list[dict]:
    checkpoint, pretrain_seconds = pretrain(args, corpus, args.mask_ratio, args.pretrain_num_frames)
    splits = load_echonet_dynamic(corpus)
    targets = {name: np.asarray(split["EF"], float) for name, split in splits.items()}
    processor = EchoAIVideoProcessor.from_pretrained(checkpoint)
    pretrained = EchoAIForVideoClassification.from_pretrained(checkpoint, num_labels=0)
    torch.manual_seed(args.seed)
    random = EchoAIForVideoClassification(pretrained.config)
    rows = []
    for init, model in (("pretrained", pretrained), ("random", random)):
        model.eval()
        features, readable_targets = {}, {}
        for name, split in splits.items():
            readable, features[name] = frozen_features(model, processor, split["video_path"], args.eval_num_clips)
            readable_targets[name] = targets[name][readable]
        rows.append({"init": init, "width": features["train"].shape[1], **ridge_probe(features, readable_targets),
                     "pretrain_seconds": pretrain_seconds if init == "pretrained" else 0.0, "run": str(checkpoint)})  # fmt: skip
    return rows


def mean_predictor_row(corpus: Path) -> dict:
    """The trivial baseline: the training split's mean EF for every test video (no training, no seeds)."""
    splits = load_echonet_dynamic(corpus)
    train_ef, test_ef = np.asarray(splits["train"]["EF"], float), np.asarray(splits["test"]["EF"], float)
    constant = np.full_like(test_ef, train_ef.mean())
    scores = check_against_mean_predictor(constant, test_ef, train_ef.mean())["mean_predictor"]
    return {
        "model": "mean", "name": BASELINE_MODELS["mean"], "train_videos": len(train_ef), "parameters": 0,
        "mae": scores["mae"], "rmse": scores["rmse"], "r2": scores["r2"], "mae_std": math.nan, "rmse_std": math.nan,
        "r2_std": math.nan, "mean_predictor_mae": scores["mae"], "learned_ef": 0, "steps": 0, "train_seconds": 0.0,
        "pretrain_seconds": 0.0, "seeds": [],
    }  # fmt: skip


def experiment_baselines(args: argparse.Namespace, corpus: Path) -> list[dict]:
    rows = []
    for model in names(args.models):
        if model == "mean":
            rows.append(mean_predictor_row(corpus))
            continue
        init, pretrain_seconds = model_argv(args, corpus, model)
        runs = [
            train_and_test(args, corpus, model, init, 1.0, args.seed + i, args.time_budget_s)
            for i in range(args.num_seeds)
        ]
        row = {"model": model, "name": BASELINE_MODELS[model], "parameters": runs[0]["parameters"],
               **seed_summary(runs)}  # fmt: skip
        row["steps"] = float(np.mean([r["steps"] for r in runs]))
        row["train_seconds"] = float(
            np.mean([math.nan if r["train_seconds"] is None else r["train_seconds"] for r in runs])
        )
        row["pretrain_seconds"] = pretrain_seconds
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------
# Report: markdown table, JSON, plot
# --------------------------------------------------------------------------------------------------


def fmt(value: float, std: float = math.nan, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f} ± {std:.{digits}f}" if math.isfinite(std) else f"{value:.{digits}f}"


def seed_spread(args: argparse.Namespace) -> str:
    return f" (mean ± SD over {args.num_seeds} seeds)" if args.num_seeds > 1 else ""


def seed_metrics(row: dict) -> list[str]:
    """A seeded row's test MAE, RMSE, R² (mean ± SD over seeds) and its per-seed MAEs, as table cells."""
    per_seed = ", ".join(f"{s['mae']:.2f}" for s in row["seeds"])
    return [
        fmt(row["mae"], row["mae_std"]),
        fmt(row["rmse"], row["rmse_std"]),
        fmt(row["r2"], row["r2_std"]),
        per_seed,
    ]


def error_bars(rows: list[dict]) -> list[float]:
    """Each row's MAE spread over seeds, 0 where there is none (one seed, or nothing trained)."""
    return [0.0 if not math.isfinite(r["mae_std"]) else r["mae_std"] for r in rows]


def markdown_table(columns: list[str], rows: Iterable[list[str]]) -> list[str]:
    """A markdown table's lines: the header, the separator, one line per row of cells."""
    lines = [f"| {' | '.join(cells)} |" for cells in (columns, *rows)]
    return [lines[0], "|" + "---|" * len(columns), *lines[1:]]


def table_mask_ratio(args: argparse.Namespace, rows: list[dict]) -> list[str]:
    """One row per ratio (reconstruction, then EF at each label fraction), the random start, the mean predictor."""
    fractions = list(rows[0]["ef"])
    columns = ["start", "test loss at own ratio", f"test loss at ratio {args.mask_ratio:g}",
               "share of the target predicted"]  # fmt: skip
    for fraction in fractions:
        labels = f"{100 * float(fraction):g} % labels ({rows[0]['ef'][fraction]['train_videos']} videos)"
        columns += [f"test EF MAE, {labels}{seed_spread(args)}", "per-seed MAE", "test R²", "learned EF (seeds)"]
    columns += ["pretraining s", "picture"]

    def cells(r: dict) -> list[str]:
        pretrained = r["mask_ratio"] is not None
        # Losses to 4 significant digits: a target's scale can be anything (gradient histograms' is ~0.003).
        start = [f"mask ratio {r['mask_ratio']:g}", f"{r['test_loss_own_ratio']:.4g}", f"{r['test_loss_common_ratio']:.4g}",
                 fmt(r["test_share_predicted"])] if pretrained else ["random (scratch)", "—", "—", "—"]  # fmt: skip
        for fraction in fractions:
            ef = r["ef"][fraction]
            mae, _, r2, per_seed = seed_metrics(ef)
            start += [mae, per_seed, r2, f"{ef['learned_ef']}/{len(ef['seeds'])}"]
        end = [f"{r['pretrain_seconds']:.0f}", f"![]({r['picture']})"] if pretrained else ["—", "—"]
        return start + end

    mean = ["mean predictor", "—", "—", "—"]
    for fraction in fractions:  # its MAE depends on the labels: the training subset's mean EF for every test video
        mean += [fmt(rows[0]["ef"][fraction]["mean_predictor_mae"]), "—", "≤ 0", "—"]
    return markdown_table(columns, [*(cells(r) for r in rows), *([mean + ["—", "—"]] if fractions else [])])


def table_num_frames(args: argparse.Namespace, rows: list[dict]) -> list[str]:
    columns = ["frames per clip", f"test MAE{seed_spread(args)}", "test RMSE", "test R²", "per-seed MAE",
               "mean-predictor MAE", "learned EF (seeds)", "fine-tune s"]  # fmt: skip
    return markdown_table(
        columns,
        ([str(r["num_frames"]), *seed_metrics(r), fmt(r["mean_predictor_mae"]), f"{r['learned_ef']}/{len(r['seeds'])}",
          " / ".join(f"{s['finetune_seconds']:.0f}" for s in r["seeds"])] for r in rows),
    )  # fmt: skip


def table_pretraining(args: argparse.Namespace, rows: list[dict]) -> list[str]:
    columns = ["labels", "train videos", "init", f"test MAE{seed_spread(args)}", "test RMSE", "test R²",
               "per-seed MAE", "mean-predictor MAE", "learned EF (seeds)",
               "below scratch by (one-sided p over the seeds, least p)"]  # fmt: skip
    scratch = {r["label_fraction"]: r for r in rows if r["init"] == "scratch"}
    return markdown_table(
        columns,
        ([f"{100 * r['label_fraction']:g} %", str(r["train_videos"]), r["init"], *seed_metrics(r),
          fmt(r["mean_predictor_mae"]), f"{r['learned_ef']}/{len(r['seeds'])}",
          "—" if r["init"] == "scratch" else lead_cell(r, scratch[r["label_fraction"]])] for r in rows),
    )  # fmt: skip


def lead_cell(row: dict, reference: dict) -> str:
    """How far `row`'s mean test MAE is below `reference`'s, with the one-sided permutation test of that lead over
    their seeds (`metrics_echoai.permutation_test`) and the least p-value their numbers of seeds can reach. The
    seeds of one pretraining share its draw: the test says whether this pretraining beats scratch, not whether
    the pretraining recipe does (for that, several pretraining seeds: `scripts/compare_runs.py`)."""
    test = permutation_test([s["mae"] for s in row["seeds"]], [s["mae"] for s in reference["seeds"]])
    return f"{test['difference']:.2f} (p = {test['p_value']:.3f}, least {test['least_p']:.3f})"


def table_baselines(args: argparse.Namespace, rows: list[dict]) -> list[str]:
    columns = ["model", "parameters", f"test MAE{seed_spread(args)}", "test RMSE", "test R²", "per-seed MAE",
               "steps", "training s", "learned EF (seeds)"]  # fmt: skip
    return markdown_table(columns, (baselines_cells(r) for r in rows))


def baselines_cells(r: dict) -> list[str]:
    if not r["seeds"]:  # the mean predictor: nothing trained
        return [r["name"], "0", fmt(r["mae"]), fmt(r["rmse"]), fmt(r["r2"]), "—", "—", "—", "—"]
    parameters = f"{r['parameters'] / 1e6:.3g} M" if r["parameters"] else "n/a"
    return [r["name"], parameters, *seed_metrics(r), f"{r['steps']:.0f}", fmt(r["train_seconds"], digits=0),
            f"{r['learned_ef']}/{len(r['seeds'])}"]  # fmt: skip


def table_linear_probe(args: argparse.Namespace, rows: list[dict]) -> list[str]:
    columns = ["encoder", "feature width", "test MAE", "test RMSE", "test R²", "train R²", "ridge penalty",
               "mean-predictor MAE", "learned EF", "gain over the mean predictor (95 % interval)"]  # fmt: skip
    return markdown_table(
        columns,
        ([r["init"], str(r["width"]), fmt(r["mae"]), fmt(r["rmse"]), fmt(r["r2"]), fmt(r["train_r2"]),
          f"{r['alpha']:.3g}", fmt(r["mean_predictor_mae"]), LEARNED[r["learned_ef"]], gain_cell(r)] for r in rows),
    )  # fmt: skip


def gain_cell(row: dict) -> str:
    """The mean predictor's MAE minus the model's, with its bootstrap interval over the test videos."""
    low, high = row["mae_gain_interval"]
    return f"{row['mae_gain']:.2f} ({low:.2f} to {high:.2f})"


def plot_mask_ratio(args: argparse.Namespace, rows: list[dict], axis, ef_axis=None) -> None:
    """Held-out reconstruction against the ratio; with `ef_axis` (when EF was measured) the test EF MAE at the first
    label fraction beside the random start's and the mean predictor's."""
    pretrained = [r for r in rows if r["mask_ratio"] is not None]
    ratios = [r["mask_ratio"] for r in pretrained]
    axis.plot(ratios, [r["test_loss_own_ratio"] for r in pretrained], "o-", label="at its own ratio")
    axis.plot(ratios, [r["test_loss_common_ratio"] for r in pretrained], "s--", label=f"at ratio {args.mask_ratio:g}")
    axis.set_xlabel("pretraining mask ratio")
    axis.set_ylabel("held-out reconstruction MSE (own target)")
    axis.legend()
    if ef_axis is None:
        return
    fraction = next(iter(pretrained[0]["ef"]))
    ef = [r["ef"][fraction] for r in pretrained]
    ef_axis.errorbar(ratios, [e["mae"] for e in ef], yerr=error_bars(ef), fmt="o-", capsize=3, label="pretrained")
    ef_axis.axhline(rows[-1]["ef"][fraction]["mae"], color="C1", linestyle=":", label="random start")
    ef_axis.axhline(ef[0]["mean_predictor_mae"], color="0.5", linestyle="--", label="mean predictor")
    ef_axis.set_ylim(bottom=0)
    ef_axis.set_xlabel("pretraining mask ratio")
    ef_axis.set_ylabel(f"test EF MAE (%), {100 * float(fraction):g} % labels")
    ef_axis.legend()


def plot_num_frames(args: argparse.Namespace, rows: list[dict], axis) -> None:
    frames = [r["num_frames"] for r in rows]
    axis.errorbar(frames, [r["mae"] for r in rows], yerr=error_bars(rows), fmt="o-", capsize=3, label="fine-tuned")
    axis.axhline(rows[0]["mean_predictor_mae"], color="0.5", linestyle="--", label="mean predictor")
    axis.set_ylim(bottom=0)
    axis.legend()
    axis.set_xscale("log", base=2)
    axis.set_xticks(frames, [str(f) for f in frames])
    axis.set_xlabel("frames per clip")
    axis.set_ylabel("test EF MAE (%)")


def plot_pretraining(args: argparse.Namespace, rows: list[dict], axis) -> None:
    fractions = sorted({r["label_fraction"] for r in rows})
    width = 0.38
    for offset, init in ((-width / 2, "pretrained"), (width / 2, "scratch")):
        chosen = [next(r for r in rows if r["label_fraction"] == f and r["init"] == init) for f in fractions]
        axis.bar(np.arange(len(fractions)) + offset, [r["mae"] for r in chosen], width, yerr=error_bars(chosen),
                 capsize=3, label=init)  # fmt: skip
    axis.set_xticks(np.arange(len(fractions)), [f"{100 * f:g} % labels" for f in fractions])
    axis.set_ylabel("test EF MAE (%)")
    axis.legend()


def plot_baselines(args: argparse.Namespace, rows: list[dict], axis) -> None:
    colours = ["0.6" if not r["seeds"] else f"C{i}" for i, r in enumerate(rows)]
    axis.bar(np.arange(len(rows)), [r["mae"] for r in rows], yerr=error_bars(rows), capsize=3, color=colours)
    axis.set_xticks(np.arange(len(rows)), [r["name"].replace(", ", "\n") for r in rows], fontsize=8)
    axis.set_ylabel("test EF MAE (%)")


def plot_linear_probe(args: argparse.Namespace, rows: list[dict], axis) -> None:
    axis.bar(np.arange(len(rows)), [r["mae"] for r in rows], color=[f"C{i}" for i in range(len(rows))])
    axis.axhline(rows[0]["mean_predictor_mae"], color="0.4", linestyle="--", label="mean predictor")
    axis.set_xticks(np.arange(len(rows)), [f"{r['init']} encoder" for r in rows])
    axis.set_ylabel("test EF MAE (%), linear probe")
    axis.legend()


class Experiment(NamedTuple):
    """One experiment: its runs (one result row per setting), its markdown table, and its plot on one axis (two
    for `mask_ratio` with EF)."""

    run: Callable[[argparse.Namespace, Path], list[dict]]
    table: Callable[[argparse.Namespace, list[dict]], list[str]]
    plot: Callable[..., None]


EXPERIMENTS = {
    "mask_ratio": Experiment(experiment_mask_ratio, table_mask_ratio, plot_mask_ratio),
    "num_frames": Experiment(experiment_num_frames, table_num_frames, plot_num_frames),
    "pretraining": Experiment(experiment_pretraining, table_pretraining, plot_pretraining),
    "baselines": Experiment(experiment_baselines, table_baselines, plot_baselines),
    "linear_probe": Experiment(experiment_linear_probe, table_linear_probe, plot_linear_probe),
}


def plot(args: argparse.Namespace, rows: list[dict], path: Path) -> Path:
    panels = 2 if args.experiment == "mask_ratio" and rows[0]["ef"] else 1  # reconstruction, then EF beside it
    figure = make_figure((5 * panels, 3.6), dpi=100)
    axes = [figure.add_subplot(1, panels, i + 1) for i in range(panels)]
    EXPERIMENTS[args.experiment].plot(args, rows, *axes)
    figure.suptitle(f"EchoAI {args.experiment} ({'smoke' if args.smoke else args.config_name})")
    figure.tight_layout()
    figure.savefig(path)
    return path


@contextlib.contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    """torch's CPU threads set to `num_threads` (0: left alone) inside, and given back to the caller after.

    One thread by default: on a shared 2-core machine, two threads per process next to another busy process
    spin (OpenMP) and slow a step down severalfold (README, "Multiple processes and clusters"). The thread
    count is given back because experiments also run in-process (tests, notebooks).
    """
    threads_before = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(threads_before)


def run_settings(args: argparse.Namespace, corpus: Path, splits: dict, seconds: float, argv: list[str] | None) -> dict:
    """Everything a reader needs to rerun or compare the experiment (results.json's top level)."""
    settings = {
        "experiment": args.experiment, "smoke": args.smoke, "corpus": str(corpus),
        "videos": {name: len(split) for name, split in splits.items()}, "config_name": args.config_name,
        "config_overrides": args.config_overrides, "pretrain_steps": args.pretrain_steps,
        "finetune_steps": args.finetune_steps, "per_device_train_batch_size": args.per_device_train_batch_size,
        "eval_num_clips": args.eval_num_clips, "recon_num_clips": args.recon_num_clips, "seed": args.seed,
        "num_seeds": args.num_seeds, "mask_ratio": args.mask_ratio, "pretrain_num_frames": args.pretrain_num_frames,
        "time_budget_s": args.time_budget_s, "models": names(args.models), "baseline_overrides": args.baseline_overrides,
        "checkpoint": args.checkpoint, "label_fractions": floats(args.label_fractions),
        "pretrain_data_dir": args.pretrain_data_dir, "mixed_precision": args.mixed_precision,
        "wall_seconds": round(seconds, 1), "command": " ".join(["python scripts/experiments.py", *(argv or [])]),
    }  # fmt: skip
    if args.experiment != "mask_ratio" or floats(args.label_fractions):
        # The floor a model must beat: predict the training split's mean EF for every test video.
        train_ef, test_ef = np.asarray(splits["train"]["EF"], float), np.asarray(splits["test"]["EF"], float)
        settings["mean_predictor_test_mae"] = float(np.abs(test_ef - train_ef.mean()).mean())
    return settings


def pretraining_words(args: argparse.Namespace) -> str:
    """The pretrained model in words: the `--checkpoint` given (its own preset and length, not this call's), or the
    preset, overrides and steps this call pretrains with."""
    if args.checkpoint:
        return f"pretrained model `{args.checkpoint}` (its own preset and length; not pretrained here)"
    corpus = f"all of {args.pretrain_data_dir}" if args.pretrain_data_dir else "the training split"
    return f"preset `{args.config_name}` with `{args.config_overrides}`; pretraining {args.pretrain_steps} steps on {corpus}"


def report_header(
    args: argparse.Namespace, settings: dict, corpus: Path, seconds: float, rows: list[dict]
) -> list[str]:
    """results.md above the table: the command, the settings in words, and the mean predictor's floor."""
    header = [
        f"# EchoAI experiment: {args.experiment}{' (smoke)' if args.smoke else ''}",
        "",
        f"`{settings['command']}`",
        "",
        f"Corpus {corpus} ({settings['videos']}); {pretraining_words(args)}, fine-tuning {args.finetune_steps} steps, batch "
        f"{args.per_device_train_batch_size}; test: {args.eval_num_clips} clip(s) per video "
        f"(reconstruction: {args.recon_num_clips}); seed {args.seed}, {args.num_seeds} fine-tuning seed(s); "
        f"training precision {'bf16 autocast' if args.mixed_precision == 'bf16' else 'fp32'}. "
        f"Wall time {seconds:.0f} s for this call (runs found complete in the runs folder are reused, not rerun; each run's own time is in the table / JSON).",
        "",
    ]
    if args.experiment == "baselines":
        budget = f"{args.time_budget_s:g} s of training" if args.time_budget_s else "no time budget"
        steps = "" if args.finetune_steps == BUDGET_STEP_CAP else f" or {args.finetune_steps} steps"
        header += [
            f"Every trained model: {budget}{steps}, whichever ran out first (evaluation not counted; the steps each "
            f"model got depend on the machine and its load), on all {settings['videos']['train']} training videos. "
            f"R(2+1)D overrides: `{args.baseline_overrides or 'none (the full R(2+1)D-18)'}`. "
            "`learned EF`: seeds whose test predictions beat the mean predictor without collapsing to a constant.",
            "",
        ]
    if args.experiment == "mask_ratio":
        targets = "; ".join(dict.fromkeys(r["reconstruction_target"] for r in rows if r["mask_ratio"] is not None))
        header += [
            f"Reconstruction target: {targets}. A loss is on that target's scale: it compares with the other rows, "
            "not with a run of another target. The share of the target predicted (1 - loss / the target's variance, "
            "at the model's own ratio) compares across targets: near 0, the decoder outputs the target's mean and "
            "its encoder learned nothing from pretraining.",
            "",
        ]
        if floats(args.label_fractions):
            header += [
                "EF: each ratio's checkpoint and a random start fine-tuned alike (finetune.py's recipe, the steps "
                "above) at each label fraction, scored on the test split; a ratio helps EF only where its row is "
                "below the random start's by more than the seed spread.",
                "",
            ]
    if "mean_predictor_test_mae" in settings:
        header += [
            f"Reference: predicting the training mean EF for every test video gives MAE "
            f"{settings['mean_predictor_test_mae']:.3f} (R² ≤ 0); a model below that has learned something.",
            "",
        ]
    return header


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    experiment = EXPERIMENTS[args.experiment]
    args.output_dir.mkdir(parents=True, exist_ok=True)
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    with torch_threads(args.num_threads):
        corpus = Path(args.data_dir) if args.data_dir else synthetic_echonet_dir(args.synthetic_num_videos)
        splits = load_echonet_dynamic(corpus)
        start = time.perf_counter()
        rows = experiment.run(args, corpus)
        seconds = time.perf_counter() - start

    settings = run_settings(args, corpus, splits, seconds, argv)
    results = {**settings, "rows": rows}
    (args.output_dir / "results.json").write_text(json.dumps(results, indent=2, allow_nan=True) + "\n")
    picture = plot(args, rows, args.output_dir / f"{args.experiment}.png")
    table = experiment.table(args, rows)
    (args.output_dir / "results.md").write_text(
        "\n".join([*report_header(args, settings, corpus, seconds, rows), *table, "", f"![]({picture.name})", ""])
    )
    print("\n".join(table))
    print(f"\nWrote {args.output_dir}/results.md, results.json, {picture.name} in {seconds:.0f} s")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
