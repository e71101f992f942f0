#!/usr/bin/env python
"""Compare fine-tuning arms over their seeds: each arm's spread, the mean predictor beside it, and whether an arm
reads EF better than the first arm beyond chance.

    python scripts/compare_runs.py \\
        --arm scratch runs/scratch_s0 runs/scratch_s1 runs/scratch_s2 \\
        --arm pretrained runs/ft_s0 runs/ft_s1 runs/ft_s2 --output_dir runs/comparison

Each `--arm` is a name and the output folders of its runs (`finetune.py --output_dir`, each holding its
`all_results.json`), one a seed; the first arm is the reference. For every arm it prints the test MAE (or
`--metric rmse`) as mean ± SD over its runs, the same in units of the test labels' SD, each run's value, how many
learned EF beyond chance (`learned_ef`) and the mean predictor's score on the same videos; for every other arm,
how far its mean is below the reference's and a one-sided permutation test of that lead
(`metrics_echoai.permutation_test`: exact over every split of the runs, with the least p-value the arms' sizes
allow, since with three seeds a side no lead gets p below 0.05).

Runs fine-tuned from one checkpoint share its pretraining draw, so they are not independent of one another:
`finetune.py` records the sha256 of the weights a run started from (`start` in `all_results.json`), and runs are
grouped by it. Where an arm has several runs of one start, its spread is also split into the starts' means and
the seeds within a start (`metrics_echoai.nested_spread`), and the test is made again with one value a start, the
comparison that counts draws of the pretraining rather than fine-tuning seeds. Runs from a random initialisation
are each a draw of their own; so is a run whose results predate the record (a warning says which).

Writes to `--output_dir` (when given): comparison.md (the tables), comparison.json (every number) and
comparison.png (each run as a dot, coloured by its start, with the arms' means and the mean predictor).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np

from inference_echoai import make_figure
from metrics_echoai import nested_spread, permutation_test


logger = logging.getLogger("compare_runs")

METRICS = ("mae", "rmse")  # lower is better for both: the test says whether an arm is lower


class RunsError(ValueError):
    """A run folder or an arm that cannot be compared, with what to do about it."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--arm", nargs="+", action="append", required=True, metavar=("NAME", "RUN"),
        help="An arm's name, then its runs' output folders (one a seed). Repeat for every arm; the first is the "
        "reference the others are tested against.",
    )  # fmt: skip
    parser.add_argument("--metric", choices=METRICS, default="mae", help="The test metric to compare (EF points).")
    parser.add_argument("--split", default="test", help="The split of all_results.json whose metric is compared.")
    parser.add_argument(
        "--max_splits", type=int, default=200_000,
        help="Count every split of the runs up to this many; beyond it, draw this many at random.",
    )  # fmt: skip
    parser.add_argument("--output_dir", type=Path, default=None, help="Where to write the tables and the plot.")
    args = parser.parse_args(argv)
    for arm in args.arm:
        if len(arm) < 2:
            parser.error(f"--arm {arm[0]!r} names no run: give its name, then at least one run folder")
    names = [arm[0] for arm in args.arm]
    if len(set(names)) != len(names):
        parser.error(f"arm names must differ, got {names}")
    folders = [Path(folder).resolve() for arm in args.arm for folder in arm[1:]]
    repeated = sorted({str(f) for f in folders if folders.count(f) > 1})
    if repeated:
        parser.error(f"a run counts once, in one arm; given more than once: {', '.join(repeated)}")
    return args


def load_run(folder: Path, split: str, metric: str) -> dict:
    """One run's compared value, its start's fingerprint and what it scored against the mean predictor."""
    path = Path(folder) / "all_results.json"
    if not path.is_file():
        raise RunsError(
            f"{folder} has no all_results.json: pass the --output_dir of a finished finetune.py run "
            "(an interrupted run writes it only once it finishes)"
        )
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise RunsError(f"{path} is not valid JSON ({error}); rerun the fine-tuning or restore the file") from None
    scores = results.get(split)
    if not isinstance(scores, dict) or not isinstance(scores.get(metric), (int, float)):
        raise RunsError(
            f"{path} has no {split} {metric}: it is not an EF fine-tuning run's results "
            f"(pretraining and classification runs have none), or --split names a split it did not score"
        )
    known = "start" in results
    start = results.get("start") or {}
    fingerprint = start.get("sha256") or start.get("revision") or start.get("model_name_or_path")
    if not known:
        logger.warning("%s does not record the checkpoint it started from; it is counted as a draw of its own", path)
    mean_predictor = scores.get("mean_predictor") or {}
    return {
        "run": str(folder),
        "value": float(scores[metric]),
        # Runs of one start share a group; a random initialisation (or an unknown start) is a group of its own.
        "group": f"start {fingerprint[:12]}" if fingerprint else f"run {folder}",
        "start": start.get("model_name_or_path"),
        "learned_ef": results.get("learned_ef"),
        "label_sd": scores.get("label_sd"),
        "videos": scores.get("n"),
        "mean_predictor": mean_predictor.get(metric),
    }


def summarise_arm(name: str, runs: list[dict]) -> dict:
    """An arm's spread over its runs and over the groups (starts) they come in."""
    groups: dict[str, list[float]] = {}
    for r in runs:
        groups.setdefault(r["group"], []).append(r["value"])
    nested = nested_spread(list(groups.values()))  # its mean and SD are the arm's over every run
    label_sd = [r["label_sd"] for r in runs if r["label_sd"]]
    mean_predictor = [r["mean_predictor"] for r in runs if r["mean_predictor"] is not None]
    return {
        "name": name,
        "runs": runs,
        "mean": nested["mean"],
        "std": nested["std"],
        "label_sd": float(np.mean(label_sd)) if label_sd else math.nan,
        "mean_predictor": float(np.mean(mean_predictor)) if mean_predictor else math.nan,
        "learned_ef": sum(r["learned_ef"] is True for r in runs),
        "groups": groups,
        "nested": nested,
        "shared_starts": any(len(v) > 1 for v in groups.values()),
    }


def check_comparable(arms: list[dict], metric: str) -> None:
    """The arms must be scored on the same videos: the same number of them, and the same mean predictor where the
    runs used the same labelled subset (it is the training subset's mean EF, so it differs between label
    fractions, which is a comparison worth making; the number of videos is not)."""
    videos = {r["videos"] for arm in arms for r in arm["runs"] if r["videos"] is not None}
    if len(videos) > 1:
        raise RunsError(
            f"the runs were scored on different numbers of videos ({sorted(videos)}): compare runs tested on one "
            "corpus's split"
        )
    spread = [
        arm["name"] for arm in arms
        if np.ptp([r["mean_predictor"] for r in arm["runs"] if r["mean_predictor"] is not None] or [0.0]) > 1e-6
    ]  # fmt: skip
    if spread:
        logger.warning(
            "the mean predictor's %s differs between the runs of %s: they were trained on different labelled "
            "subsets (a different --label_fraction or corpus)", metric, ", ".join(spread),
        )  # fmt: skip


def compare(arms: list[dict], max_splits: int) -> list[dict]:
    """Every arm after the first against the first: the lead of its mean, tested over runs and, where runs share
    starts, over starts."""
    reference = arms[0]
    rows = []
    for arm in arms[1:]:
        row = {
            "arm": arm["name"], "reference": reference["name"],
            "runs": permutation_test([r["value"] for r in arm["runs"]], [r["value"] for r in reference["runs"]],
                                     max_splits=max_splits),
            "starts": None,
        }  # fmt: skip
        if arm["shared_starts"] or reference["shared_starts"]:
            row["starts"] = permutation_test(
                arm["nested"]["group_means"], reference["nested"]["group_means"], max_splits=max_splits
            )
        rows.append(row)
    return rows


def fmt(value: float, digits: int = 2) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def tables(arms: list[dict], rows: list[dict], metric: str, split: str) -> list[str]:
    """The comparison as markdown: one row an arm, then one row a test."""
    name = metric.upper()
    lines = [
        f"| arm | runs | {split} {name} (mean ± SD) | × SD of the labels | per run | learned EF | starts: SD of "
        f"their means / within a start | mean predictor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        nested = arm["nested"]
        starts = (
            f"{len(arm['groups'])}: {fmt(nested['between_std'])} / {fmt(nested['within_std'])}"
            if arm["shared_starts"]
            else "–"
        )
        lines.append(
            f"| {arm['name']} | {len(arm['runs'])} | {fmt(arm['mean'])} ± {fmt(arm['std'])} | "
            f"{fmt(arm['mean'] / arm['label_sd'], 3)} | {', '.join(fmt(r['value']) for r in arm['runs'])} | "
            f"{arm['learned_ef']}/{len(arm['runs'])} | {starts} | {fmt(arm['mean_predictor'])} |"
        )
    if rows:
        lines += [
            "",
            f"| arm | below {rows[0]['reference']} by | p over runs (splits, least p) | p over starts (splits, least p) |",
            "|---|---|---|---|",
        ]
        for row in rows:
            cells = []
            for test in (row["runs"], row["starts"]):
                if test is None:
                    cells.append("–")
                else:
                    kind = "" if test["exact"] else ", drawn"
                    cells.append(f"{test['p_value']:.3f} ({test['splits']}{kind}, {test['least_p']:.3f})")
            lines.append(f"| {row['arm']} | {fmt(row['runs']['difference'])} | {cells[0]} | {cells[1]} |")
    return lines


def plot(arms: list[dict], metric: str, split: str, path: Path) -> None:
    """Each run a dot (one colour a start, shared across arms), each arm's mean ± SD, the mean predictor dashed."""
    colours, labelled = {}, set()
    figure = make_figure((1.6 + 1.4 * len(arms), 4.0))
    axis = figure.add_subplot()
    for i, arm in enumerate(arms):
        for j, run in enumerate(arm["runs"]):
            shared = run["group"].startswith("start ")
            colour = colours.setdefault(run["group"], f"C{len(colours) % 10}") if shared else "0.45"
            label = f"{run['start']} ({run['group']})" if shared and run["group"] not in labelled else None
            labelled.add(run["group"])
            offset = (j - (len(arm["runs"]) - 1) / 2) * 0.08
            axis.plot(i + offset, run["value"], "o", color=colour, alpha=0.85, label=label)
        spread = 0.0 if not math.isfinite(arm["std"]) else arm["std"]
        axis.errorbar(i + 0.32, arm["mean"], yerr=spread, fmt="_", color="black", markersize=14, capsize=4)
        if math.isfinite(arm["mean_predictor"]):
            axis.hlines(arm["mean_predictor"], i - 0.35, i + 0.35, colors="0.3", linestyles="dashed")
    axis.set_xticks(range(len(arms)), [arm["name"] for arm in arms], rotation=15)
    axis.set_ylabel(f"{split} {metric.upper()} (EF points)")
    axis.set_title("runs (dots; one colour a start), mean ± SD (bar), mean predictor (dashed)", fontsize=8)
    axis.set_ylim(bottom=0)
    if colours:
        axis.legend(fontsize=7, loc="center")  # runs sit low, the mean predictor high: the middle is free
    figure.tight_layout()
    figure.savefig(path)


def finite_or_null(value):
    """`value` with every NaN or infinity made None, so the JSON it is written as is valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    arms = [summarise_arm(name, [load_run(Path(f), args.split, args.metric) for f in folders])
            for name, *folders in args.arm]  # fmt: skip
    check_comparable(arms, args.metric)
    rows = compare(arms, args.max_splits)
    lines = tables(arms, rows, args.metric, args.split)
    print("\n".join(lines))
    report = {"metric": args.metric, "split": args.split, "arms": arms, "tests": rows}
    if args.output_dir is not None:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        (args.output_dir / "comparison.md").write_text("\n".join(lines) + "\n")
        (args.output_dir / "comparison.json").write_text(json.dumps(finite_or_null(report), indent=2))
        plot(arms, args.metric, args.split, args.output_dir / "comparison.png")
        logger.info("wrote comparison.md, comparison.json and comparison.png to %s", args.output_dir)
    return report


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except RunsError as error:
        sys.exit(f"compare_runs.py: {error}")
