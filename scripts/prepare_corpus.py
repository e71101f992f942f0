"""Prepare a sharded pretraining corpus (parquet) from folders of AVI, MP4 and DICOM echo videos.

    export ECHOAI_CORPUS_SALT=<secret>
    python scripts/prepare_corpus.py /data/echo_avi /data/echo_dicom --output_dir /data/corpus \
        [--image_size 112] [--shard_size_mb 256] [--dedupe] [--num_workers 2] [--write_path_map]

Rerun the same command to resume an interrupted preparation. See `corpus_echoai` for the format, the
DICOM handling (sector masking, frame rate), de-identification and how to load the result.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict

from corpus_echoai import REPORT_FILE, SALT_ENV, prepare_corpus, resolve_salt


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help="Folders of AVI / MP4 / DICOM files (searched recursively).")
    parser.add_argument("--output_dir", required=True, help="Corpus folder; rerun with the same one to resume.")
    parser.add_argument("--salt", default=None, help=f"Secret for the hashed ids (default: ${SALT_ENV}).")
    parser.add_argument("--image_size", type=int, default=112, help="Output frame side in pixels.")
    parser.add_argument("--shard_size_mb", type=float, default=256, help="Target parquet shard size (MiB).")
    parser.add_argument("--dedupe", action="store_true", help="Drop clips identical to one already written.")
    parser.add_argument("--num_workers", type=int, default=os.cpu_count() or 1, help="Preparation processes.")
    parser.add_argument(
        "--write_path_map",
        action="store_true",
        help="Also write path_map.jsonl (video_id -> source path). SENSITIVE: paths may hold PHI; keep it local.",
    )
    parser.add_argument("--no_progress", action="store_true", help="No progress bar (logs, CI).")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        salt = resolve_salt(args.salt)
    except ValueError as error:
        sys.exit(f"error: {error}")
    report = prepare_corpus(
        args.inputs,
        args.output_dir,
        salt=salt,
        image_size=args.image_size,
        shard_size_mb=args.shard_size_mb,
        dedupe=args.dedupe,
        num_workers=args.num_workers,
        write_path_map=args.write_path_map,
        progress=not args.no_progress,
    )
    print(report.summary())
    print(json.dumps(asdict(report), indent=2, sort_keys=True))
    print(f"Report saved to {os.path.join(args.output_dir, REPORT_FILE)}")


if __name__ == "__main__":
    main()
