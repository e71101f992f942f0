"""Model step benchmark: EchoAI against transformers' VideoMAE at the same geometry and width.

What is timed, side by side in one process, the two models alternating step by step (A B A B ...) after a
warm-up, medians reported:

* one pretraining step: forward + norm-pix loss + backward + AdamW step + `zero_grad(set_to_none=True)` of
  `EchoAIForPreTraining` and `VideoMAEForPreTraining`, with one (B, L) tube mask drawn by
  `modeling_echoai.make_mask` and given to both (VideoMAE needs an explicit `bool_masked_pos`);
* inference: clips/s of `EchoAIForVideoClassification` and `VideoMAEForVideoClassification` (`num_labels=1`,
  eval mode, `torch.no_grad()`), on the full unmasked clip;

each in fp32 and in bf16 autocast (`torch.autocast("cpu", dtype=torch.bfloat16)` around forward + loss;
backward outside it; fp32 master weights and optimizer state). Both models use SDPA attention.

The peak resident memory of each model's pretraining step is read in a fresh subprocess per model and
precision (`VmHWM` of /proc/self/status, i.e. the process's peak RSS including torch itself; the table also
gives the growth over the RSS just before the first step).

FLOPs are counted analytically (`pretrain_flops`, `inference_flops`), identically for both models since
they have the same layer shapes:
  * every linear layer: 2 * tokens * fan_in * fan_out for the forward; the forward + backward of a training
    step is 3x that (input gradient + weight gradient), except the tubelet embedding, whose input
    (`pixel_values`) needs no gradient, so 2x;
  * the Conv3d tubelet embedding counts as a linear over the patches: fan_in = P = t * p * p * C, fan_out = D,
    tokens = B * L (the embedding runs on every token; the mask is applied after it);
  * attention: 2 * 2 * B * heads * L_seq^2 * head_dim for Q Kᵀ and for A V (3x that in training);
  * the encoder runs on the V visible tokens per clip, the decoder on all L tokens, the pixel head on the
    M masked ones;
  * LayerNorm, softmax, GELU, residual adds, the loss and the AdamW update are ignored (elementwise work,
    a few % of the total and no matmul).
GFLOP/s = those FLOPs / the median step time; MFU = GFLOP/s / the matmul peak measured in the same run
(median of repeated 2048 x 2048 x 2048 products in fp32 and in bf16, at the start and at the end; the
higher kept).

    python bench/bench_pretrain.py              # the full run (6.5 minutes on the shared 2-core machine)
    python bench/bench_pretrain.py --quick      # a smoke run (about a minute)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import VideoMAEConfig, VideoMAEForPreTraining, VideoMAEForVideoClassification


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, machine_info, markdown_table, matmul_peak_gflops, proc_status_mib  # noqa: E402

from configuration_echoai import EchoAIConfig  # noqa: E402
from modeling_echoai import EchoAIForPreTraining, EchoAIForVideoClassification, make_mask  # noqa: E402


MODELS = ("EchoAI", "VideoMAE")
PRECISIONS = ("fp32", "bf16")


# --------------------------------------------------------------------------------------------------
# Configs: VideoMAE is built from EchoAI's preset, so both models have the same geometry and widths
# --------------------------------------------------------------------------------------------------


def echoai_config(preset: str, **overrides) -> EchoAIConfig:
    return EchoAIConfig.from_preset(preset, attn_implementation="sdpa", **overrides)


def videomae_config(config: EchoAIConfig, **overrides) -> VideoMAEConfig:
    return VideoMAEConfig(
        image_size=config.image_size,
        patch_size=config.patch_size,
        num_channels=config.num_channels,
        num_frames=config.num_frames,
        tubelet_size=config.tubelet_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        hidden_act=config.hidden_act,
        layer_norm_eps=config.layer_norm_eps,
        decoder_hidden_size=config.decoder_hidden_size,
        decoder_num_hidden_layers=config.decoder_num_hidden_layers,
        decoder_num_attention_heads=config.decoder_num_attention_heads,
        decoder_intermediate_size=config.decoder_intermediate_size,
        norm_pix_loss=config.norm_pix_loss,
        use_mean_pooling=config.use_mean_pooling,
        attn_implementation="sdpa",
        **overrides,
    )


def check_small_preset() -> None:
    """The `small` preset is the benchmark's stated geometry: ViT-S encoder, VideoMAE-S decoder, 90 % tube mask."""
    config = EchoAIConfig.from_preset("small")
    expected = dict(
        image_size=112, patch_size=16, num_channels=3, num_frames=16, tubelet_size=2,
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
        decoder_hidden_size=192, decoder_num_hidden_layers=4, decoder_num_attention_heads=3,
        decoder_intermediate_size=768, mask_ratio=0.9, mask_strategy="tube", norm_pix_loss=True,
    )  # fmt: skip
    wrong = {k: (getattr(config, k), v) for k, v in expected.items() if getattr(config, k) != v}
    if wrong:
        raise SystemExit(f"EchoAIConfig 'small' preset no longer matches the benchmark geometry: {wrong}")


# --------------------------------------------------------------------------------------------------
# Analytic FLOPs (see the module docstring for what is counted)
# --------------------------------------------------------------------------------------------------


def linear_flops(tokens: int, fan_in: int, fan_out: int) -> int:
    return 2 * tokens * fan_in * fan_out


def attention_flops(batch: int, heads: int, seq: int, head_dim: int) -> int:
    return 2 * 2 * batch * heads * seq**2 * head_dim  # Q Kᵀ and A V


def layer_flops(batch: int, seq: int, width: int, heads: int, mlp: int) -> int:
    """Forward FLOPs of one pre-norm transformer block on (batch, seq, width) tokens."""
    tokens = batch * seq
    return (
        linear_flops(tokens, width, 3 * width)  # Q, K, V
        + attention_flops(batch, heads, seq, width // heads)
        + linear_flops(tokens, width, width)  # output projection
        + linear_flops(tokens, width, mlp)
        + linear_flops(tokens, mlp, width)
    )


def pretrain_flops(config: EchoAIConfig, batch: int, num_visible: int, num_masked: int) -> dict[str, int]:
    """Forward + backward FLOPs of one masked-autoencoder step, by stage."""
    c = config
    tokens = num_visible + num_masked  # L
    pixels = c.tubelet_size * c.patch_size**2 * c.num_channels  # P
    encoder = c.num_hidden_layers * layer_flops(
        batch, num_visible, c.hidden_size, c.num_attention_heads, c.intermediate_size
    )
    decoder = c.decoder_num_hidden_layers * layer_flops(
        batch, tokens, c.decoder_hidden_size, c.decoder_num_attention_heads, c.decoder_intermediate_size
    )
    return {
        "tubelet embedding": 2 * linear_flops(batch * tokens, pixels, c.hidden_size),  # no input gradient
        "encoder (V tokens)": 3 * encoder,
        "encoder_to_decoder": 3 * linear_flops(batch * num_visible, c.hidden_size, c.decoder_hidden_size),
        "decoder (L tokens)": 3 * decoder,
        "pixel head (M tokens)": 3 * linear_flops(batch * num_masked, c.decoder_hidden_size, pixels),
    }


def inference_flops(config: EchoAIConfig, batch: int) -> int:
    """Forward FLOPs of the video classifier on full clips (every one of the L tokens encoded)."""
    c = config
    pixels = c.tubelet_size * c.patch_size**2 * c.num_channels
    tokens = c.num_patches
    return (
        linear_flops(batch * tokens, pixels, c.hidden_size)
        + c.num_hidden_layers * layer_flops(batch, tokens, c.hidden_size, c.num_attention_heads, c.intermediate_size)
        + linear_flops(batch, c.hidden_size, 1)
    )


# --------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------


def precision_context(precision: str):
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_pretraining(name: str, config: EchoAIConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    model = EchoAIForPreTraining(config) if name == "EchoAI" else VideoMAEForPreTraining(videomae_config(config))
    return model.train()


def build_classifier(name: str, config: EchoAIConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "EchoAI":
        config = copy.deepcopy(config)
        config.num_labels = 1
        model = EchoAIForVideoClassification(config)
    else:
        model = VideoMAEForVideoClassification(videomae_config(config, num_labels=1))
    return model.eval()


def pretraining_step(model: torch.nn.Module, pixel_values: torch.Tensor, mask: torch.Tensor, precision: str):
    """A closure running one full optimisation step; AdamW keeps fp32 master weights in both precisions."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.5e-4, weight_decay=0.05)

    def step() -> None:
        with precision_context(precision):
            loss = model(pixel_values=pixel_values, bool_masked_pos=mask).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def inference_step(model: torch.nn.Module, pixel_values: torch.Tensor, precision: str):
    def step() -> None:
        with torch.no_grad(), precision_context(precision):
            model(pixel_values=pixel_values)

    return step


def inputs(config: EchoAIConfig, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random clips and one tube mask, shared by both models."""
    generator = torch.Generator().manual_seed(0)
    shape = (batch, config.num_frames, config.num_channels, config.image_size, config.image_size)
    pixel_values = torch.randn(shape, generator=generator)  # (B, T, C, H, W)
    grid = (config.num_frames // config.tubelet_size,) + (config.image_size // config.patch_size,) * 2
    mask = make_mask(batch, grid, config.mask_ratio, config.mask_strategy, generator=generator)  # (B, L)
    return pixel_values, mask


# --------------------------------------------------------------------------------------------------
# Peak memory: one fresh process per model and precision
# --------------------------------------------------------------------------------------------------


def rss_child(name: str, precision: str, config: EchoAIConfig, batch: int, steps: int) -> None:
    """Run in a subprocess: build, record RSS, run `steps` training steps, print peak RSS as JSON."""
    model = build_pretraining(name, config)
    pixel_values, mask = inputs(config, batch)
    step = pretraining_step(model, pixel_values, mask, precision)
    before = proc_status_mib("VmRSS")
    for _ in range(steps):  # the first step also allocates AdamW's moments
        step()
    print(json.dumps({"peak_mib": proc_status_mib("VmHWM"), "before_mib": before}))


def measure_rss(args, name: str, precision: str, steps: int) -> dict[str, float]:
    command = [
        sys.executable, __file__, "--rss_child", name, precision,
        "--preset", args.preset, "--batch_size", str(args.batch_size), "--steps", str(steps),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=4, method="inclusive")[int(q * 4) - 1] if len(values) > 1 else values[0]


def speedup(echoai: list[float], videomae: list[float]) -> tuple[float, float, float]:
    """EchoAI's speed-up over VideoMAE (> 1 = EchoAI faster): median and quartiles of the per-round ratios
    t_VideoMAE / t_EchoAI. Pairing the two steps of one round cancels load that other jobs put on the
    machine for a while."""
    ratios = [v / e for e, v in zip(echoai, videomae, strict=True)]
    return statistics.median(ratios), quantile(ratios, 0.25), quantile(ratios, 0.75)


# Other jobs on the shared machine only ever add time, so the fastest step of each model is a second, less
# load-sensitive estimate next to the median.


def verdict(low: float, high: float) -> str:
    if low > 1:
        return "EchoAI faster"
    if high < 1:
        return "EchoAI SLOWER"
    return "tie (within noise)"


def report_rows(times, flops_per_step, clips_per_step, peaks, rss=None):
    """Rows of a results table: per precision, VideoMAE (reference) then EchoAI (with its speed-up)."""
    rows, verdicts = [], {}
    for precision in PRECISIONS:
        ratio, low, high = speedup(times[precision]["EchoAI"], times[precision]["VideoMAE"])
        verdicts[precision] = verdict(low, high)
        for name in ("VideoMAE", "EchoAI"):
            seconds = statistics.median(times[precision][name])
            gflops = flops_per_step / seconds / 1e9
            best = min(times[precision][name])
            best_ratio = min(times[precision]["VideoMAE"]) / min(times[precision]["EchoAI"])
            row = [
                name,
                precision,
                f"{seconds * 1e3:.0f}",
                f"{best * 1e3:.0f}",
                f"{clips_per_step / seconds:.2f}",
                "1 (ref)" if name == "VideoMAE" else f"{ratio:.3f} [{low:.3f}–{high:.3f}]",
                "1 (ref)" if name == "VideoMAE" else f"{best_ratio:.3f}",
                f"{gflops:.1f}",
                f"{100 * gflops / peaks[precision]:.0f} %",
            ]
            if rss is not None:
                r = rss[precision][name]
                row.append(f"{r['peak_mib']:.0f} (+{r['peak_mib'] - r['before_mib']:.0f})")
            rows.append(row)
    return rows, verdicts


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", help="EchoAIConfig preset; VideoMAE gets the same widths.")
    parser.add_argument("--batch_size", type=int, default=None, help="Clips per pretraining step (default 8).")
    parser.add_argument("--eval_batch_size", type=int, default=None, help="Clips per inference batch (default 16).")
    parser.add_argument("--steps", type=int, default=None, help="Measured pretraining steps per model (default 16).")
    parser.add_argument("--warmup", type=int, default=None, help="Warm-up steps per model (default 3).")
    parser.add_argument("--quick", action="store_true", help="Smoke run: batch 2, 1 warm-up, 2 measured steps.")
    parser.add_argument("--rss_child", nargs=2, metavar=("MODEL", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    defaults = (
        dict(batch_size=2, eval_batch_size=2, steps=2, warmup=1)
        if args.quick
        else dict(batch_size=8, eval_batch_size=16, steps=16, warmup=3)
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    config = echoai_config(args.preset)
    if args.rss_child:
        rss_child(*args.rss_child, config, args.batch_size, args.steps)
        return

    started = time.perf_counter()
    if args.preset == "small":
        check_small_preset()
    info = machine_info()
    print(" | ".join(f"{k}: {v}" for k, v in info.items()))
    print("command: python " + " ".join(sys.argv))

    # Attainable matmul peak, the MFU denominator: measured now and again at the end, the better one kept,
    # so a burst of load from other jobs during one measurement does not inflate every MFU.
    repeats = 3 if args.quick else 10
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peaks = {p: matmul_peak_gflops(dtypes[p], repeats=repeats) for p in PRECISIONS}
    print(f"matmul peak 2048³ (start): fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")

    # Pretraining step.
    pixel_values, mask = inputs(config, args.batch_size)
    num_masked = int(mask[0].sum())
    num_visible = mask.shape[1] - num_masked
    flops = pretrain_flops(config, args.batch_size, num_visible, num_masked)
    total = sum(flops.values())
    print(
        f"\npretraining: batch {args.batch_size}, L={mask.shape[1]} tokens, V={num_visible} visible, "
        f"M={num_masked} masked; {total / 1e9:.1f} GFLOP per step ("
        + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in flops.items())
        + ")"
    )
    models = {name: build_pretraining(name, config) for name in MODELS}
    train_times = {}
    for precision in PRECISIONS:
        steps = {name: pretraining_step(models[name], pixel_values, mask, precision) for name in MODELS}
        train_times[precision] = alternate(steps, args.warmup, args.steps)
        print(f"  {precision} done ({time.perf_counter() - started:.0f} s)", flush=True)
    del models, steps

    # Inference on full clips.
    eval_pixels, _ = inputs(config, args.eval_batch_size)
    eval_flops = inference_flops(config, args.eval_batch_size)
    print(f"\ninference: batch {args.eval_batch_size}, {eval_flops / 1e9:.1f} GFLOP per batch")
    classifiers = {name: build_classifier(name, config) for name in MODELS}
    eval_steps_count = max(2, args.steps // 2)
    eval_times = {}
    for precision in PRECISIONS:
        steps = {name: inference_step(classifiers[name], eval_pixels, precision) for name in MODELS}
        eval_times[precision] = alternate(steps, max(1, args.warmup - 1), eval_steps_count)
        print(f"  {precision} done ({time.perf_counter() - started:.0f} s)", flush=True)
    del classifiers, steps

    # Peak RSS of each model's step, each in a fresh process (alternating the models here too).
    rss = {p: {name: measure_rss(args, name, p, 1 if args.quick else 2) for name in MODELS} for p in PRECISIONS}

    end_peaks = {p: matmul_peak_gflops(dtypes[p], repeats=repeats) for p in PRECISIONS}
    print(f"matmul peak 2048³ (end): fp32 {end_peaks['fp32']:.0f} GFLOP/s, bf16 {end_peaks['bf16']:.0f} GFLOP/s")
    peaks = {p: max(peaks[p], end_peaks[p]) for p in PRECISIONS}

    train_rows, train_verdicts = report_rows(train_times, total, args.batch_size, peaks, rss)
    eval_rows, eval_verdicts = report_rows(eval_times, eval_flops, args.eval_batch_size, peaks)
    headers = [
        "model", "precision", "median ms", "best ms", "clips/s", "EchoAI speed-up [IQR]", "speed-up of best",
        "GFLOP/s", "MFU",
    ]  # fmt: skip
    print(
        f"\nPretraining step (fwd + bwd + AdamW), batch {args.batch_size}, {args.warmup} warm-up + "
        f"{args.steps} measured steps each, alternating:"
    )
    print(markdown_table(headers + ["peak RSS MiB (+step)"], train_rows))
    print(
        f"\nInference (no_grad, eval), batch {args.eval_batch_size}, {max(1, args.warmup - 1)} warm-up + "
        f"{eval_steps_count} measured batches each, alternating:"
    )
    print(markdown_table(headers, eval_rows))
    print(
        "\nEchoAI no slower than VideoMAE at equal precision: "
        + "; ".join(f"pretrain {p}: {v}" for p, v in train_verdicts.items())
        + "; "
        + "; ".join(f"inference {p}: {v}" for p, v in eval_verdicts.items())
    )
    print(f"wall time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
