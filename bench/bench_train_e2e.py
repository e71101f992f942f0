"""End-to-end pretraining throughput against the model step alone: how much does the pipeline cost?

Two contenders, alternated in one process, per precision (fp32, bf16):

* end to end: the real `scripts/pretrain.py` `main()` -- EchoNet-layout synthetic corpus, `TrainingClips`
  (PyAV partial decoding, random clip, augmentation), the DataLoader (`--num_workers`), `accelerate`, the shared
  `training_echoai.train` loop (flags all-reduce, clipping, scheduler, logging) -- on the `small` preset. Step
  times are the intervals between consecutive optimizer steps, stamped by the script's own per-step hook
  (`on_step`, through the `save_reconstruction` name it calls, replaced by a timestamp), after a warm-up;
* model only: `EchoAIForPreTraining` small on a synthetic (B, T, C, H, W) tensor already in memory, with the
  same step: tube mask, forward (bf16 autocast when bf16), backward, gradient clipping, fused AdamW (as the
  script), zero_grad.

Rounds alternate the contenders (end to end, model only; then model only, end to end; ...). Reported: median
step times, videos/s, and the pipeline overhead 1 - (e2e videos/s) / (model-only videos/s). Goal: < 20 %.

    python bench/bench_train_e2e.py            # about 75 s on the 2-core machine when quiet
    python bench/bench_train_e2e.py --quick    # a smoke run (tiny steps counts)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from common import machine_info, markdown_table, precision_context  # noqa: E402

from configuration_echoai import EchoAIConfig  # noqa: E402
from data_echoai import synthetic_echonet_dir  # noqa: E402
from modeling_echoai import EchoAIForPreTraining  # noqa: E402
from perf_echoai import keep_freed_memory, use_fastest_attention  # noqa: E402


def load_pretrain():
    spec = importlib.util.spec_from_file_location("echoai_pretrain_script", REPO / "scripts" / "pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def end_to_end_step_times(
    corpus: Path, precision: str, steps: int, warmup: int, args, extra_argv: Sequence[str] = ()
) -> list[float]:
    """Seconds between consecutive optimizer steps of a real `scripts/pretrain.py` run, after `warmup` steps
    (`extra_argv`: more pretrain.py flags)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # a new mixed-precision setting per run
    pretrain = load_pretrain()
    stamps: list[float] = []
    pretrain.save_reconstruction = lambda *a, **k: stamps.append(time.perf_counter())  # the per-step hook
    with tempfile.TemporaryDirectory() as output_dir:
        pretrain.main([
            "--data_dir", str(corpus), "--output_dir", output_dir, "--config_name", args.preset,
            "--per_device_train_batch_size", str(args.batch_size), "--num_workers", str(args.num_workers),
            "--mixed_precision", "bf16" if precision == "bf16" else "no", "--max_train_steps", str(warmup + steps + 1),
            "--reconstruction_steps", "1", "--logging_steps", "1000", "--seed", str(args.seed), *extra_argv,
        ])  # fmt: skip
    return [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1 :], strict=False)]


def model_only_step_times(precision: str, steps: int, warmup: int, args) -> list[float]:
    """The same optimizer step on a synthetic in-memory batch: forward, backward, clip, AdamW, zero_grad."""
    torch.manual_seed(args.seed)
    model = EchoAIForPreTraining(EchoAIConfig.from_preset(args.preset)).train()
    use_fastest_attention(model, "cpu", precision, training=True)  # as scripts/pretrain.py does
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)
    config = model.config
    pixel_values = torch.randn(
        args.batch_size, config.num_frames, config.num_channels, config.image_size, config.image_size
    )
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        mask = model.make_mask(pixel_values, generator=torch.Generator().manual_seed(step))
        with precision_context(precision):
            loss = model(pixel_values=pixel_values, bool_masked_pos=mask).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times[warmup:]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--num_videos", type=int, default=128, help="Synthetic corpus size (EchoNet layout).")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader workers (default 0, as the scripts).")
    parser.add_argument("--rounds", type=int, default=2, help="Alternating rounds per precision.")
    parser.add_argument("--steps_fp32", type=int, default=6, help="Measured steps per contender and round, fp32.")
    parser.add_argument("--steps_bf16", type=int, default=16, help="Measured steps per contender and round, bf16.")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="A smoke run: 1 round, 2 measured steps, 1 warm-up.")
    args = parser.parse_args(argv)
    keep_freed_memory()  # as the scripts do, for both contenders from the start
    if args.quick:
        args.rounds, args.steps_fp32, args.steps_bf16, args.warmup = 1, 2, 2, 1

    started = time.perf_counter()
    load = os.getloadavg()
    corpus = synthetic_echonet_dir(args.num_videos)
    rows, results = [], {}
    for precision in ("fp32", "bf16"):
        steps = args.steps_fp32 if precision == "fp32" else args.steps_bf16
        times: dict[str, list[float]] = {"end to end": [], "model only": []}
        for round_index in range(args.rounds):
            order = ["end to end", "model only"][:: 1 if round_index % 2 == 0 else -1]
            for name in order:
                measure = end_to_end_step_times if name == "end to end" else model_only_step_times
                extra = (corpus,) if name == "end to end" else ()
                times[name] += measure(*extra, precision, steps, args.warmup, args)
                print(
                    f"{precision} round {round_index} {name}: median {statistics.median(times[name]):.3f} s",
                    flush=True,
                )
        e2e, model = statistics.median(times["end to end"]), statistics.median(times["model only"])
        overhead = 1 - model / e2e  # 1 - (e2e videos/s) / (model-only videos/s)
        results[precision] = overhead
        rows.append([
            precision, f"{model * 1000:.0f}", f"{args.batch_size / model:.2f}", f"{e2e * 1000:.0f}",
            f"{args.batch_size / e2e:.2f}", f"{100 * overhead:.1f} %", str(len(times["end to end"])),
        ])  # fmt: skip
    print()
    print({**machine_info(), "load average at start": " ".join(f"{x:.2f}" for x in load),
           "load average at end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
           "wall s": f"{time.perf_counter() - started:.0f}", "videos": str(args.num_videos),
           "batch": str(args.batch_size), "workers": str(args.num_workers)})  # fmt: skip
    print()
    print(markdown_table(
        ["precision", "model-only ms/step", "model-only videos/s", "end-to-end ms/step", "end-to-end videos/s",
         "pipeline overhead", "e2e steps measured"], rows,
    ))  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
