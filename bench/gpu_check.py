"""The GPU check: what EchoAI does on one data-centre GPU, in one table, in a few minutes.

    bash bench/gpu_check.sh                # on a GPU machine: the `base` preset, bf16 (at most ~8 minutes)
    bash bench/gpu_check.sh --dry_run      # anywhere, CPU included: tiny shapes, a few seconds (CI runs it)

Rows (each measured in this run, on this device):

1. bf16 matmul peak: the median of repeated 4096³ products (2048³ on CPU); every MFU below is against it.
2. Pretraining step, `base` preset, bf16 autocast, batch 32, 90 % tube mask, forward + loss + backward + fused
   AdamW: EchoAI with SDPA (flash on a GPU) against transformers' VideoMAE with SDPA and with eager attention, the
   faster VideoMAE taken; alternating step by step, medians; model FLOPs counted as `bench_pretrain.py` counts
   them; peak GPU memory of each (`torch.cuda.max_memory_allocated`).
3. The largest EchoAI pretraining batch that fits: doubled from 32 until out of memory (capped at 1024).
4. End-to-end pretraining: `scripts/pretrain.py` on a synthetic EchoNet-layout corpus with `--num_workers 8`
   (real decoding, augmentation, masking, accelerate) against the model-only step at the same batch: whether the
   video pipeline keeps up with the GPU.
5. `predict_videos` (what `scripts/evaluate.py` runs) with the all-clips protocol, bf16, on the synthetic
   videos: videos/s, decoding included.

Nothing here is tuned for one GPU: the numbers are what the scripts' defaults give, so a slow row is a finding.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import VideoMAEForPreTraining


sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pretrain import inputs, pretrain_flops, pretraining_step, videomae_config  # noqa: E402
from bench_train_e2e import end_to_end_step_times  # noqa: E402
from common import markdown_table  # noqa: E402

from configuration_echoai import EchoAIConfig  # noqa: E402
from inference_echoai import predict_videos  # noqa: E402
from modeling_echoai import EchoAIForPreTraining, EchoAIForVideoClassification  # noqa: E402
from perf_echoai import use_fastest_attention  # noqa: E402
from synthetic_echonet import make_synthetic_echonet  # noqa: E402
from video_processing_echoai import EchoAIVideoProcessor  # noqa: E402


FULL = dict(preset="base", batch=32, steps=10, warmup=3, matmul=4096, max_batch=1024, videos=64, e2e_steps=20)
DRY = dict(preset="tiny", batch=2, steps=2, warmup=1, matmul=256, max_batch=4, videos=4, e2e_steps=2)
TINY_SHAPES = dict(image_size=32, patch_size=8, num_frames=4)  # --dry_run: seconds on a CPU


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


def matmul_peak(device: torch.device, size: int, repeats: int = 10) -> float:
    """GFLOP/s of a bf16 (size x size) @ (size x size) product on `device`, median of `repeats`."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    timed(lambda: a @ b, device)  # warm-up: the library picks its kernel on the first call
    return 2 * size**3 / statistics.median(timed(lambda: a @ b, device) for _ in range(repeats)) / 1e9


def training_step(model, pixel_values, mask, device: torch.device):
    """`bench_pretrain.pretraining_step` in bf16 autocast on `device`."""
    return pretraining_step(model, pixel_values, mask, "bf16", device.type)


def batch_inputs(config: EchoAIConfig, batch: int, device: torch.device):
    """`bench_pretrain.inputs` (random clips and one tube mask) on `device`."""
    pixel_values, mask = inputs(config, batch)
    return pixel_values.to(device), mask.to(device)


def pretraining_model(name: str, config: EchoAIConfig, device: torch.device) -> torch.nn.Module:
    """EchoAI with the attention the scripts choose on `device` in bf16 (SDPA, flash on a GPU), or VideoMAE with
    the named attention."""
    torch.manual_seed(0)
    if name.startswith("EchoAI"):
        model = EchoAIForPreTraining(config).train()
        use_fastest_attention(model, device, "bf16", training=True)
        return model.to(device)
    attention = name.split("(")[1].rstrip(")")
    return VideoMAEForPreTraining(videomae_config(config, attention)).train().to(device)


def pretraining_rows(config: EchoAIConfig, plan: dict, device: torch.device, peak: float) -> list[list[str]]:
    """Row 2: EchoAI against the faster of VideoMAE's two attentions, alternating, with MFU and peak memory."""
    pixel_values, mask = batch_inputs(config, plan["batch"], device)
    visible = int((~mask[0]).sum())
    flops = sum(pretrain_flops(config, plan["batch"], visible, mask.shape[1] - visible).values())
    times, memory = {}, {}
    for name in ("EchoAI", "VideoMAE (sdpa)", "VideoMAE (eager)"):
        model = pretraining_model(name, config, device)
        step = training_step(model, pixel_values, mask, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times[name] = [timed(step, device) for _ in range(plan["warmup"] + plan["steps"])][plan["warmup"] :]
        on_gpu = device.type == "cuda"
        memory[name] = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if on_gpu else "n/a (CPU)"
        del model, step
    fastest_videomae = min((n for n in times if n.startswith("VideoMAE")), key=lambda n: statistics.median(times[n]))
    rows = []
    for name in ("EchoAI", fastest_videomae):
        seconds = statistics.median(times[name])
        ratio = statistics.median(times[fastest_videomae]) / seconds
        rows.append([f"pretraining step: {name}", f"{seconds * 1e3:.1f} ms", f"{plan['batch'] / seconds:.1f} clips/s",
                     f"{ratio:.2f}x", f"{flops / seconds / 1e9 / peak:.0%}", memory[name]])  # fmt: skip
    return rows


def largest_batch(config: EchoAIConfig, plan: dict, device: torch.device) -> int:
    """Row 3: the largest power-of-two EchoAI pretraining batch (from plan["batch"]) whose step fits."""
    model = pretraining_model("EchoAI", config, device)
    fits, batch = 0, plan["batch"]
    while batch <= plan["max_batch"]:
        try:
            pixel_values, mask = batch_inputs(config, batch, device)
            training_step(model, pixel_values, mask, device)()
            synchronize(device)
            fits, batch = batch, batch * 2
        except torch.OutOfMemoryError:
            break
        finally:
            pixel_values = mask = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return fits


def end_to_end_rows(config: EchoAIConfig, plan: dict, device: torch.device, corpus: Path, args) -> list[list[str]]:
    """Row 4: `scripts/pretrain.py` with `--num_workers` against the model-only step, same batch and shapes."""
    options = argparse.Namespace(preset=plan["preset"], batch_size=plan["batch"], num_workers=args.num_workers, seed=0)
    overrides = ",".join(f"{k}={v}" for k, v in TINY_SHAPES.items()) if args.dry_run else ""
    extra = ["--config_overrides", overrides] if overrides else []
    end_to_end = end_to_end_step_times(corpus, "bf16", plan["e2e_steps"], plan["warmup"], options, extra)
    model = pretraining_model("EchoAI", config, device)
    pixel_values, mask = batch_inputs(config, plan["batch"], device)
    step = training_step(model, pixel_values, mask, device)
    model_only = [timed(step, device) for _ in range(plan["warmup"] + plan["e2e_steps"])][plan["warmup"] :]
    e2e, alone = statistics.median(end_to_end), statistics.median(model_only)
    return [
        [f"pretrain.py end to end, --num_workers {args.num_workers}", f"{e2e * 1e3:.1f} ms",
         f"{plan['batch'] / e2e:.1f} clips/s", f"{alone / e2e:.2f}x of model-only", "", ""],
        ["model-only step, same batch", f"{alone * 1e3:.1f} ms", f"{plan['batch'] / alone:.1f} clips/s", "", "", ""],
    ]  # fmt: skip


def inference_row(config: EchoAIConfig, device: torch.device, corpus: Path) -> list[str]:
    """Row 5: `predict_videos` (scripts/evaluate.py's predictor), all clips, bf16, decoding included."""
    torch.manual_seed(0)
    config = copy.deepcopy(config)
    config.num_labels = 1
    model = EchoAIForVideoClassification(config).eval().to(device)
    use_fastest_attention(model, device, "bf16", training=False)
    processor = EchoAIVideoProcessor(num_frames=config.num_frames, image_size=config.image_size)
    videos = sorted((corpus / "Videos").glob("*.avi"))
    predict_videos(model, processor, videos[:1], bf16=True, progress=False)  # warm-up
    start = time.perf_counter()
    results = predict_videos(model, processor, videos, bf16=True, progress=False)
    seconds = time.perf_counter() - start
    clips = sum(r.num_clips for r in results)
    return ["evaluate (all clips, bf16, decoding included)", f"{seconds:.1f} s for {len(videos)} videos",
            f"{len(videos) / seconds:.2f} videos/s ({clips / seconds:.0f} clips/s)", "", "", ""]  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry_run", action="store_true", help="Tiny shapes on whatever device there is: seconds.")
    parser.add_argument("--num_workers", type=int, default=8, help="DataLoader workers of the end-to-end row.")
    parser.add_argument("--data_dir", default=None, help="An EchoNet-layout folder to read (default: synthesised).")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.dry_run:
        print("error: no CUDA device; bench/gpu_check.sh is for a GPU machine (--dry_run runs it anywhere)")
        return 2
    plan = DRY if args.dry_run else FULL
    if args.dry_run:
        args.num_workers = min(args.num_workers, 1)
    config = EchoAIConfig.from_preset(plan["preset"], **(TINY_SHAPES if args.dry_run else {}))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}; preset {plan['preset']}, batch {plan['batch']}, bf16")
    peak = matmul_peak(device, plan["matmul"])
    rows = [[f"bf16 matmul peak ({plan['matmul']}³)", "", f"{peak:.0f} GFLOP/s", "", "100%", ""]]
    rows += pretraining_rows(config, plan, device, peak)
    rows.append(["largest EchoAI batch that fits", "", f"{largest_batch(config, plan, device)} clips", "", "", ""])
    with tempfile.TemporaryDirectory() as scratch:
        corpus = Path(args.data_dir) if args.data_dir else make_synthetic_echonet(Path(scratch) / "echonet",
                                                                                   num_videos=plan["videos"], seed=0)  # fmt: skip
        rows += end_to_end_rows(config, plan, device, corpus, args)
        rows.append(inference_row(config, device, corpus))
    print(markdown_table(["what", "time", "throughput", "vs VideoMAE / model-only", "MFU", "peak memory"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
