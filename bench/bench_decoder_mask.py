"""Decoder masking benchmark: the pretraining step of `EchoAIForPreTraining` with the full decoder
(`decoder_mask_ratio=0.0`) against VideoMAE V2's dual masking (`decoder_mask_ratio=0.5`), in fp32 and in bf16
autocast, in one process.

The step is `bench_pretrain.py`'s (`pretraining_step`: forward + norm-pix loss + backward + fused AdamW +
`zero_grad`) on its inputs (random clips, one 90 % tube mask, batch 8) and its models (`build_pretraining`: the
same seeded weights whatever the ratio, the attention kernel the scripts pick). The models are in training mode,
so with a ratio each step draws its own decoder mask, as `scripts/pretrain.py` does. All contenders alternate
step by step (`common.alternate`); the table gives medians and the median of the per-round ratios against the
full decoder at the same precision, beside the model-FLOP ratio (`bench_pretrain.pretrain_flops` with the decoder
on V + K tokens and the pixel head on K): the speed-up the FLOPs alone would give.

This measures time per step only. Whether the cheaper step pays is a question of held-out reconstruction loss at
equal wall-clock time and of EF after fine-tuning (docs/BENCHMARKS.md, "Decoder masking").

    python bench/bench_decoder_mask.py           # 3 warm-up + 12 measured rounds
    python bench/bench_decoder_mask.py --quick   # a smoke run: batch 2, 1 warm-up, 2 rounds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pretrain import (  # noqa: E402
    PRECISIONS,
    build_pretraining,
    echoai_config,
    inputs,
    pretrain_flops,
    pretraining_step,
    speedup,
)
from common import alternate, fill_unset, machine_info, markdown_table  # noqa: E402

from perf_echoai import keep_freed_memory  # noqa: E402


RATIOS = (0.0, 0.5)  # the full decoder, and VideoMAE V2's decoder mask ratio


def report_rows(times: dict[tuple[str, float], list[float]], flops: dict[float, int], batch: int) -> list[list[str]]:
    rows = []
    for (precision, ratio), values in times.items():
        full = times[(precision, 0.0)]
        ratio_text = "1 (ref)" if ratio == 0.0 else "{:.2f} [{:.2f}–{:.2f}]".format(*speedup(values, full))
        seconds = statistics.median(values)
        rows.append([
            precision, f"{ratio:g}", f"{seconds * 1e3:.0f}", f"{min(values) * 1e3:.0f}", f"{batch / seconds:.2f}",
            ratio_text, f"{flops[0.0] / flops[ratio]:.2f}",
        ])  # fmt: skip
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", help="EchoAIConfig preset (default small).")
    parser.add_argument("--batch_size", type=int, default=None, help="Clips per pretraining step (default 8).")
    parser.add_argument("--steps", type=int, default=None, help="Measured rounds (default 12).")
    parser.add_argument("--warmup", type=int, default=None, help="Warm-up steps per contender (default 3).")
    parser.add_argument("--quick", action="store_true", help="Smoke run: batch 2, 1 warm-up, 2 rounds.")
    args = parser.parse_args(argv)
    fill_unset(args, quick=dict(batch_size=2, steps=2, warmup=1), full=dict(batch_size=8, steps=12, warmup=3))
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    keep_freed_memory()  # as the scripts and bench_pretrain.py run
    started = time.perf_counter()
    print(" | ".join(f"{k}: {v}" for k, v in machine_info().items()))
    print("command: python " + " ".join(sys.argv))

    configs = {ratio: echoai_config(args.preset, decoder_mask_ratio=ratio) for ratio in RATIOS}
    pixel_values, mask = inputs(configs[0.0], args.batch_size)
    num_masked = int(mask[0].sum())
    num_visible = mask.shape[1] - num_masked
    kept = {ratio: num_masked - int(ratio * num_masked) for ratio in RATIOS}  # K hidden tubelets decoded
    flops = {
        ratio: sum(pretrain_flops(configs[ratio], args.batch_size, num_visible, kept[ratio]).values())
        for ratio in RATIOS
    }
    print(
        f"batch {args.batch_size}, L={mask.shape[1]} tokens, V={num_visible} visible, M={num_masked} hidden; "
        + "; ".join(
            f"ratio {r:g}: decoder on V + K = {num_visible + kept[r]}, {flops[r] / 1e9:.1f} GFLOP" for r in RATIOS
        )
    )

    steps = {}
    for precision in PRECISIONS:
        for ratio in RATIOS:
            model = build_pretraining("EchoAI", configs[ratio], precision)
            steps[(precision, ratio)] = pretraining_step(model, pixel_values, mask, precision)
    times = alternate(steps, args.warmup, args.steps)

    print(
        f"\nPretraining step (fwd + bwd + fused AdamW), `{args.preset}`, batch {args.batch_size}, {args.warmup} "
        f"warm-up + {args.steps} measured rounds, alternating:"
    )
    headers = [
        "precision", "decoder_mask_ratio", "median ms", "best ms", "clips/s",
        "speed-up vs full decoder [IQR]", "model-FLOP ratio",
    ]  # fmt: skip
    print(markdown_table(headers, report_rows(times, flops, args.batch_size)))
    print(f"wall time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
