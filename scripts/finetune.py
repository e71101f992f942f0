#!/usr/bin/env python
"""Fine-tune EchoAI to estimate ejection fraction (EF, %) from echo videos, or to classify them.

    accelerate launch scripts/finetune.py --model_name_or_path outputs/pretrain           # synthetic corpus
    accelerate launch scripts/finetune.py --model_name_or_path outputs/pretrain --data_dir EchoNet-Dynamic \\
        --mixed_precision bf16 --eval_num_clips 4 --output_dir outputs/finetune
    accelerate launch scripts/finetune.py --from_scratch --config_name small --data_dir EchoNet-Dynamic
    accelerate launch scripts/finetune.py --model_name_or_path outputs/pretrain --label_fraction 0.1   # 10 % labels
    accelerate launch scripts/finetune.py --model_name_or_path outputs/pretrain --num_labels 2 --class_boundaries 50
    accelerate launch scripts/finetune.py --baseline r2plus1d_18 --max_train_seconds 600   # EchoNet's CNN

Recipe, from a checkpoint and from scratch (`--from_scratch`) alike: AdamW (0.9, 0.999), weight decay 0.05,
learning rate 1e-3, no layer-wise learning-rate decay, no stochastic depth, linear warm-up then cosine decay. The
MAE / VideoMAE fine-tuning recipe (`--learning_rate 5e-4 --layer_decay 0.75 --drop_path_rate 0.1`) fails on the
`tiny` preset, from a checkpoint and from scratch alike (docs/EXPERIMENTS.md, section 3, items 5, 17, 18); it
remains the usual start for a large checkpoint such as a converted VideoMAE-B, not measured here. Clips are 16
frames taken every 4th (`--period 4`, EchoNet-Dynamic's 64-frame span) with mild augmentation (the processor's
defaults), for 45 epochs of the whole training split from scratch and 90 from a checkpoint (with `--label_fraction
f`, 45 / f or 90 / f epochs of the subset: about as many steps; a pretrained start gains from the longer run, a
random one did not from a quarter or a tenth of the labels, and the shorter run keeps a full-label one short on a
CPU, docs/EXPERIMENTS.md, items 43, 44, 46, 48), and the `tiny` preset has a convolutional stem and
pools each clip's extreme states (`EchoAIConfig.stem_channels`, `pooling`): the recipe that reads EF from a few
hundred videos (docs/EXPERIMENTS.md). The regression head learns a unit-scale target: `regression_target_mean/std`
are set from the training split's EF, so `logits` -- and the saved model's predictions -- are EF in %.

Baseline (`--baseline r2plus1d_18`): EchoNet-Dynamic's R(2+1)D-18 (`baselines_echoai.py`), randomly initialised,
on the same clips, split, loop, loss and evaluation; only the model and its recipe differ. EchoNet-Dynamic
fine-tuned Kinetics weights with SGD (lr 1e-4, momentum 0.9); from scratch this script uses AdamW (0.9, 0.999),
learning rate 1e-3, weight decay 0.05 (none on BN and biases), no layer decay (the CNN has no transformer layers)
and no stochastic depth, the same warm-up + cosine, clipping and batch. `--config_overrides` sets its fields
(`num_frames`, `image_size`, `num_channels`, and `base_width` / `stem_width` / `blocks_per_stage` to shrink it). It
saves `model.safetensors` + `baseline_config.json` (`baselines_echoai.load_baseline`), the processor and
`all_results.json`; no model card (it is not an EchoAI model).

Auxiliary LV segmentation (`--lv_segmentation_weight W`; W = 1 by default when the training split has tracings):
EchoNet-Dynamic traces the left ventricle on two frames of every video (ED and ES, VolumeTracings.csv). With W > 0
each training clip is placed so that it shows one of them, and a light per-token head predicts that frame's LV mask
from the encoder's tokens; the loss is the EF loss + W x (binary cross-entropy + soft Dice of the mask). It teaches
the encoder where the ventricle is (EchoNet-Dynamic's own pipeline is segmentation-based): from scratch it lowers
the test MAE at every label count measured, most with the fewest labels (docs/EXPERIMENTS.md, items 39, 40). When
no training video has a usable pair of tracings the default is 0 (off), and an explicit W > 0 is an error;
`--lv_segmentation_weight 0` turns it off. The head is saved with the model but never changes its predictions;
`all_results.json` records the weight and the mask loss over the first and last steps (`lv_segmentation`). The
baseline takes the same loss, by the same default, through a head on its last stage's feature map
(`baselines_echoai.R2Plus1DLVMaskHead`), so both models learn from the same labels (docs/EXPERIMENTS.md, item 42).

Fail loudly: the kept model is checked on validation and test against the mean predictor (every video gets the
training split's mean EF; `metrics_echoai.check_against_mean_predictor`). Predictions whose SD is below 0.1 x the
label SD ("collapsed to a constant"), or an MAE not below the mean predictor's, are a failure: a WARNING in the
log, `"learned_ef": false` and the reason in `all_results.json`, and a warning at the top of the model card.
Best-by-validation selection can hide such a failure (a model at the mean wins early), so the last step's
validation metrics are logged and stored (`last_step`) beside the kept model's.

Evaluation: on the validation split after every epoch (with `--eval_steps N`, at the first epoch end past every N
steps), one clip per video or `--eval_num_clips K` evenly spaced clips averaged per video, through
`inference_echoai.predict_videos` -- the predictor `scripts/evaluate.py` reports with, so the kept model is chosen
by the number evaluation measures -- gathered across processes. The best weights by validation MAE (accuracy for
classification) are kept in memory and in every checkpoint; at the end they are evaluated once on the test split and
saved into `--output_dir` with the processor, `all_results.json` and the model card, so `--output_dir` loads
directly with `AutoModelForVideoClassification.from_pretrained`, and with transformers' `pipeline(model=output_dir,
trust_remote_code=True)`: an EF model is saved with the EF pipeline (`pipeline_echoai`; per video EF, clip spread
and clip count) and answers `pipeline("video-classification", ...)` as `[{"label": "EF", "score": EF}]`, a
classifier with the probabilities of its classes (`id2label`: "EF < 50", ...).

Weight averaging (`--ema_decay D`, off by default): an exponential moving average of the weights and batch-norm
statistics over the steps (`training_echoai.ExponentialMovingAverage`, as timm's `ModelEma`), updated after every
optimizer step. Validation, the kept model, the test and the saved model are then the average's; the live weights
train exactly as without it, and every checkpoint carries the average, so a resumed run continues it. The live
weights are validated beside the average and their own best tested too (`live_weights` in `all_results.json`): one
run tells what the average bought, against the very run it averaged (as timm validates its model and its EMA). Not
under FSDP (the weights are sharded there). Measured in docs/EXPERIMENTS.md, items 53 and 54.

Re-initialised top layers (`--reinit_top_layers N`, off by default): the checkpoint's top N encoder layers and its
final LayerNorm start from a fresh initialisation drawn from `--seed`, every other weight from the checkpoint
(`training_echoai.reinitialize_top_layers`), as Zhang et al. (2021) did for BERT on few labels: layers shaped by
the pretraining task can make a worse start than random ones. The `tiny` default start's frozen features hold the
most EF after its first two layers, and with the top two re-initialised it fine-tuned level with scratch at a tenth
of the labels, where that build's whole start is behind; on the build of the fixed pretraining that fails at a
tenth it did not help (one seed of three beyond chance, as with the whole start). At a quarter and with all the
labels it is level with scratch and with the whole start run beside it, and on a second build level with that
build's whole start (docs/EXPERIMENTS.md, items 55-71). Off by default: it gains nothing beyond the seed spread
anywhere measured, and what it does moves with the pretraining build.

Linear probing, then fine-tuning (`--linear_probe_steps N`, off by default; LP-FT, Kumar et al. 2022): for the
first N optimizer steps only the heads learn (the EF head and, with the tracings, the LV-mask head), on the
checkpoint's features; then the encoder joins, its learning rate warming up again over `--num_warmup_steps`
(`training_echoai.delayed_start`), and the run ends after the same `--max_train_steps`. A random head's first
gradients can pull pretrained features apart before the head has learned to read them; from few labels that is
where a start can lose what pretraining gave it. With N = 200 of 1,800 steps, one build fine-tuned from a tenth of
the labels read EF 0.56 better than its whole start, within chance, and still behind scratch; in the heads-only
steps the heads read almost no EF from 18 videos' frozen features (docs/EXPERIMENTS.md, item 80). Off by default.

Reads top to bottom: arguments -> accelerator -> data -> model, optimizer, schedule -> prepare -> loop ->
evaluate -> save. The loop, checkpoints, resume and signal handling are shared with pretraining
(`training_echoai.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, DatasetDict

from baselines_echoai import BASELINES, build_baseline, save_baseline
from configuration_echoai import EchoAIConfig
from data_echoai import load_echonet_dynamic, synthetic_echonet_dir
from metrics_echoai import VERDICT_KEYS, check_against_mean_predictor, compute_ef_metrics
from modeling_echoai import EchoAIForVideoClassification
from perf_echoai import keep_freed_memory, use_fastest_attention
from pipeline_echoai import save_ef_pipeline
from training_echoai import (
    BestModel,
    ExponentialMovingAverage,
    TrainingClips,
    TrainingState,
    add_common_args,
    build_accelerator,
    build_optimizer,
    build_processor,
    count_parameters,
    create_hub_repo,
    derive_seed,
    describe_start,
    exit_on_run_error,
    from_pretrained_with_geometry,
    make_dataloader,
    model_state_dict,
    parse_config_overrides,
    predict_split,
    push_to_hub,
    reinitialize_top_layers,
    render_model_card,
    save_model,
    save_text,
    steps_per_epoch,
    train,
    unwrap,
)


logger = logging.getLogger("finetune")
LABEL = "label"  # the column that holds class indices when --class_boundaries bins a continuous column
# The default training length, in epochs of the whole training split, by start. A --label_fraction f subset trains
# for these / f epochs, about as many steps (each epoch drops its short last batch): at 45 epochs of its own 45
# videos, a quarter of the phantom's labels stopped at 225 steps, far from converged (docs/EXPERIMENTS.md, section 3,
# item 18). A checkpoint fine-tunes twice as long as a random start: doubling the length lowered the pretrained
# start's test MAE at a quarter and a tenth of the labels, and left scratch's level or higher (items 43, 44, 46).
# With all the labels the longer run lowers scratch's too (item 48); scratch keeps 45 epochs so that a full-label
# run stays short on a CPU (the item has the times and errors of both lengths).
FULL_SPLIT_EPOCHS = {"scratch": 45, "checkpoint": 90}

# Learning rate, layer decay, drop path of each model when not given (see the module docstring). EchoAI's is one
# recipe for every start: the MAE recipe's layer decay 0.75 and drop path 0.1 (learning rate 5e-4) held a `tiny`
# checkpoint at the mean predictor where this one reads EF (docs/EXPERIMENTS.md, section 3, items 17, 18).
RECIPES = {
    "echoai": dict(learning_rate=1e-3, layer_decay=1.0, drop_path_rate=0.0),
    "r2plus1d_18": dict(learning_rate=1e-3, layer_decay=None, drop_path_rate=None),
}
# The auxiliary LV-mask loss's weight when the training split has tracings and --lv_segmentation_weight is not given:
# from scratch it lowered the test MAE at 5, 10, 25 and 100 % of the labels (docs/EXPERIMENTS.md, items 39, 40).
DEFAULT_LV_SEGMENTATION_WEIGHT = 1.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    add = parser.add_argument
    add("--from_scratch", action="store_true", help="Start from a random --config_name model, not a checkpoint.")
    add(
        "--baseline", choices=sorted(BASELINES), default=None,
        help="Train a baseline instead of EchoAI, from scratch: r2plus1d_18 is EchoNet-Dynamic's R(2+1)D-18 "
        "(learning rate 1e-3, no layer decay; see the recipe above).",
    )  # fmt: skip
    add("--num_labels", type=int, default=1, help="1: regression of --label_column; N > 1: N-class classification.")
    add("--label_column", default="EF", help="Target column of FileList.csv (EF, ESV, EDV, ...).")
    add(
        "--class_boundaries",
        default=None,
        help="With --num_labels N: N - 1 ascending thresholds binning --label_column into classes, e.g. '40,50' "
        "(class 0 below 40). Without it the column must hold class indices.",
    )
    add("--regression_loss", choices=["mse", "l1", "huber"], default="mse")
    echoai = RECIPES["echoai"]
    add(
        "--layer_decay", type=float, default=None,
        help=f"Layer-wise learning-rate decay (default {echoai['layer_decay']:g}: off; MAE's recipe uses 0.75).",
    )  # fmt: skip
    add(
        "--drop_path_rate", type=float, default=None,
        help=f"Stochastic depth of the last encoder layer (default {echoai['drop_path_rate']:g}; MAE's recipe uses "
        "0.1).",
    )  # fmt: skip
    add(
        "--reinit_top_layers", type=int, default=0,
        help="Re-initialise the checkpoint's top N encoder layers and its final LayerNorm before fine-tuning, drawn "
        "from --seed (`training_echoai.reinitialize_top_layers`): layers specialised to the pretraining task can "
        "start worse than random ones from few labels (with 2, a `tiny` checkpoint fine-tuned from tens of labelled "
        "videos was level with scratch and a little, within the seed spread, ahead of the whole checkpoint on one "
        "pretraining build, level with it on another, and did not rescue a third that fails from 18; from 180 it "
        "changed nothing). 0 (default) keeps the whole checkpoint.",
    )  # fmt: skip
    add(
        "--linear_probe_steps", type=int, default=0,
        help="Train only the heads (EF and LV mask) on the checkpoint's features for the first N optimizer steps, "
        "then fine-tune the whole model, the encoder's learning rate warming up again over --num_warmup_steps: "
        "linear probing, then fine-tuning (LP-FT, Kumar et al. 2022), within --max_train_steps. A random head's "
        "first gradients can pull pretrained features apart before the head has learned to read them. 0 "
        "(default) fine-tunes everything from the first step.",
    )  # fmt: skip
    add("--label_fraction", type=float, default=1.0, help="Use this fraction of the training videos (seeded).")
    add("--label_fraction_seed", type=int, default=0, help="Seed of the --label_fraction subset (not --seed).")
    add("--eval_num_clips", type=int, default=1, help="Evenly spaced clips averaged per video in evaluation.")
    add(
        "--eval_steps", type=int, default=None,
        help="Validate at the first epoch end past every N optimizer steps instead of after every epoch (and after "
        "the last step either way). A small --label_fraction makes epochs of a few steps, and validating after each "
        "would cost more than training.",
    )  # fmt: skip
    add(
        "--lv_segmentation_weight", type=float, default=None,
        help="Weight of an auxiliary loss that predicts the left-ventricle mask of the traced ED/ES frames "
        "(EchoNet-Dynamic's VolumeTracings.csv) from the encoder's tokens, so the encoder learns where the ventricle "
        "is; each training clip then shows a traced frame. 0 is off; 1 weighs it as the EF loss. Default: "
        f"{DEFAULT_LV_SEGMENTATION_WEIGHT:g} when a training video has tracings (EchoNet-Dynamic and the synthetic "
        "corpus do), else 0. With --baseline, a mask head on the CNN's last stage, by the same rule.",
    )  # fmt: skip
    add(
        "--ema_decay", type=float, default=0.0,
        help="Validate, keep and save an exponential moving average of the weights over training instead of the "
        "live weights (`training_echoai.ExponentialMovingAverage`; its decay ramps up from 0.1 over the first "
        "steps); the live weights are validated and their best tested beside it (`live_weights` in "
        "all_results.json). 0 is off; 0.99 averages over the last ~100 steps, 0.999 over ~1,000.",
    )  # fmt: skip
    parser.set_defaults(output_dir="outputs/finetune", adam_beta2=0.999, num_train_epochs=None)
    args = parser.parse_args(argv)
    if args.baseline:
        check_baseline_args(parser, args)
        args.from_scratch = True
    for name, value in RECIPES[args.baseline or "echoai"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if bool(args.model_name_or_path) == args.from_scratch:
        parser.error("pass either --model_name_or_path (a pretraining output or Hub id) or --from_scratch")
    if not 0.0 < args.label_fraction <= 1.0:
        parser.error(f"--label_fraction must lie in (0, 1], got {args.label_fraction}")
    if args.num_train_epochs is None:  # as many steps as the whole split's epochs, whatever --label_fraction keeps
        start = "scratch" if args.from_scratch else "checkpoint"
        args.num_train_epochs = math.ceil(FULL_SPLIT_EPOCHS[start] / args.label_fraction)
    for flag in ("num_labels", "eval_num_clips", "eval_steps"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag} must be positive, got {value}")
    if not 0.0 <= args.ema_decay < 1.0:
        parser.error(f"--ema_decay must lie in [0, 1) (0 is off), got {args.ema_decay:g}")
    if args.reinit_top_layers < 0:
        parser.error(f"--reinit_top_layers must be >= 0 (0 is off), got {args.reinit_top_layers}")
    if args.reinit_top_layers and args.from_scratch:
        parser.error("--reinit_top_layers re-initialises a checkpoint's layers; a --from_scratch model has no others")
    if args.linear_probe_steps < 0:
        parser.error(f"--linear_probe_steps must be >= 0 (0 is off), got {args.linear_probe_steps}")
    if args.linear_probe_steps and args.from_scratch:
        parser.error("--linear_probe_steps trains the heads on a checkpoint's features first; a --from_scratch "
                     "encoder has none worth probing")  # fmt: skip
    if args.linear_probe_steps and args.max_train_seconds:
        parser.error("--linear_probe_steps counts optimizer steps and --max_train_seconds stretches the schedule by "
                     "time; give one of the two")  # fmt: skip
    if args.lv_segmentation_weight is not None and args.lv_segmentation_weight < 0:
        parser.error(f"--lv_segmentation_weight must be >= 0 (0 is off), got {args.lv_segmentation_weight:g}")
    return args


def check_baseline_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`--baseline` trains a randomly initialised CNN regressor: the flags that only mean something for EchoAI
    are errors with it."""
    if args.model_name_or_path:
        parser.error(f"--baseline {args.baseline} trains from a random initialisation; drop --model_name_or_path")
    for flag in ("layer_decay", "drop_path_rate"):
        if getattr(args, flag) is not None:
            parser.error(f"--{flag} is for EchoAI's transformer layers; --baseline {args.baseline} has none")
    for flag in ("reinit_top_layers", "linear_probe_steps"):
        if getattr(args, flag):
            parser.error(f"--{flag} is for an EchoAI checkpoint; --baseline {args.baseline} starts at random")
    if args.num_labels != 1:
        parser.error(f"--baseline {args.baseline} regresses one target; drop --num_labels {args.num_labels}")
    if args.push_to_hub:
        parser.error("--push_to_hub publishes EchoAI models; --baseline writes a state dict and results only")


def load_splits(args: argparse.Namespace, accelerator) -> tuple[Path, DatasetDict]:
    """EchoNet-layout train / validation / test splits, the training split cut to `--label_fraction`."""
    with accelerator.main_process_first():  # one process generates / checks, the others reuse its cache
        data_dir = Path(args.data_dir) if args.data_dir else synthetic_echonet_dir(args.synthetic_num_videos)
        splits = load_echonet_dynamic(data_dir)
    if args.label_column not in splits["train"].column_names:
        raise ValueError(
            f"--label_column {args.label_column!r} is not a column of {data_dir}: {splits['train'].column_names}"
        )
    if args.class_boundaries:
        boundaries = class_boundaries(args)
        if len(boundaries) != args.num_labels - 1 or boundaries != sorted(boundaries):
            raise ValueError(f"--class_boundaries needs {args.num_labels - 1} ascending values, got {boundaries}")
        splits = DatasetDict(
            {name: split.add_column(LABEL, np.digitize(split[args.label_column], boundaries).tolist())
             for name, split in splits.items()}
        )  # fmt: skip
    if args.label_fraction < 1.0:
        train = splits["train"]
        keep = max(1, round(args.label_fraction * len(train)))
        rng = np.random.default_rng(derive_seed(args.label_fraction_seed, len(train)))
        splits["train"] = train.select(np.sort(rng.choice(len(train), size=keep, replace=False)))
    for name in ("validation", "test"):
        if len(splits[name]) < 2:
            raise ValueError(f"{data_dir}: the {name} split has {len(splits[name])} video(s); evaluation needs two.")
    return data_dir, splits


def resolve_lv_segmentation_weight(args: argparse.Namespace, train: Dataset) -> None:
    """Settle `--lv_segmentation_weight` from the training split: unset, it is `DEFAULT_LV_SEGMENTATION_WEIGHT` when
    a training video has a usable ED/ES tracing pair (EDFrame >= 0) and 0 when none has; set above 0 without any
    tracings, the loss could never act, which is an error rather than a silent no-op. The same for `--baseline`
    (its mask head), so that EchoAI and the CNN learn from the same labels."""
    traced = int((np.asarray(train["EDFrame"]) >= 0).sum()) if "EDFrame" in train.column_names else 0
    if args.lv_segmentation_weight is None:
        args.lv_segmentation_weight = DEFAULT_LV_SEGMENTATION_WEIGHT if traced else 0.0
        if traced:
            logger.info(
                "LV segmentation loss on (weight %g, the default): %d of %d training videos have ED/ES tracings; "
                "--lv_segmentation_weight 0 turns it off", args.lv_segmentation_weight, traced, len(train),
            )  # fmt: skip
        else:
            logger.info("LV segmentation loss off: no training video has ED/ES tracings (VolumeTracings.csv)")
    elif args.lv_segmentation_weight > 0 and not traced:
        raise ValueError(
            f"--lv_segmentation_weight {args.lv_segmentation_weight:g} needs ED/ES tracings, but none of the "
            f"{len(train)} training videos has a usable pair in VolumeTracings.csv; pass "
            "--lv_segmentation_weight 0 (or leave it unset) to train without the LV segmentation loss"
        )


def class_boundaries(args: argparse.Namespace) -> list[float]:
    return [float(b) for b in args.class_boundaries.split(",")]


def label_names(args: argparse.Namespace) -> dict[int, str] | None:
    """The model's `id2label`, the names transformers' pipelines answer with: the target for regression ("EF"),
    the bins of `--class_boundaries` for classification ("EF < 50", "EF >= 50"); None keeps transformers' LABEL_i."""
    if args.num_labels == 1:
        return {0: args.label_column}
    if not args.class_boundaries:
        return None
    edges, name = [f"{b:g}" for b in class_boundaries(args)], args.label_column
    inner = [f"{low} <= {name} < {high}" for low, high in zip(edges, edges[1:], strict=False)]
    return dict(enumerate([f"{name} < {edges[0]}", *inner, f"{name} >= {edges[-1]}"]))


def build_model(args: argparse.Namespace, train: Dataset) -> torch.nn.Module:
    """The classifier, from a checkpoint (its pretraining decoder is dropped quietly) or a preset; or the baseline
    (`--baseline`), randomly initialised, with the same EF scaling. Settles `--lv_segmentation_weight` from `train`
    first (`resolve_lv_segmentation_weight`)."""
    resolve_lv_segmentation_weight(args, train)
    head = dict(num_labels=args.num_labels)
    if args.drop_path_rate is not None:
        head.update(drop_path_rate=args.drop_path_rate)
    if args.num_labels == 1:
        # The head learns (EF - mean) / std; logits come back in EF %.
        target = np.asarray(train[args.label_column], dtype=np.float64)
        std = float(target.std())
        head.update(
            problem_type="regression", regression_loss=args.regression_loss,
            regression_target_mean=float(target.mean()), regression_target_std=std if std > 0 else 1.0,
        )  # fmt: skip
    else:
        head.update(problem_type="single_label_classification")
    overrides = {**head, **parse_config_overrides(args.config_overrides)}
    if args.baseline:
        return build_baseline(args.baseline, **overrides, lv_segmentation_weight=args.lv_segmentation_weight)
    names = label_names(args)
    if names:
        overrides.update(id2label=names)
    if args.lv_segmentation_weight or not args.from_scratch:  # a checkpoint's head goes when the loss is off
        overrides.update(lv_segmentation_weight=args.lv_segmentation_weight)
    if args.from_scratch:
        return EchoAIForVideoClassification(EchoAIConfig.from_preset(args.config_name, **overrides))
    model = from_pretrained_with_geometry(EchoAIForVideoClassification, args.model_name_or_path, overrides)
    if args.reinit_top_layers:
        reinitialize_top_layers(model, args.reinit_top_layers)
    return model


def split_metrics(
    predictions: np.ndarray, references: np.ndarray, regression: bool, train_mean: float | None = None
) -> dict:
    """EF metrics (MAE, RMSE, R², ... from `metrics_echoai`) with, on the same videos, the mean predictor's
    (`mean_predictor`: {ef, mae, rmse, r2}) and the verdict of `check_against_mean_predictor` (`VERDICT_KEYS`:
    `learned_ef`, `failure`, the gain over the mean predictor with its 95 % interval, the spreads); or accuracy.
    NaN (undefined) becomes None for JSON."""
    if regression:
        check = check_against_mean_predictor(predictions, references, train_mean)
        metrics = {
            **compute_ef_metrics(predictions, references),
            **{key: check[key] for key in VERDICT_KEYS},
        }
    else:
        metrics = {"n": len(references), "accuracy": float((predictions.argmax(-1) == references).mean())}
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in metrics.items()}


def ef_verdict(metrics: dict[str, dict]) -> tuple[bool, str | None]:
    """(learned EF, the reasons it did not) over the splits' `split_metrics`, e.g. validation and test."""
    failures = [f"{split}: {values['failure']}" for split, values in metrics.items() if values.get("failure")]
    return not failures, "; ".join(failures) or None


SHOWN_METRICS = {True: ("mae", "rmse", "r2"), False: ("accuracy",)}  # regression? -> the metrics logged per split


def shown_metrics(metrics: dict, regression: bool) -> str:
    """One line of a split's metrics for the log, the mean predictor beside the model's MAE."""
    text = ", ".join(
        f"{k} {metrics[k]:.3f}" if metrics[k] is not None else f"{k} n/a" for k in SHOWN_METRICS[regression]
    )
    if regression:
        text += (
            f" (mean predictor mae {metrics['mean_predictor']['mae']:.3f}; prediction sd {metrics['prediction_sd']:.2f}"
            f", label sd {metrics['label_sd']:.2f})"
        )
    return text


def log_run(args: argparse.Namespace, accelerator, model: torch.nn.Module, num_train: int, data_dir: Path) -> None:
    config = unwrap(accelerator, model).config
    effective_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    recipe = (
        f"learning rate {args.learning_rate:g}, no layer decay, no drop path" if args.baseline
        else f"learning rate {args.learning_rate:g}, layer decay {args.layer_decay:g}, drop path {args.drop_path_rate:g}"
    )  # fmt: skip
    budget = f" or {args.max_train_seconds:g} s of training, whichever first" if args.max_train_seconds else ""
    if args.lv_segmentation_weight:
        recipe += f", LV segmentation loss weight {args.lv_segmentation_weight:g}"
    if args.ema_decay:
        recipe += f", weights averaged (EMA decay {args.ema_decay:g})"
    if args.reinit_top_layers:
        n = args.reinit_top_layers
        recipe += f", the checkpoint's top {n} encoder layer{'s' if n > 1 else ''} re-initialised"
    if args.linear_probe_steps:
        recipe += f", only the heads trained for the first {args.linear_probe_steps} steps (LP-FT)"
    logger.info(
        "Fine-tuning %s (%.2f M parameters) on %d training videos of %s (%s, %s): %d steps%s, effective batch %d, "
        "%s, precision %s",
        f"baseline {args.baseline} from scratch" if args.baseline
        else args.model_name_or_path or f"{args.config_name} from scratch", count_parameters(model) / 1e6,
        num_train, data_dir, args.label_column,
        f"mean {config.regression_target_mean:.2f}, std {config.regression_target_std:.2f}" if args.num_labels == 1
        else f"{args.num_labels} classes", args.max_train_steps, budget, effective_batch, recipe,
        accelerator.mixed_precision,
    )  # fmt: skip
    if args.with_tracking:
        accelerator.init_trackers(
            "echoai-finetune", {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        )


class Validation:
    """Scores a split with `predict_split` (the predictor `scripts/evaluate.py` reports with); `validate` keeps
    the best weights by validation MAE (accuracy for classification) in `best` and remembers the latest validation
    in `last`; `on_epoch_end` runs it after every epoch, or with `--eval_steps` at the epoch ends it is due. With
    `ema` (`--ema_decay`) it validates and keeps the weight average instead of the live weights, and validates the
    live weights too, keeping their best in `best_live` (None without `ema`)."""

    def __init__(self, args, accelerator, model, processor, splits: DatasetDict, label_column: str, best: BestModel,
                 epoch_steps: int, ema: ExponentialMovingAverage | None = None):  # fmt: skip
        self.args, self.accelerator, self.model, self.processor = args, accelerator, model, processor
        self.splits, self.label_column, self.best, self.ema = splits, label_column, best, ema
        self.best_live = BestModel() if ema is not None else None
        self.regression = args.num_labels == 1
        self.epoch_steps = epoch_steps  # optimizer steps per epoch
        self.last = {"step": None, "epoch": None, "validation": None}  # the last step's model at the end

    def on_epoch_end(self, epoch: int, state) -> None:
        if validation_due(state.global_step, self.epoch_steps, self.args.eval_steps):
            self.validate(epoch, state)

    def metrics(self, split: str) -> dict:
        rows, args = self.splits[split], self.args
        indices, logits = predict_split(
            self.accelerator, self.model, self.processor, rows["video_path"], args.eval_num_clips,
            clips_per_batch=args.per_device_eval_batch_size * args.eval_num_clips, num_workers=args.num_workers,
        )  # fmt: skip
        references = np.asarray(rows[self.label_column], dtype=np.float64)[indices]
        predictions = logits[:, 0] if self.regression else logits
        train_mean = unwrap(self.accelerator, self.model).config.regression_target_mean
        return split_metrics(predictions, references, self.regression, train_mean=train_mean)

    def score(self, metrics: dict) -> float:
        return metrics["mae"] if self.regression else -metrics["accuracy"]

    def keep_if_best(self, best: BestModel, metrics: dict, step: int, epoch: int) -> str:
        if best.improves(self.score(metrics)):  # every process takes this branch: the metrics are gathered
            best.update(self.score(metrics), metrics, model_state_dict(self.accelerator, self.model), step, epoch)
        return " (best)" if best.step == step else ""

    def validate(self, epoch: int, state) -> None:
        accelerator, best, regression, step = self.accelerator, self.best, self.regression, state.global_step
        live = ""
        if self.ema is not None:  # the live weights first, as they stand: what the average is measured against
            live_metrics = self.metrics("validation")
            live = f"; live weights {shown_metrics(live_metrics, regression)}"
            live += self.keep_if_best(self.best_live, live_metrics, step, epoch)
            self.log("validation_live", live_metrics, step)
        with self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext():
            metrics = self.metrics("validation")
            self.last.update(step=step, epoch=epoch, validation=metrics)
            mark = self.keep_if_best(best, metrics, step, epoch)
            state.best_metric = best.score
        accelerator.print(f"epoch {epoch} step {step} validation {shown_metrics(metrics, regression)}{mark}{live}")
        self.log("validation", metrics, step)

    def log(self, prefix: str, metrics: dict, step: int) -> None:
        """The metrics `shown_metrics` prints, to the trackers under `prefix/`."""
        shown = {f"{prefix}/{k}": metrics[k] for k in SHOWN_METRICS[self.regression]}
        self.accelerator.log({k: v for k, v in shown.items() if v is not None}, step=step)


def validation_due(step: int, epoch_steps: int, eval_steps: int | None) -> bool:
    """Whether the epoch ending at optimizer step `step` validates: every epoch without `eval_steps`, else the
    first epoch end at or past each multiple of it. It depends on the step alone, so a resumed run validates
    where a straight one does."""
    return eval_steps is None or step // eval_steps > (step - epoch_steps) // eval_steps


def validate_last_step(validation: Validation, result) -> None:
    """Validate the last step's model too, unless the last epoch's validation already did.

    A run can end mid-epoch (by steps or by time) or run no step at all; best-by-validation could then keep an
    early model at the mean EF and hide that training never learned.
    """
    last, best, regression = validation.last, validation.best, validation.regression
    if last["step"] != result.state.global_step:
        validation.validate(result.state.epoch, result.state)
    validation.accelerator.print(
        f"last step {last['step']}: validation {shown_metrics(last['validation'], regression)}; kept model: step "
        f"{best.step} (best validation {'MAE' if regression else 'accuracy'})"
    )


def live_weights_results(validation: Validation, model) -> dict:
    """With a weight average: the live weights' best by validation, tested as the kept model is -- the same run
    without the average, since the average leaves the live weights' training untouched."""
    best = validation.best_live
    model.load_state_dict(best.weights)
    test = validation.metrics("test")
    validation.accelerator.print(
        f"live weights' best: epoch {best.epoch} step {best.step}; test {shown_metrics(test, validation.regression)}"
    )
    return {"best_epoch": best.epoch, "best_step": best.step, "validation": best.metrics, "test": test}


def make_compute_loss(args: argparse.Namespace, accelerator):
    def compute_loss(model, batch, step):
        # Stochastic depth draws from torch's global generator: seeding it by (seed, step, process) makes a
        # resumed run drop the same paths as a straight one, whatever evaluation or loaders drew in between.
        torch.manual_seed(derive_seed(args.seed, step, accelerator.process_index))
        labels = batch["labels"] if args.num_labels == 1 else batch["labels"].long()
        masks = {key: batch[key] for key in ("lv_masks", "lv_mask_frames") if key in batch}
        outputs = model(pixel_values=batch["pixel_values"], labels=labels, **masks)
        return outputs.loss, outputs

    return compute_loss


class LVSegmentationLog:
    """`on_step` with `--lv_segmentation_weight`: the loss's parts (EF and LV mask) to the trackers every
    `--logging_steps`, and the mask loss of every step into the run's history (kept through checkpoints) for
    `all_results.json`: whether the head learned the ventricle."""

    NAME = "lv_segmentation_loss"

    def __init__(self, args: argparse.Namespace, accelerator):
        self.args, self.accelerator = args, accelerator

    def __call__(self, step: int, batch: dict, outputs) -> dict[str, float]:
        parts = {self.NAME: float(outputs.lv_segmentation_loss.detach())}
        if step % self.args.logging_steps == 0:
            if outputs.head_loss is not None:
                parts["head_loss"] = float(outputs.head_loss.detach())
            self.accelerator.log(parts, step=step)
            logger.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in parts.items()))
        return {self.NAME: parts[self.NAME]}

    def results(self, state: TrainingState, window: int = 20) -> dict:
        """The weight and the mean mask loss over the first and the last `window` steps of the run."""
        losses = state.history.get(self.NAME, [])
        window = min(window, len(losses))
        mean = lambda values: float(np.mean(values)) if values else None  # noqa: E731
        return {
            "weight": self.args.lv_segmentation_weight, "steps": len(losses), "window": window,
            "loss_first_steps": mean(losses[:window]), "loss_last_steps": mean(losses[-window:]),
        }  # fmt: skip


def describe_protocol(args: argparse.Namespace, config, processor, best: BestModel, last: dict) -> str:
    """How the reported numbers were measured, for `all_results.json` and the model card."""
    regression = args.num_labels == 1
    clips = f"{args.eval_num_clips} evenly spaced clips averaged" if args.eval_num_clips > 1 else "one clip"
    weights = f"the weights' exponential moving average (decay {args.ema_decay:g}) at " if args.ema_decay else ""
    eval_protocol = (
        f"{clips} per video ({config.num_frames} frames, every {processor.period}-th frame, no augmentation); "
        f"the model is {weights}the epoch with the best validation {'MAE' if regression else 'accuracy'} "
        f"(epoch {best.epoch}, step {best.step}), evaluated once on the test split."
    )
    if last["step"] != best.step:
        eval_protocol += f" The last step's model (step {last['step']}) scored validation " + (
            f"MAE {last['validation']['mae']:.3f}."
            if regression
            else f"accuracy {last['validation']['accuracy']:.3f}."
        )
    return eval_protocol


def collect_results(
    args, result, best: BestModel, last: dict, test_metrics: dict, num_train: int, eval_protocol: str, start
):
    """`all_results.json` and, for regression, why the model did not learn EF (None when it did). `start`: the
    checkpoint the run fine-tuned (`describe_start`; None from scratch)."""
    all_results = {
        "model": args.baseline or "echoai", "start": start, "parameters": count_parameters(result.model),
        "validation": best.metrics, "test": test_metrics,
        "best_epoch": best.epoch, "best_step": best.step, "last_step": last,
        "epochs": result.state.epoch, "steps": result.state.global_step, "seconds": round(result.seconds, 2),
        "train_seconds": round(result.state.train_seconds, 2), "max_train_seconds": args.max_train_seconds,
        "stopped_by_time": result.stopped_by_time, "train_videos": num_train,
        "videos_seen": result.state.videos_seen, "videos_skipped": result.state.videos_skipped,
        "label_fraction": args.label_fraction, "eval_num_clips": args.eval_num_clips, "eval_protocol": eval_protocol,
        "learning_rate": args.learning_rate, "layer_decay": args.layer_decay, "drop_path_rate": args.drop_path_rate,
        "lv_segmentation_weight": args.lv_segmentation_weight, "ema_decay": args.ema_decay,
        "reinit_top_layers": args.reinit_top_layers, "linear_probe_steps": args.linear_probe_steps,
    }  # fmt: skip
    failure = None
    if args.num_labels == 1:
        all_results["learned_ef"], failure = ef_verdict({"validation": best.metrics, "test": test_metrics})
        all_results["failure"] = failure
        if failure:
            logger.warning("The fine-tuned model did not learn EF -- %s", failure)
    return all_results, failure


def save_outputs(args, accelerator, model, processor, result, all_results: dict, card: dict) -> None:
    """The kept model (or the baseline's state dict), its processor, the EF pipeline (`pipeline_echoai`, with an EF
    model), `all_results.json`, the model card (`card`: `render_model_card`'s arguments) and the Hub upload."""
    if args.baseline:
        state_dict = model_state_dict(accelerator, model)  # on every process (gathered under FSDP)
        if accelerator.is_main_process:
            save_baseline(result.model, args.output_dir, state_dict)
            processor.save_pretrained(args.output_dir)
    else:
        save_model(accelerator, model, processor, args.output_dir)
    if not accelerator.is_main_process:
        return
    if not args.baseline and args.num_labels == 1 and args.label_column == "EF":  # `pipeline(model=output_dir, ...)`
        save_ef_pipeline(result.model, args.output_dir)
    save_text(Path(args.output_dir) / "all_results.json", json.dumps(all_results, indent=2))
    if not args.baseline:  # the card describes an EchoAI model
        save_text(
            Path(args.output_dir) / "README.md",
            str(render_model_card(result.model, args, train_result=result, **card)),
        )
    if args.push_to_hub:
        push_to_hub(args.output_dir, args.hub_model_id, token=args.hub_token)


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    accelerator = build_accelerator(args)
    create_hub_repo(args, accelerator)  # before anything costly: a bad token or no network fails in seconds
    keep_freed_memory()
    os.makedirs(args.output_dir, exist_ok=True)
    regression = args.num_labels == 1

    # Data, model, processor
    data_dir, splits = load_splits(args, accelerator)
    label_column = LABEL if args.class_boundaries else args.label_column
    model = build_model(args, splits["train"])
    start = describe_start(args.model_name_or_path)  # before --output_dir is written; None from scratch
    use_fastest_attention(model, accelerator.device, accelerator.mixed_precision, training=True)
    with accelerator.main_process_first():
        processor = build_processor(args, model.config, splits["train"])
    lv_masks = args.lv_segmentation_weight > 0
    train_loader = make_dataloader(
        TrainingClips(splits["train"], processor, seed=args.seed, label_column=label_column, lv_masks=lv_masks),
        args.per_device_train_batch_size, args.num_workers,
    )  # fmt: skip

    # Optimizer and schedule: AdamW with layer-wise learning-rate decay, warm-up and cosine decay (MAE fine-tuning);
    # the baseline: AdamW without layer decay, the same schedule.
    optimizer, scheduler = build_optimizer(
        model, args, accelerator, train_loader, layer_decay=args.layer_decay, encoder_delay=args.linear_probe_steps
    )
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    best = BestModel()  # in every checkpoint, so a resumed run restores the same best model
    accelerator.register_for_checkpointing(best)
    ema = ExponentialMovingAverage(accelerator, model, args.ema_decay) if args.ema_decay else None
    epoch_steps = steps_per_epoch(len(train_loader), args)  # the prepared loader's, as the loop counts them
    validation = Validation(args, accelerator, model, processor, splits, label_column, best, epoch_steps, ema)
    if ema is not None:  # so are the weight average and the live weights' best: a resumed run continues them
        accelerator.register_for_checkpointing(ema)
        accelerator.register_for_checkpointing(validation.best_live)
    log_run(args, accelerator, model, len(splits["train"]), data_dir)

    # The loop, validating after every epoch (or every --eval_steps)
    lv_log = LVSegmentationLog(args, accelerator) if lv_masks else None
    result = train(accelerator, model, optimizer, scheduler, train_loader, args, make_compute_loss(args, accelerator),
                   on_step=lv_log, on_epoch_end=validation.on_epoch_end, ema=ema)  # fmt: skip
    result.model = unwrap(accelerator, model)
    if result.stopped_by_signal:
        accelerator.end_training()
        return result
    validate_last_step(validation, result)

    # The best model: test once, check against the mean predictor, save with the processor, results and card.
    live = live_weights_results(validation, result.model) if ema is not None else None
    result.model.load_state_dict(best.weights)
    test_metrics = validation.metrics("test")
    accelerator.print(f"best: epoch {best.epoch} step {best.step}; test {shown_metrics(test_metrics, regression)}")
    eval_protocol = describe_protocol(args, result.model.config, processor, best, validation.last)
    all_results, failure = collect_results(
        args, result, best, validation.last, test_metrics, len(splits["train"]), eval_protocol, start
    )
    if lv_log is not None:
        all_results["lv_segmentation"] = lv_log.results(result.state)
    if live is not None:
        all_results["live_weights"] = live
    card = dict(
        task="regression" if regression else "classification", dataset_dir=data_dir, num_videos=len(splits["train"]),
        metrics={"validation": best.metrics, "test": test_metrics}, eval_protocol=eval_protocol, failure=failure,
        start=start,
    )  # fmt: skip
    save_outputs(args, accelerator, model, processor, result, all_results, card)
    accelerator.end_training()
    result.all_results = all_results
    return result


if __name__ == "__main__":
    with exit_on_run_error():
        main(sys.argv[1:])
