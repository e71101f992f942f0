"""Write a synthetic echo corpus in EchoNet-Dynamic's layout (FileList.csv, VolumeTracings.csv, Videos/).

    python scripts/make_synthetic_echonet.py --output_dir data/synthetic --num_videos 200 --seed 0

The phantom and its conventions are documented in `synthetic_echonet.py`; scripts that get no
`--data_dir` use the same corpus through `data_echoai.synthetic_echonet_dir`.
"""

import argparse
import logging

from synthetic_echonet import make_synthetic_echonet


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True, help="Folder to write the corpus to.")
    parser.add_argument("--num_videos", type=int, default=200, help="Number of videos (FileList.csv rows).")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help=(
            "Corpus seed; the same seed gives the same files on CPUs with the same vector instructions "
            "(across CPUs the labels match and a few pixels differ; see synthetic_echonet.py)."
        ),
    )
    parser.add_argument("--num_workers", type=int, default=None, help="Rendering processes (default: all cores).")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path = make_synthetic_echonet(
        args.output_dir, num_videos=args.num_videos, seed=args.seed, num_workers=args.num_workers
    )
    logging.getLogger("make_synthetic_echonet").info("Wrote %d videos to %s", args.num_videos, path)


if __name__ == "__main__":
    main()
