#!/usr/bin/env python
"""Ejection fraction of echo videos with a fine-tuned EchoAI model.

    python scripts/predict.py video.avi --model_name_or_path outputs/finetune
    python scripts/predict.py videos/ --model_name_or_path outputs/finetune --protocol all_clips --output ef.csv
    python scripts/predict.py video.avi --model_name_or_path outputs/finetune --saliency_dir saliency/

VIDEO_OR_DIR is one video or a folder searched recursively for .avi / .mp4 files and DICOM files (.dcm, or
any file with the DICOM preamble; multi-frame ultrasound, read as `prepare_corpus.py` reads it: the sector
cropped, burnt-in text and ECG outside it blanked, the frame rate from its tags; needs the `dicom` extra,
`pip install "echoai[dicom]"`). No DICOM attribute is printed or written. Each video's EF is
the mean over the protocol's clips (`one_clip`, `all_clips` -- EchoNet's test protocol, the default --
or `k_clips` with `--num_clips`); the clip spread is the standard deviation of the clip predictions,
a rough indicator of how much the estimate depends on where the clip starts. Preprocessing is the
processor saved with the model, i.e. exactly the training preprocessing.

With `--saliency_dir`, each video also gets a map of where the estimate came from (`saliency_echoai`): how
much one clip's EF changes when each block of tubelets is left out of the encoder's input, for the clip
centred on the first detected heart beat (else the clip at frame 0). Per video: `<name>_saliency.npy`
(T', h, w) EF points, `<name>_saliency.mp4` (the clip with the map blended in) and `<name>_saliency.png`
(a strip of its frames). It costs one forward pass per block (at most `--saliency_max_groups`).

Videos that cannot be read are listed with the reason and the others are still predicted. Exit code
0 when at least one video was predicted, 1 when none could be, 2 for usage errors (no model, no
video found).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from corpus_echoai import list_sources
from inference_echoai import (
    ModelLoadingError,
    add_prediction_arguments,
    load_model_and_processor,
    predict_videos,
    prediction_options,
)
from perf_echoai import keep_freed_memory, prepare_for_inference
from saliency_echoai import save_saliency, video_saliency


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("video_or_dir", help="A video file or a folder of videos (searched recursively).")
    parser.add_argument(
        "--model_name_or_path",
        required=True,
        help="Fine-tuned model folder with its processor (nothing is downloaded).",
    )
    add_prediction_arguments(parser)
    parser.add_argument("--output", default=None, help="Also write the table to this .csv or .json file.")
    parser.add_argument(
        "--saliency_dir", default=None, help="Also write each video's occlusion saliency map and pictures here."
    )
    parser.add_argument(
        "--saliency_group_shape", type=int, nargs=3, default=None, metavar=("T", "H", "W"),
        help="Tubelets per left-out block (time, height, width). Default: the whole clip in time and the smallest "
        "square blocks that keep to --saliency_max_groups forward passes.",
    )  # fmt: skip
    parser.add_argument("--saliency_max_groups", type=int, default=50, help="Forward passes per clip, at most.")
    args = parser.parse_args(argv)
    if args.saliency_group_shape and min(args.saliency_group_shape) < 1:
        parser.error(f"--saliency_group_shape needs three positive tubelet counts, got {args.saliency_group_shape}")
    if args.output and Path(args.output).suffix.lower() not in (".csv", ".json"):
        parser.error(f"--output must end in .csv or .json, got {args.output}")
    args.prediction = prediction_options(parser, args)
    return args


def find_videos(video_or_dir: str) -> list[Path]:
    """The file itself, or every video and DICOM file under the folder (sorted), as corpus preparation finds them."""
    path = Path(video_or_dir).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return [Path(source.path) for source in list_sources([path])[0]]
    return []


def write_saliency(model, processor, results: list, args: argparse.Namespace) -> None:
    """Occlusion saliency of each predicted video into --saliency_dir (see the module docstring)."""
    if model.config.num_labels != 1:
        print("\nsaliency skipped: it explains an EF estimate, and this model classifies", file=sys.stderr)
        return
    print(f"\nSaliency maps -> {args.saliency_dir}")
    device_type = torch.device(args.device).type
    autocast = torch.autocast(device_type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    for result in tqdm(results, desc="saliency", unit="video", disable=len(results) < 2):
        with autocast:
            saliency = video_saliency(
                model, processor, result.path, args.saliency_group_shape, args.saliency_max_groups
            )
        if saliency.error is not None:
            print(f"  {result.path}: {saliency.error}")
            continue
        name = Path(result.path).stem
        save_saliency(args.saliency_dir, name, saliency.result, saliency.frames, saliency.frame_numbers, saliency.fps)
        where = "centred on the first beat" if saliency.centred_on_beat else "at frame 0 (no beat found)"
        print(f"  {name}: clip {where}, {saliency.result.num_forward_passes} blocks left out one at a time")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    videos = find_videos(args.video_or_dir)
    if not videos:
        print(
            f"error: no video found at {args.video_or_dir} (a file, or a folder with .avi, .mp4 or DICOM files)",
            file=sys.stderr,
        )
        return 2
    keep_freed_memory()
    try:
        model, processor = load_model_and_processor(args.model_name_or_path, args.device)
    except ModelLoadingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    prepare_for_inference(model, args.device, args.bf16)

    results = predict_videos(model, processor, videos, progress=len(videos) > 1, **args.prediction)
    root = Path(args.video_or_dir) if Path(args.video_or_dir).is_dir() else None
    rows = [
        {
            "video": str(Path(r.path).relative_to(root)) if root else r.path,
            "EF": None if math.isnan(r.ef) else round(r.ef, 3),
            "clip_spread": None if math.isnan(r.clip_spread) else round(r.clip_spread, 3),
            "num_clips": r.num_clips,
            "error": r.error,
        }
        for r in results
    ]
    predicted = [row for row in rows if row["error"] is None]
    failed = [row for row in rows if row["error"] is not None]

    width = max(len(row["video"]) for row in rows)
    print(f"{'video':{width}s}  {'EF (%)':>7s}  {'spread':>6s}  clips")
    for row in predicted:
        print(f"{row['video']:{width}s}  {row['EF']:7.2f}  {row['clip_spread']:6.2f}  {row['num_clips']:5d}")
    if failed:
        print(f"\n{len(failed)} video(s) could not be read:")
        for row in failed:
            print(f"  {row['video']}: {row['error']}")

    if args.output:
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        if output.suffix.lower() == ".json":
            output.write_text(json.dumps(rows, indent=2) + "\n")
        else:
            pd.DataFrame(rows, columns=list(rows[0])).to_csv(output, index=False)
        print(f"\nWrote {output}")
    if args.saliency_dir and predicted:
        write_saliency(model, processor, [r for r in results if r.error is None], args)
    if not predicted:
        print(f"error: none of the {len(rows)} video(s) could be read, so nothing was predicted", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
