#!/usr/bin/env python
"""Ejection fraction of echo videos with a fine-tuned EchoAI model.

    python scripts/predict.py video.avi --model_name_or_path outputs/finetune
    python scripts/predict.py videos/ --model_name_or_path outputs/finetune --protocol all_clips --output ef.csv

VIDEO_OR_DIR is one video or a folder searched recursively for .avi / .mp4 files and DICOM files (.dcm, or
any file with the DICOM preamble; multi-frame ultrasound, read as `prepare_corpus.py` reads it: the sector
cropped, burnt-in text and ECG outside it blanked, the frame rate from its tags; needs the `dicom` extra,
`pip install "echoai[dicom]"`). No DICOM attribute is printed or written. Each video's EF is
the mean over the protocol's clips (`one_clip`, `all_clips` -- EchoNet's test protocol, the default --
or `k_clips` with `--num_clips`); the clip spread is the standard deviation of the clip predictions,
a rough indicator of how much the estimate depends on where the clip starts. Preprocessing is the
processor saved with the model, i.e. exactly the training preprocessing.

Videos that cannot be read are listed with the reason and the others are still predicted. Exit code
0 when at least one video was predicted, 1 when none could be, 2 for usage errors (no model, no
video found).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pandas as pd

from corpus_echoai import list_sources
from inference_echoai import (
    ModelLoadingError,
    add_prediction_arguments,
    load_model_and_processor,
    predict_videos,
    prediction_options,
)
from perf_echoai import keep_freed_memory, use_fastest_attention


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
    args = parser.parse_args(argv)
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
    use_fastest_attention(model, args.device, "bf16" if args.bf16 else "no", training=False)

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
    if not predicted:
        print(f"error: none of the {len(rows)} video(s) could be read, so nothing was predicted", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
