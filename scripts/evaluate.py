#!/usr/bin/env python
"""Evaluate a fine-tuned EchoAI EF model on an EchoNet-Dynamic split, as EchoNet-Dynamic reports it.

    python scripts/evaluate.py --model_name_or_path outputs/finetune            # synthetic corpus, test split
    python scripts/evaluate.py --model_name_or_path outputs/finetune --data_dir EchoNet-Dynamic \\
        --protocol all_clips --bootstrap 10000 --bf16 --num_workers 2 --beat_by_beat

Protocols: `one_clip` (the clip at frame 0), `all_clips` (EchoNet's test-time protocol: the mean over
every valid clip start), `k_clips` (`--num_clips` evenly spaced clips). `--beat_by_beat` also detects
cardiac cycles from the video itself (no segmentation), scores one clip centred on each, and reports
how close the detected ED/ES frames are to the traced ones in VolumeTracings.csv.

Writes to `--output_dir`: predictions.csv, metrics.json (with percentile-bootstrap intervals),
strata.csv (errors by EF range, frame rate and video length, also printed), scatter.png and
bland_altman.png.

The mean predictor is scored beside the model on the same videos: every video gets the training split's mean EF,
the model config's `regression_target_mean` (set by finetune.py). metrics.json holds its MAE / RMSE / R² under
`mean_predictor` and the verdict of `metrics_echoai.check_against_mean_predictor`: `learned_ef` false, with the
reason in `failure`, when the predictions collapsed to a constant (SD below 0.1 x the label SD) or their MAE is
not below the mean predictor's beyond chance (also a WARNING in the log); `mae_gain` and `mae_gain_interval` (the
mean predictor's MAE minus the model's, with its 95 % bootstrap interval over the videos) say by how much.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from datasets import Dataset

from data_echoai import load_echonet_dynamic, synthetic_echonet_dir
from inference_echoai import (
    ModelLoadingError,
    add_prediction_arguments,
    bland_altman_plot,
    load_model_and_processor,
    nearest_frame_error,
    predict_videos,
    prediction_options,
    scatter_plot,
)
from metrics_echoai import VERDICT_KEYS, check_against_mean_predictor, compute_ef_metrics
from perf_echoai import keep_freed_memory, prepare_for_inference


logger = logging.getLogger("evaluate")

SPLITS = ("test", "validation", "train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="Fine-tuned model folder (with its processor).")
    parser.add_argument("--data_dir", default=None, help="EchoNet-Dynamic folder (default: the synthetic corpus).")
    parser.add_argument("--synthetic_num_videos", type=int, default=200, help="Size of the default synthetic corpus.")
    parser.add_argument("--split", choices=SPLITS, default="test")
    add_prediction_arguments(parser)
    parser.add_argument("--beat_by_beat", action="store_true", help="Also score clips centred on detected beats.")
    parser.add_argument("--bootstrap", type=int, default=1000, help="Bootstrap resamples (EchoNet: 10,000).")
    parser.add_argument("--confidence", type=float, default=0.95, help="Bootstrap interval coverage.")
    parser.add_argument("--seed", type=int, default=0, help="Bootstrap seed.")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="Evaluate only the first N videos.")
    parser.add_argument("--output_dir", default="outputs/evaluate")
    args = parser.parse_args(argv)
    args.prediction = prediction_options(parser, args)
    return args


def strata_table(table: pd.DataFrame, prediction: str = "EF_predicted") -> pd.DataFrame:
    """MAE, RMSE and bias by reference-EF range (fixed bins), frame rate and video length (terciles)."""
    ef = table["EF"]
    groups = [
        ("EF range", "EF < 40", table[ef < 40]),
        ("EF range", "40 <= EF <= 55", table[(ef >= 40) & (ef <= 55)]),
        ("EF range", "EF > 55", table[ef > 55]),
    ]
    for column, name in (("FPS", "FPS"), ("NumberOfFrames", "frames")):
        values = table[column].astype(float)
        if values.nunique() > 1:
            bins = pd.qcut(values, q=min(3, values.nunique()), duplicates="drop")
        else:
            bins = pd.Series(pd.Categorical([f"{values.iloc[0]:g}"] * len(values)), index=table.index)
        for interval in bins.cat.categories:
            if isinstance(interval, pd.Interval):
                label = f"{interval.left:.3g} < {name} <= {interval.right:.3g}"
            else:
                label = f"{name} {interval}"
            groups.append((f"{name} tercile", label, table[bins == interval]))
    rows = []
    for stratum, label, group in groups:
        row = {"stratum": stratum, "bin": label, "n": len(group)}
        if len(group) >= 2:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # undefined AUCs inside a narrow EF range are expected
                metrics = compute_ef_metrics(group[prediction], group["EF"], thresholds=())
            row.update({k: metrics[k] for k in ("mae", "rmse", "bias", "r2")})
        else:
            row.update({k: math.nan for k in ("mae", "rmse", "bias", "r2")})
        rows.append(row)
    return pd.DataFrame(rows)


def beat_detection_summary(table: pd.DataFrame) -> dict:
    """Median and mean |ED| and |ES| frame errors (frames and ms) of the nearest detected beat."""
    summary = {
        "num_videos": len(table),
        "num_videos_with_beats": int((table["num_beats"] > 0).sum()),
        "mean_beats_per_video": float(table["num_beats"].mean()),
    }
    for phase in ("ED", "ES"):
        for unit in ("frames", "ms"):
            values = table[f"{phase}_error_{unit}"].dropna()
            summary[f"{phase.lower()}_error_{unit}_median"] = float(values.median()) if len(values) else math.nan
            summary[f"{phase.lower()}_error_{unit}_mean"] = float(values.mean()) if len(values) else math.nan
    return summary


def load_split(args: argparse.Namespace) -> tuple[Path, Dataset, pd.DataFrame]:
    """One EchoNet split (unreadable videos are excluded and reported by the loader) and its FileList columns."""
    data_dir = Path(args.data_dir) if args.data_dir else synthetic_echonet_dir(args.synthetic_num_videos)
    rows = load_echonet_dynamic(data_dir)[args.split]
    if args.max_eval_samples is not None:
        rows = rows.select(range(min(args.max_eval_samples, len(rows))))
    if len(rows) < 2:
        sys.exit(f"error: the {args.split} split of {data_dir} has {len(rows)} usable video(s); metrics need 2")
    table = rows.select_columns(["FileName", "EF", "FPS", "NumberOfFrames", "EDFrame", "ESFrame"]).to_pandas()
    return data_dir, rows, table


def add_predictions(table: pd.DataFrame, results: list, beat_by_beat: bool) -> None:
    """The per-video predictions as columns of `table`; with `beat_by_beat`, the beat-centred EF, the heart rate
    and how far the detected ED / ES frames lie from the traced ones."""
    table["EF_predicted"] = [r.ef for r in results]
    table["clip_spread"] = [r.clip_spread for r in results]
    table["num_clips"] = [r.num_clips for r in results]
    if not beat_by_beat:
        return
    table["EF_beat_by_beat"] = [r.ef_beat_by_beat for r in results]
    table["beat_clip_spread"] = [r.beat_clip_spread for r in results]
    table["num_beats"] = [r.num_beats for r in results]
    table["heart_rate"] = [r.beats.heart_rate if r.beats else math.nan for r in results]
    for phase, position in (("ED", 0), ("ES", 1)):
        errors = [
            nearest_frame_error([b[position] for b in r.beats.beats] if r.beats else [], int(traced))
            for r, traced in zip(results, table[f"{phase}Frame"], strict=True)
        ]
        table[f"{phase}_error_frames"] = errors
        table[f"{phase}_error_ms"] = np.asarray(errors) * 1000.0 / table["FPS"].to_numpy()


def evaluation_metrics(args: argparse.Namespace, model, scored: pd.DataFrame, data_dir: Path, num_unreadable: int):
    """metrics.json's content (with bootstrap intervals), and the check against the mean predictor (None when
    the model's config has no training mean to compare with)."""
    bootstrap = dict(bootstrap=args.bootstrap, seed=args.seed, confidence=args.confidence)
    metrics = {
        "protocol": args.protocol, "split": args.split, "data_dir": str(data_dir),
        "model_name_or_path": str(args.model_name_or_path), "num_unreadable": num_unreadable,
        **compute_ef_metrics(scored["EF_predicted"], scored["EF"], **bootstrap),
    }  # fmt: skip
    if args.protocol == "k_clips":
        metrics["num_clips"] = args.num_clips
    train_mean = getattr(model.config, "regression_target_mean", None)
    check = check_against_mean_predictor(scored["EF_predicted"], scored["EF"], train_mean) if train_mean else None
    if check is None:  # a config without the training mean (0.0, the default): no floor to compare with
        logger.warning("%s has no regression_target_mean: the mean predictor is not scored", args.model_name_or_path)
    else:
        metrics.update({key: check[key] for key in VERDICT_KEYS})
        if check["failure"]:
            logger.warning("%s did not learn EF -- %s", args.model_name_or_path, check["failure"])
    if args.beat_by_beat:
        metrics["beat_by_beat"] = compute_ef_metrics(scored["EF_beat_by_beat"], scored["EF"], **bootstrap)
        metrics["beat_detection"] = beat_detection_summary(scored)
    return metrics, check


def write_outputs(args, output_dir: Path, table: pd.DataFrame, scored: pd.DataFrame, metrics: dict, strata) -> None:
    table.drop(columns=["EDFrame", "ESFrame"]).to_csv(output_dir / "predictions.csv", index=False)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=True) + "\n")
    strata.to_csv(output_dir / "strata.csv", index=False)
    title = f"{args.protocol}, {args.split} split (n={len(scored)})"
    scatter_plot(scored["EF_predicted"], scored["EF"], metrics, output_dir / "scatter.png", title=title)
    bland_altman_plot(scored["EF_predicted"], scored["EF"], metrics, output_dir / "bland_altman.png", title=title)


def print_summary(args, metrics: dict, check: dict | None, num_scored: int, strata: pd.DataFrame) -> None:
    ci = lambda k: f" [{metrics[k + '_ci_low']:.2f}, {metrics[k + '_ci_high']:.2f}]" if args.bootstrap else ""  # noqa: E731
    print(f"\n{args.protocol} on {num_scored} {args.split} videos:")
    for key in ("mae", "rmse", "r2", "bias"):
        print(f"  {key:5s} {metrics[key]:7.3f}{ci(key)}")
    if check is not None:
        baseline = check["mean_predictor"]
        print(
            f"  mean predictor (training mean EF {baseline['ef']:.1f} % for every video): MAE {baseline['mae']:.3f}, "
            f"RMSE {baseline['rmse']:.3f}, R² {baseline['r2']:.3f}; "
            + ("the model beats it" if check["learned_ef"] else f"NOT LEARNED: {check['failure']}")
        )
    if args.beat_by_beat:
        bbb, detection = metrics["beat_by_beat"], metrics["beat_detection"]
        print(f"  beat-by-beat: MAE {bbb['mae']:.3f}, RMSE {bbb['rmse']:.3f}, R² {bbb['r2']:.3f}")
        print(
            f"  beat detection: {detection['mean_beats_per_video']:.2f} beats/video, median |ED| error "
            f"{detection['ed_error_frames_median']:.1f} frames ({detection['ed_error_ms_median']:.0f} ms), "
            f"|ES| {detection['es_error_frames_median']:.1f} frames ({detection['es_error_ms_median']:.0f} ms)"
        )
    print("\n" + strata.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    data_dir, rows, table = load_split(args)

    # Model.
    keep_freed_memory()
    try:
        model, processor = load_model_and_processor(args.model_name_or_path, args.device)
    except ModelLoadingError as error:
        sys.exit(f"error: {error}")
    prepare_for_inference(model, args.device, args.bf16)
    logger.info(
        "Evaluating %s on %d %s videos of %s, protocol %s", args.model_name_or_path, len(rows), args.split,
        data_dir, args.protocol,
    )  # fmt: skip

    # Predictions.
    results = predict_videos(model, processor, rows["video_path"], beat_by_beat=args.beat_by_beat, **args.prediction)
    add_predictions(table, results, args.beat_by_beat)
    failed = [(r.path, r.error) for r in results if r.error is not None]
    for path, reason in failed:
        logger.warning("Could not read %s: %s", path, reason)
    scored = table[table["EF_predicted"].notna()]
    if len(scored) < 2:
        sys.exit(f"error: only {len(scored)} video(s) could be scored; metrics need 2")

    # Metrics, strata, figures.
    metrics, check = evaluation_metrics(args, model, scored, data_dir, len(failed))
    strata = strata_table(scored)
    write_outputs(args, output_dir, table, scored, metrics, strata)
    print_summary(args, metrics, check, len(scored), strata)
    print(f"\nWrote {output_dir}/predictions.csv, metrics.json, strata.csv, scatter.png, bland_altman.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
