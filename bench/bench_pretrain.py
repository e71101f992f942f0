"""Model benchmark: EchoAI against transformers' VideoMAE at the same geometry and widths, in one process.

Contenders, each in fp32 and in bf16 autocast (`torch.autocast("cpu", dtype=torch.bfloat16)` around forward
+ loss, backward outside it, fp32 master weights and optimizer state):

* pretraining step: forward + norm-pix loss + backward + AdamW step + `zero_grad(set_to_none=True)` of
  `EchoAIForPreTraining` and `VideoMAEForPreTraining`, batch 8, one (B, L) 90 % tube mask drawn by
  `modeling_echoai.make_mask` and given to both (VideoMAE needs an explicit `bool_masked_pos`). Both use
  fused AdamW (`torch.optim.AdamW(fused=True)`): the default of transformers' `Trainer` and of EchoAI's
  scripts, so the optimizer is not a difference between the two;
* inference on a 200-frame video, EchoNet-Dynamic's all-clips protocol: every 16-frame clip at period 2 (170
  clips, `inference_echoai.protocol_clip_indices`) through `EchoAIForVideoClassification` and
  `VideoMAEForVideoClassification` (`num_labels=1`, eval, `torch.no_grad()`) in batches of 16, the EF the mean
  of the clip predictions; reported as videos/s. The frames are normalised once beforehand, as
  `scripts/evaluate.py` does (decoding is `bench_data.py`'s subject);
* with `--compile`, also both models' bf16 pretraining steps under `torch.compile` (inductor), and both models'
  bf16 inference compiled as `scripts/evaluate.py --torch_compile` does (`inference_echoai.compile_for_inference`:
  inductor with frozen weights); the compilation (the first steps, the first video) is timed separately and
  excluded from the step time.

The process runs with `perf_echoai.keep_freed_memory()`, as EchoAI's scripts do (glibc's malloc keeps
freed memory instead of faulting it in again every step); it speeds up both models. `--default_malloc` leaves
glibc's defaults, to measure what it is worth.

All contenders of a table run in one `alternate` call: step by step, A B C D, then D C B A, ..., after a
warm-up, so every ratio pairs steps taken moments apart; medians and interquartile ranges of those per-round
ratios are reported. VideoMAE runs with each of its CPU attention implementations (`--videomae_attention`,
default both SDPA and eager: on this CPU eager is the faster one in bf16), and EchoAI is compared with the
**fastest VideoMAE at each precision** (the lowest median of that table), so no ratio leans on a slow kernel of
the reference. EchoAI runs the attention kernel the scripts choose for this CPU and precision
(`perf_echoai.fastest_attention`); `--echoai_attention` adds a row EchoAI-<kernel> per kernel named, which tells
whether that choice is the fastest here (the goals are checked on the scripts' choice only).

The peak resident memory of each contender's pretraining step is read in a fresh subprocess per contender
and precision (`VmHWM` of /proc/self/status, the process's peak RSS including torch itself; the median of 3 such
processes, as one process's peak varies by tens of MiB from run to run; in brackets the
growth over the RSS just before the first step).

Model FLOPs are counted analytically (`pretrain_flops`, `inference_flops`) from the layer shapes, the same
count for both models: the work the masked autoencoder needs, whatever an implementation spends beyond it.
  * every linear layer: 2 * tokens * fan_in * fan_out for the forward; the forward + backward of a training
    step is 3x that (input gradient + weight gradient), except the tubelet embedding, whose input
    (`pixel_values`) needs no gradient, so 2x;
  * the tubelet embedding counts as a linear over the patches (fan_in = P = t * p * p * C, fan_out = D) of the
    V visible tubelets only in pretraining (VideoMAE embeds all L and discards 90 %: 10x this stage's FLOPs,
    not counted), of all L in inference;
  * attention: 2 * 2 * B * heads * L_seq^2 * head_dim for Q Kᵀ and for A V (3x that in training);
  * the encoder runs on the V visible tokens per clip, the decoder on all L tokens, the pixel head on the
    M masked ones;
  * LayerNorm, softmax, GELU, residual adds, the loss and the AdamW update are ignored (elementwise work, no
    matmul).
GFLOP/s = those FLOPs / the median step time; MFU = GFLOP/s / the matmul peak measured in the same run
(median of repeated 2048 x 2048 x 2048 products in fp32 and in bf16, at the start and at the end; the
higher kept).

    python bench/bench_pretrain.py              # the full run (about 10 minutes on the 2-core machine)
    python bench/bench_pretrain.py --compile    # + both models under torch.compile (a few minutes more)
    python bench/bench_pretrain.py --echoai_attention sdpa echoai_chunked   # + EchoAI with each kernel named
    python bench/bench_pretrain.py --quick      # a smoke run (about a minute)
    python bench/bench_pretrain.py --profile    # where a bf16 step's time goes, by kind of operator

`--profile` times no contest: it runs `torch.profiler` over a few pretraining steps of EchoAI and of the fastest
VideoMAE at `--profile_precision` (eager attention in bf16, SDPA in fp32) and prints each one's self CPU time per
step, summed over kinds of operator (`OPERATOR_KINDS`: the linear layers' matmuls, attention, normalisation, casts
and copies of parameter-shaped tensors, dtype casts and layout copies of activations, the optimizer, ...), beside
its unprofiled median step, so a speed-up is aimed at where the time is.
`--profile_models EchoAI` (or `VideoMAE`) profiles one model per process, the cleaner breakdown.
"""

from __future__ import annotations

import argparse
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
from common import (  # noqa: E402
    alternate,
    fill_unset,
    machine_info,
    markdown_table,
    matmul_peak_gflops,
    precision_context,
    proc_status_mib,
)

from configuration_echoai import EchoAIConfig  # noqa: E402
from inference_echoai import compile_for_inference, protocol_clip_indices  # noqa: E402
from modeling_echoai import (  # noqa: E402
    CHUNKED_ATTENTION,
    EchoAIForPreTraining,
    EchoAIForVideoClassification,
    make_mask,
    reconstruction_target_size,
)
from perf_echoai import keep_freed_memory, use_fastest_attention  # noqa: E402
from video_processing_echoai import EchoAIVideoProcessor  # noqa: E402


PRECISIONS = ("fp32", "bf16")
VIDEOMAE_ATTENTIONS = ("sdpa", "eager")
ECHOAI_ATTENTIONS = ("sdpa", "eager", CHUNKED_ATTENTION)
VIDEO_FRAMES = 200  # the inference benchmark's video length (EchoNet-Dynamic's median is about 175)


# --------------------------------------------------------------------------------------------------
# Configs: VideoMAE is built from EchoAI's preset, so both models have the same geometry and widths
# --------------------------------------------------------------------------------------------------


def echoai_config(preset: str, **overrides) -> EchoAIConfig:
    return EchoAIConfig.from_preset(preset, attn_implementation="sdpa", **overrides)


def videomae_config(config: EchoAIConfig, attn_implementation: str = "sdpa", **overrides) -> VideoMAEConfig:
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
        attn_implementation=attn_implementation,
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
    """Forward + backward model FLOPs of one masked-autoencoder step, by stage."""
    c = config
    tokens = num_visible + num_masked  # L
    pixels = c.tubelet_size * c.patch_size**2 * c.num_channels  # a tubelet's input pixels
    encoder = c.num_hidden_layers * layer_flops(
        batch, num_visible, c.hidden_size, c.num_attention_heads, c.intermediate_size
    )
    decoder = c.decoder_num_hidden_layers * layer_flops(
        batch, tokens, c.decoder_hidden_size, c.decoder_num_attention_heads, c.decoder_intermediate_size
    )
    return {
        "tubelet embedding (V tokens)": 2 * linear_flops(batch * num_visible, pixels, c.hidden_size),
        "encoder (V tokens)": 3 * encoder,
        "encoder_to_decoder": 3 * linear_flops(batch * num_visible, c.hidden_size, c.decoder_hidden_size),
        "decoder (L tokens)": 3 * decoder,
        "pixel head (M tokens)": 3
        * linear_flops(batch * num_masked, c.decoder_hidden_size, reconstruction_target_size(c)),
    }


def inference_flops(config: EchoAIConfig, num_clips: int) -> int:
    """Forward FLOPs of the video classifier on `num_clips` full clips (every one of the L tokens encoded)."""
    c = config
    pixels = c.tubelet_size * c.patch_size**2 * c.num_channels
    tokens = c.num_patches
    return (
        linear_flops(num_clips * tokens, pixels, c.hidden_size)
        + c.num_hidden_layers
        * layer_flops(num_clips, tokens, c.hidden_size, c.num_attention_heads, c.intermediate_size)
        + linear_flops(num_clips, c.hidden_size, 1)
    )


# --------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------


def set_attention(model: torch.nn.Module, precision: str, training: bool, attention: str | None) -> None:
    """EchoAI's attention kernel: `attention` where named, else the one the scripts give it on this CPU at
    `precision` (`perf_echoai.use_fastest_attention`)."""
    if attention is None:
        use_fastest_attention(model, "cpu", precision, training=training)
    else:
        model.set_attn_implementation(attention)


def build_pretraining(
    name: str, config: EchoAIConfig, precision: str, attention: str | None = None
) -> torch.nn.Module:
    """`name`'s pretraining model with the attention kernel `attention`; None is the scripts' choice for EchoAI
    (`set_attention`) and transformers' default, SDPA, for VideoMAE."""
    torch.manual_seed(0)
    if name == "EchoAI":
        model = EchoAIForPreTraining(copy.deepcopy(config)).train()
        set_attention(model, precision, True, attention)
        return model
    return VideoMAEForPreTraining(videomae_config(config, attention or "sdpa")).train()


def build_classifier(name: str, config: EchoAIConfig, precision: str, attention: str | None = None) -> torch.nn.Module:
    """`name`'s EF regressor (`num_labels=1`) with the attention kernel `attention`, as `build_pretraining`."""
    torch.manual_seed(0)
    if name == "EchoAI":
        config = copy.deepcopy(config)
        config.num_labels = 1
        model = EchoAIForVideoClassification(config).eval()
        set_attention(model, precision, False, attention)
        return model
    return VideoMAEForVideoClassification(videomae_config(config, attention or "sdpa", num_labels=1)).eval()


def pretraining_step(
    model: torch.nn.Module, pixel_values: torch.Tensor, mask: torch.Tensor, precision: str, device_type: str = "cpu"
):
    """A closure running one full optimisation step; AdamW keeps fp32 master weights in both precisions."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.5e-4, weight_decay=0.05, fused=True)

    def step() -> None:
        with precision_context(precision, device_type):
            loss = model(pixel_values=pixel_values, bool_masked_pos=mask).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def video_inference(model: torch.nn.Module, frames: torch.Tensor, clips: torch.Tensor, batch: int, precision: str):
    """A closure predicting one video's EF with the all-clips protocol: `frames` (N, C, H, W) normalised once,
    `clips` (K, T) frame indices; clips in batches of `batch`, EF = the mean of the K predictions."""

    def step() -> float:
        predictions = []
        with torch.no_grad(), precision_context(precision):
            for part in clips.split(batch):
                predictions.append(model(pixel_values=frames[part]).logits.float().view(-1))
        return torch.cat(predictions).mean().item()

    return step


def inputs(config: EchoAIConfig, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random clips and one tube mask, shared by both models."""
    generator = torch.Generator().manual_seed(0)
    shape = (batch, config.num_frames, config.num_channels, config.image_size, config.image_size)
    pixel_values = torch.randn(shape, generator=generator)  # (B, T, C, H, W)
    grid = (config.num_frames // config.tubelet_size,) + (config.image_size // config.patch_size,) * 2
    mask = make_mask(batch, grid, config.mask_ratio, config.mask_strategy, generator=generator)  # (B, L)
    return pixel_values, mask


def video_inputs(config: EchoAIConfig, num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A normalised (N, C, H, W) video and its all-clips (K, T) frame indices (period 2, as EchoNet)."""
    frames = torch.randn(
        num_frames,
        config.num_channels,
        config.image_size,
        config.image_size,
        generator=torch.Generator().manual_seed(1),
    )
    processor = EchoAIVideoProcessor(num_frames=config.num_frames, period=2, size=config.image_size)
    clips = torch.from_numpy(protocol_clip_indices(num_frames, processor, "all_clips"))
    return frames, clips


# --------------------------------------------------------------------------------------------------
# Peak memory: one fresh process per model and precision
# --------------------------------------------------------------------------------------------------


def rss_child(name: str, precision: str, config: EchoAIConfig, batch: int, steps: int, attention: str | None) -> None:
    """Run in a subprocess: build, record RSS, run `steps` training steps, print peak RSS as JSON."""
    model = build_pretraining(name, config, precision, attention)
    pixel_values, mask = inputs(config, batch)
    step = pretraining_step(model, pixel_values, mask, precision)
    before = proc_status_mib("VmRSS")
    for _ in range(steps):  # the first step also allocates AdamW's moments
        step()
    print(json.dumps({"peak_mib": proc_status_mib("VmHWM"), "before_mib": before}))


def measure_rss(args, name: str, precision: str, steps: int, attention: str | None = None) -> dict[str, float]:
    """Peak RSS of `args.rss_runs` fresh processes (the median, and the range): one process's peak varies by a few
    tens of MiB from run to run with where the allocator happens to place things. `attention` as for
    `build_pretraining`."""
    command = [
        sys.executable, __file__, "--rss_child", name, precision, "--preset", args.preset,
        "--batch_size", str(args.batch_size), "--steps", str(steps),
        *(["--rss_attention", attention] if attention else []), *(["--default_malloc"] if args.default_malloc else []),
    ]  # fmt: skip
    runs = []
    for _ in range(args.rss_runs):
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    peaks = [run["peak_mib"] for run in runs]
    return {
        "peak_mib": statistics.median(peaks),
        "before_mib": statistics.median(run["before_mib"] for run in runs),
        "min_mib": min(peaks),
        "max_mib": max(peaks),
    }


# --------------------------------------------------------------------------------------------------
# Profile: where a step's time goes
# --------------------------------------------------------------------------------------------------

COPY_OPERATORS = ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous")
# A copy whose input has the shape of one of the model's parameters: under autocast, the bf16 casts of the fp32
# master weights and of their gradients back (an activation of exactly a parameter's shape is rare).
PARAMETER_SHAPED = "(parameter-shaped)"
# Any other copy that changes the dtype (`_to_copy`, or `copy_` between two dtypes): autocast's bf16 casts of
# activations and their gradients' casts back. The rest keep the dtype and change the layout (a permute or transpose
# made contiguous, a clone, autograd writing a gradient into a slice of a zero-filled buffer).
DTYPE_CAST = "(dtype cast)"
# (kind, operator names): each profiled operator's self CPU time is counted under the first kind naming it;
# operators named nowhere count as "other" (indexing, views, reductions, the loss, per-operator overhead).
OPERATOR_KINDS = (
    ("linear layers (mm, addmm)", ("aten::mm", "aten::addmm")),
    ("attention matmuls (bmm)", ("aten::bmm", "aten::baddbmm")),
    ("fused SDPA kernels", ("aten::_scaled_dot_product_flash_attention_for_cpu",
                            "aten::_scaled_dot_product_flash_attention_for_cpu_backward")),
    ("softmax", ("aten::_softmax", "aten::_softmax_backward_data", "aten::_safe_softmax")),
    ("LayerNorm / GroupNorm", ("aten::native_layer_norm", "aten::native_layer_norm_backward",
                               "aten::native_group_norm", "aten::native_group_norm_backward")),
    ("GELU", ("aten::gelu", "aten::gelu_backward")),
    ("casts and copies of parameter-shaped tensors", tuple(f"{name} {PARAMETER_SHAPED}" for name in COPY_OPERATORS)),
    ("dtype casts of activations", tuple(f"{name} {DTYPE_CAST}" for name in COPY_OPERATORS)),
    ("layout copies of activations", COPY_OPERATORS),
    ("tubelet convolution", ("aten::mkldnn_convolution", "aten::convolution_backward")),
    ("elementwise arithmetic", ("aten::add", "aten::add_", "aten::mul", "aten::mul_", "aten::sub", "aten::div",
                                "aten::div_", "aten::pow", "aten::sqrt", "aten::rsqrt", "aten::neg", "aten::fill_",
                                "aten::zero_")),
    ("fused AdamW", ("aten::_fused_adamw_",)),
)  # fmt: skip


KIND_NAMES = tuple(kind for kind, _ in OPERATOR_KINDS) + ("other",)  # the profile table's rows, in order


def operator_kind(name: str) -> str:
    return next((kind for kind, names in OPERATOR_KINDS if name in names), "other")


def time_by_kind(self_cpu_us: dict[str, float], steps: int) -> dict[str, float]:
    """Self CPU microseconds per operator name over `steps` steps -> milliseconds per step per kind, every kind of
    `OPERATOR_KINDS` and "other" present (0 where none ran)."""
    per_kind = dict.fromkeys(KIND_NAMES, 0.0)
    for name, micros in self_cpu_us.items():
        per_kind[operator_kind(name)] += micros / 1e3 / steps
    return per_kind


def copy_name(name: str, input_shapes: list, input_dtypes: list, parameter_shapes: set[tuple]) -> str:
    """The name a profiled operator is counted under: a copy of a tensor shaped like a parameter is named apart
    (`PARAMETER_SHAPED`), then one that changes the dtype (`DTYPE_CAST`: `_to_copy`, whose own time is the output's
    allocation, or `copy_` from one dtype into another); every other operator keeps its name."""
    if name not in COPY_OPERATORS:
        return name
    if input_shapes and tuple(input_shapes[0]) in parameter_shapes:
        return f"{name} {PARAMETER_SHAPED}"
    if name == "aten::_to_copy" or (
        name == "aten::copy_" and len(input_dtypes) > 1 and input_dtypes[0] != input_dtypes[1]
    ):
        return f"{name} {DTYPE_CAST}"
    return name


def profile_step(step, steps: int, model: torch.nn.Module) -> dict[str, float]:
    """`steps` calls of `step` under `torch.profiler` (after the caller's warm-up): self CPU microseconds per
    operator name (`copy_name`), summed over the steps."""
    from torch.profiler import ProfilerActivity, profile

    parameter_shapes = {tuple(parameter.shape) for parameter in model.parameters()}
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    self_cpu_us: dict[str, float] = {}
    for event in prof.events():
        name = copy_name(event.name, event.input_shapes, event.input_dtypes or [], parameter_shapes)
        self_cpu_us[name] = self_cpu_us.get(name, 0.0) + event.self_cpu_time_total
    return self_cpu_us


def largest_others(self_cpu_us: dict[str, float], steps: int, count: int = 6) -> str:
    """The `count` operators of kind "other" with the most self time, as "name ms" per step."""
    others = sorted(((us, name) for name, us in self_cpu_us.items() if operator_kind(name) == "other"), reverse=True)
    return ", ".join(f"{name.removeprefix('aten::')} {us / 1e3 / steps:.1f}" for us, name in others[:count])


def run_profile(args, config: EchoAIConfig) -> None:
    """Each contender's time per step by kind of operator, its share of the profiled step, and the unprofiled
    median step (the profiler's own overhead is the difference)."""
    pixel_values, mask = inputs(config, args.batch_size)
    precision = args.profile_precision
    attention = "eager" if precision == "bf16" else "sdpa"  # VideoMAE's fastest attention at each precision
    tables, medians, others = {}, {}, {}
    for label, name in ((f"VideoMAE-{attention}", "VideoMAE"), ("EchoAI", "EchoAI")):
        if name not in args.profile_models:
            continue
        model = build_pretraining(name, config, precision, attention if name == "VideoMAE" else None)
        step = pretraining_step(model, pixel_values, mask, precision)
        medians[label] = statistics.median(alternate({label: step}, args.warmup, args.steps)[label]) * 1e3
        self_cpu_us = profile_step(step, args.steps, model)
        tables[label] = time_by_kind(self_cpu_us, args.steps)
        others[label] = largest_others(self_cpu_us, args.steps)
        print(f"  {label} {precision}: profiled", flush=True)
    labels = list(tables)
    totals = {label: sum(tables[label].values()) for label in labels}
    rows = [
        [kind] + [f"{tables[label][kind]:.1f} ({100 * tables[label][kind] / totals[label]:.0f} %)" for label in labels]
        for kind in KIND_NAMES
    ]
    rows.append(["**profiled step**"] + [f"**{totals[label]:.1f}**" for label in labels])
    rows.append(["median step, unprofiled"] + [f"{medians[label]:.1f}" for label in labels])
    print(
        f"\nSelf CPU ms per {precision} pretraining step by kind of operator (batch {args.batch_size}, "
        f"{args.steps} profiled steps after {args.warmup} warm-up):"
    )
    print(markdown_table(["kind of operator"] + [f"{label} ms (share)" for label in labels], rows))
    for label in labels:
        print(f'{label}, largest in "other" (ms per step): {others[label]}')


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=4, method="inclusive")[int(q * 4) - 1] if len(values) > 1 else values[0]


def speedup(fast: list[float], reference: list[float]) -> tuple[float, float, float]:
    """Speed-up of `fast` over `reference` (> 1 = faster): median and quartiles of the per-round ratios
    t_reference / t_fast. Pairing the two steps of one round cancels load that other jobs put on the machine
    for a while."""
    ratios = [r / f for f, r in zip(fast, reference, strict=True)]
    return statistics.median(ratios), quantile(ratios, 0.25), quantile(ratios, 0.75)


def versus(times: dict[str, list[float]], key: str, reference_key: str) -> str:
    if key == reference_key:
        return "1 (ref)"
    ratio, low, high = speedup(times[key], times[reference_key])
    return f"{ratio:.2f} [{low:.2f}–{high:.2f}]"


def fastest_videomae(times: dict[str, list[float]], precision: str) -> str:
    """The key of the eager-mode VideoMAE contender ("VideoMAE-<attention> <precision>") with the lowest median
    time at `precision`: the reference every EchoAI ratio at that precision is taken against."""
    keys = [k for k in times if k.startswith("VideoMAE-") and "compiled" not in k and k.endswith(f" {precision}")]
    return min(keys, key=lambda k: statistics.median(times[k]))


def report_rows(times, flops, items_per_step, peaks, rss=None, per="clips/s"):
    """Rows of a results table, keyed "<model> <precision>": the speed-up is over the fastest VideoMAE at the
    same precision and over the fastest VideoMAE fp32. Other jobs on the shared machine only ever add time, so
    the fastest step is a second, less load-sensitive estimate next to the median."""
    rows = []
    for key, values in times.items():
        name, precision = key.rsplit(" ", 1)
        seconds = statistics.median(values)
        gflops = flops / seconds / 1e9

        row = [
            name, precision, f"{seconds * 1e3:.0f}", f"{min(values) * 1e3:.0f}", f"{items_per_step / seconds:.2f}",
            versus(times, key, fastest_videomae(times, precision)), versus(times, key, fastest_videomae(times, "fp32")),
            f"{gflops:.0f}", f"{100 * mfu(flops, values, peaks[precision]):.0f} %",
        ]  # fmt: skip
        if rss is not None:
            r = rss.get(key)
            row.append(
                f"{r['peak_mib']:.0f} (+{r['peak_mib'] - r['before_mib']:.0f}) [{r['min_mib']:.0f}–{r['max_mib']:.0f}]"
                if r
                else "–"
            )
        rows.append(row)
    return rows


def mfu(flops: float, times: list[float], peak: float) -> float:
    """Model FLOP utilisation: `flops` per step over the median step time, as a fraction of `peak` GFLOP/s."""
    return flops / statistics.median(times) / 1e9 / peak


def needed_mfu(flops: float, reference: list[float], peak: float, target: float = 1.5) -> float:
    """The MFU a model would need to run `target` times faster than the `reference` step times, at the same
    model FLOPs: over 100 % means no implementation of the same computation can reach it on this machine."""
    return target * mfu(flops, reference, peak)


# The goals of the speed work, as ratios over the fastest VideoMAE at the same precision (and MFU).
SPEED_GOALS = {"fp32": 1.0, "bf16": 1.5}
MFU_GOAL = 0.60


def goals(train_times, train_flops, eval_times, eval_flops, peaks, rss, video_frames, compiled=False) -> list[str]:
    """The speed goals, each with the figure this run measured; the ratio goals also with the MFU the goal
    would take (over 100 %: no implementation of the same computation can reach it on this machine)."""
    lines = []
    inference = f"inference (all clips, {video_frames}-frame video)"
    for what, times, flops in (("pretraining", train_times, train_flops), (inference, eval_times, eval_flops)):
        for precision in PRECISIONS:
            reference = fastest_videomae(times, precision)
            ratio, low, high = speedup(times[f"EchoAI {precision}"], times[reference])
            target = SPEED_GOALS[precision]
            need = needed_mfu(flops, times[reference], peaks[precision], target)
            lines.append(
                f"{what} {precision}, EchoAI / fastest VideoMAE ({reference}): {ratio:.2f}x [{low:.2f}-{high:.2f}] "
                f"(goal >= {target}x, which needs {100 * need:.0f} % MFU)"
            )
    for key in ["EchoAI bf16"] + (["EchoAI-compiled bf16"] if compiled else []):
        utilisation = mfu(train_flops, train_times[key], peaks["bf16"])
        lines.append(
            f"pretraining MFU, {key}: {100 * utilisation:.0f} % of {peaks['bf16']:.0f} GFLOP/s "
            f"(goal >= {100 * MFU_GOAL:.0f} %)"
        )
    if compiled:
        for what, times in (("pretraining", train_times), ("inference", eval_times)):
            ratio, low, high = speedup(times["EchoAI-compiled bf16"], times["VideoMAE-sdpa-compiled bf16"])
            lines.append(f"{what}, both compiled, bf16, EchoAI / VideoMAE: {ratio:.2f}x [{low:.2f}-{high:.2f}]")
    for precision in PRECISIONS:
        echoai = rss[f"EchoAI {precision}"]
        reference = fastest_videomae(train_times, precision)
        videomae = rss[reference]
        lines.append(
            f"peak RSS {precision}, median of fresh processes: EchoAI {echoai['peak_mib']:.0f} MiB "
            f"[{echoai['min_mib']:.0f}-{echoai['max_mib']:.0f}] vs {reference} {videomae['peak_mib']:.0f} MiB "
            f"[{videomae['min_mib']:.0f}-{videomae['max_mib']:.0f}] (goal <=)"
        )
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", help="EchoAIConfig preset; VideoMAE gets the same widths.")
    parser.add_argument("--batch_size", type=int, default=None, help="Clips per pretraining step (default 8).")
    parser.add_argument("--eval_batch_size", type=int, default=16, help="Clips per inference forward pass.")
    parser.add_argument("--steps", type=int, default=None, help="Measured pretraining rounds (default 12).")
    parser.add_argument("--videos", type=int, default=None, help="Measured inference rounds, 1 video each (3).")
    parser.add_argument("--warmup", type=int, default=None, help="Warm-up steps per contender (default 3).")
    parser.add_argument("--compile", action="store_true", help="Add both models' bf16 steps under torch.compile.")
    parser.add_argument("--default_malloc", action="store_true", help="Leave glibc's malloc at its defaults.")
    parser.add_argument(
        "--videomae_attention", nargs="+", default=list(VIDEOMAE_ATTENTIONS), choices=VIDEOMAE_ATTENTIONS,
        help="VideoMAE's attention implementations to run; the fastest at each precision is the reference.",
    )  # fmt: skip
    parser.add_argument(
        "--echoai_attention", nargs="+", default=[], choices=ECHOAI_ATTENTIONS,
        help="Also run EchoAI with these attention kernels (rows EchoAI-<kernel>), beside the row EchoAI, which "
        "runs the kernel the scripts choose on this CPU at each precision (perf_echoai.fastest_attention) and is "
        "the one the goals are checked on: whether the scripts' choice is the fastest here.",
    )  # fmt: skip
    parser.add_argument("--rss_runs", type=int, default=None, help="Fresh processes per peak-RSS figure (3).")
    parser.add_argument("--quick", action="store_true", help="Smoke run: batch 2, 1 warm-up, 2 rounds, 40 frames.")
    parser.add_argument(
        "--profile", action="store_true",
        help="Instead of the contest: where EchoAI's and VideoMAE's pretraining step spend their time, by kind of "
        "operator (torch.profiler).",
    )  # fmt: skip
    parser.add_argument("--profile_precision", choices=PRECISIONS, default="bf16", help="Precision to profile.")
    parser.add_argument(
        "--profile_models", nargs="+", choices=("VideoMAE", "EchoAI"), default=["VideoMAE", "EchoAI"],
        help="Models to profile. One per process gives the cleaner breakdown: a model profiled after another in "
        "the same process can show time in its loss that its unprofiled step does not spend.",
    )  # fmt: skip
    parser.add_argument("--rss_child", nargs=2, metavar=("MODEL", "PRECISION"), help=argparse.SUPPRESS)
    parser.add_argument("--rss_attention", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    fill_unset(args, quick=dict(batch_size=2, steps=2, videos=1, warmup=1, rss_runs=1),
               full=dict(batch_size=8, steps=12, videos=3, warmup=3, rss_runs=3))  # fmt: skip
    return args


def contenders(args, with_kernels: bool = True) -> list[tuple[str, str, str | None]]:
    """(label, model, attention kernel) of every eager-mode contender: VideoMAE once per attention, EchoAI with
    the scripts' kernel (None: `perf_echoai.use_fastest_attention` picks), then, `with_kernels`, EchoAI once per
    `--echoai_attention` kernel."""
    videomae = [(f"VideoMAE-{a}", "VideoMAE", a) for a in args.videomae_attention]
    kernels = [(f"EchoAI-{a}", "EchoAI", a) for a in args.echoai_attention] if with_kernels else []
    return videomae + [("EchoAI", "EchoAI", None)] + kernels


def time_pretraining(args, config: EchoAIConfig) -> tuple[dict[str, list[float]], int]:
    """Every contender's pretraining step at both precisions in one alternation: times and model FLOPs per step."""
    pixel_values, mask = inputs(config, args.batch_size)
    num_masked = int(mask[0].sum())
    num_visible = mask.shape[1] - num_masked
    flops = pretrain_flops(config, args.batch_size, num_visible, num_masked)
    total = sum(flops.values())
    print(
        f"\npretraining: batch {args.batch_size}, L={mask.shape[1]} tokens, V={num_visible} visible, "
        f"M={num_masked} masked; {total / 1e9:.1f} GFLOP per step ("
        + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in flops.items())
        + ")"
    )
    steps = {}
    for precision in PRECISIONS:
        for label, name, attention in contenders(args):
            model = build_pretraining(name, config, precision, attention)
            steps[f"{label} {precision}"] = pretraining_step(model, pixel_values, mask, precision)
    if args.compile:
        for label, name in (("VideoMAE-sdpa", "VideoMAE"), ("EchoAI", "EchoAI")):
            compiled = torch.compile(build_pretraining(name, config, "bf16"))
            steps[f"{label}-compiled bf16"] = step = pretraining_step(compiled, pixel_values, mask, "bf16")
            compile_started = time.perf_counter()
            for _ in range(2):  # forward + backward graphs, then a step with the optimizer state in place
                step()
            print(
                f"  {label} torch.compile (inductor), bf16: first two steps {time.perf_counter() - compile_started:.0f} s"
            )
    return alternate(steps, args.warmup, args.steps), total


def time_inference(args, config: EchoAIConfig) -> tuple[dict[str, list[float]], int, int]:
    """Every contender's all-clips inference on one video at both precisions in one alternation: times, model
    FLOPs per video and the video's frame count."""
    frames, clips = video_inputs(config, 40 if args.quick else VIDEO_FRAMES)
    flops = inference_flops(config, len(clips))
    print(
        f"\ninference: {len(frames)}-frame video, all-clips protocol: {len(clips)} clips in batches of "
        f"{args.eval_batch_size}, {flops / 1e9:.0f} GFLOP per video"
    )
    videos = {}
    for precision in PRECISIONS:
        for label, name, attention in contenders(args):
            model = build_classifier(name, config, precision, attention)
            videos[f"{label} {precision}"] = video_inference(model, frames, clips, args.eval_batch_size, precision)
    if args.compile:  # as scripts/evaluate.py --torch_compile: inductor, frozen weights
        for label, name in (("VideoMAE-sdpa", "VideoMAE"), ("EchoAI", "EchoAI")):
            compiled = compile_for_inference(build_classifier(name, config, "bf16"))
            videos[f"{label}-compiled bf16"] = video = video_inference(
                compiled, frames, clips, args.eval_batch_size, "bf16"
            )
            compile_started = time.perf_counter()
            video()  # compiles the full batch's graph and the last, smaller one's
            print(
                f"  {label} torch.compile (inductor, frozen weights), bf16: first video "
                f"{time.perf_counter() - compile_started:.0f} s"
            )
    return alternate(videos, 1, args.videos), flops, len(frames)


def print_report(args, train, eval_, peaks, rss) -> None:
    (train_times, train_flops), (eval_times, eval_flops, video_frames) = train, eval_
    headers = [
        "model", "precision", "median ms", "best ms", "{per}", "speed-up vs fastest VideoMAE, same precision [IQR]",
        "speed-up vs fastest VideoMAE fp32 [IQR]", "GFLOP/s", "MFU",
    ]  # fmt: skip
    print(
        f"\nPretraining step (fwd + bwd + fused AdamW), batch {args.batch_size}, {args.warmup} warm-up + "
        f"{args.steps} measured rounds, alternating:"
    )
    rows = report_rows(train_times, train_flops, args.batch_size, peaks, rss)
    rss_header = f"peak RSS MiB (+step) [range of {args.rss_runs}]"
    print(markdown_table([h.format(per="clips/s") for h in headers] + [rss_header], rows))
    print(f"\nInference, all-clips protocol on a {video_frames}-frame video, {args.videos} measured rounds:")
    rows = report_rows(eval_times, eval_flops, 1, peaks)
    print(
        markdown_table([h.replace("median ms", "median ms per video").format(per="videos/s") for h in headers], rows)
    )
    print("\nGoals:")
    for line in goals(train_times, train_flops, eval_times, eval_flops, peaks, rss, video_frames, args.compile):
        print("  " + line)


def main(argv=None) -> None:
    args = parse_args(argv)
    config = echoai_config(args.preset)
    if not args.default_malloc:
        keep_freed_memory()
    if args.rss_child:
        rss_child(*args.rss_child, config, args.batch_size, args.steps, args.rss_attention)
        return

    started = time.perf_counter()
    if args.preset == "small":
        check_small_preset()
    info = machine_info()
    info["malloc"] = "glibc defaults" if args.default_malloc else "keep_freed_memory()"
    print(" | ".join(f"{k}: {v}" for k, v in info.items()))
    print("command: python " + " ".join(sys.argv))
    if args.profile:
        run_profile(args, config)
        print(f"wall time: {time.perf_counter() - started:.0f} s")
        return

    # Attainable matmul peak, the MFU denominator: measured now and again at the end, the better one kept,
    # so a burst of load from other jobs during one measurement does not inflate every MFU.
    repeats = 3 if args.quick else 10
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peaks = {p: matmul_peak_gflops(dtypes[p], repeats=repeats) for p in PRECISIONS}
    print(f"matmul peak 2048³ (start): fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")

    train = time_pretraining(args, config)
    print(f"  pretraining done ({time.perf_counter() - started:.0f} s)", flush=True)
    eval_ = time_inference(args, config)
    print(f"  inference done ({time.perf_counter() - started:.0f} s)", flush=True)
    rss = {  # each contender's peak RSS, each in fresh processes
        f"{label} {p}": measure_rss(args, name, p, 1 if args.quick else 2, attention)
        for p in PRECISIONS
        for label, name, attention in contenders(args, with_kernels=False)  # the goals' rows
    }
    end_peaks = {p: matmul_peak_gflops(dtypes[p], repeats=repeats) for p in PRECISIONS}
    print(f"matmul peak 2048³ (end): fp32 {end_peaks['fp32']:.0f} GFLOP/s, bf16 {end_peaks['bf16']:.0f} GFLOP/s")
    peaks = {p: max(peaks[p], end_peaks[p]) for p in PRECISIONS}
    print_report(args, train, eval_, peaks, rss)
    print(f"wall time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
