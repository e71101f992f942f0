"""What a saliency map costs: `saliency_echoai.occlusion_saliency` on one clip of the `small` preset.

The map of one 16-frame 112² clip is one forward pass per left-out block of tubelets (49 at the default
grouping: 7 x 7 spatial blocks over the whole clip), each on the visible tokens only, batched
`--batch_size` at a time, plus the reference pass. It is timed against one plain forward pass of the same clip,
alternating the two, in fp32 and under bf16 autocast; the table gives medians, the number of passes and the
ratio -- what a user waits for a map, in units of what one EF estimate of that clip costs.

    python bench/bench_saliency.py            # about a minute on the 2-core machine
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, machine_info, markdown_table, precision_context  # noqa: E402

from configuration_echoai import EchoAIConfig  # noqa: E402
from modeling_echoai import EchoAIForVideoClassification  # noqa: E402
from saliency_echoai import occlusion_saliency  # noqa: E402


def measure(model, clip: torch.Tensor, precision: str, rounds: int, batch_size: int) -> list[str]:
    """One table row: the map against one plain forward pass of the same clip, alternating, medians."""
    passes = []

    def plain():
        with torch.no_grad(), precision_context(precision):
            model(pixel_values=clip)

    def saliency():
        with precision_context(precision):
            passes.append(occlusion_saliency(model, clip, batch_size=batch_size).num_forward_passes)

    times = alternate({"plain": plain, "saliency": saliency}, warmup=1, measured=rounds)
    plain_s, saliency_s = statistics.median(times["plain"]), statistics.median(times["saliency"])
    return [precision, str(passes[-1]), f"{plain_s:.3f}", f"{saliency_s:.2f}", f"{saliency_s / plain_s:.1f}x"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=16, help="Occluded variants per forward pass.")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    config = EchoAIConfig.from_preset(args.preset, num_labels=1, problem_type="regression")
    model = EchoAIForVideoClassification(config).eval()
    clip = torch.randn(1, config.num_frames, config.num_channels, config.image_size, config.image_size)
    rows = [measure(model, clip, precision, args.rounds, args.batch_size) for precision in ("fp32", "bf16")]
    print(" | ".join(f"{k}: {v}" for k, v in machine_info().items()))
    print(f"preset {args.preset}: {config.num_frames} x {config.image_size}², batch {args.batch_size}")
    print(markdown_table(["precision", "blocks left out", "one EF pass (s)", "saliency map (s)", "ratio"], rows))


if __name__ == "__main__":
    main()
