"""Speed settings for the process and the model, each one measured (docs/BENCHMARKS.md, with the bench/ command
that measured it) and each called by name from the scripts, never applied inside the model or the training code.

* `keep_freed_memory` -- glibc's malloc keeps freed memory for the next step instead of returning it to the OS.
* `fastest_attention`, `use_fastest_attention` -- the attention kernel measured fastest on a device in a precision.
* `warn_if_half_precision_is_emulated` -- a warning where the CPU has no kernels for the half precision asked for
  (it changes nothing; the training scripts reach it through `training_echoai.build_accelerator`).
* `prepare_for_inference` -- both of the above for `scripts/evaluate.py` and `scripts/predict.py` (`--bf16`).
"""

from __future__ import annotations

import ctypes
import logging
import sys

import torch

from modeling_echoai import CHUNKED_ATTENTION, EchoAIConfig


logger = logging.getLogger(__name__)

# Precisions (accelerate's `mixed_precision` names) in which the chunked kernel beat torch's SDPA on CPU in training.
CHUNKED_ATTENTION_PRECISIONS = ("bf16", "fp16")


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse rather than hand it back to the OS at once.

    A training step allocates and frees tens of MB of activations. With glibc's defaults, blocks above 128 KiB
    come from fresh mmaps (a threshold that only adapts after the first frees) and freed memory at the heap's top
    is returned: every step faults the same pages in again. With both thresholds raised the pages stay mapped;
    docs/BENCHMARKS.md measures the gain for a pretraining step (same peak RSS). Memory freed after the peak stays
    with the process. Returns False (and changes nothing) where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    # The mmap threshold first: setting either one freezes glibc's adaptive threshold at its current value.
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Xeons from Sapphire Rapids on), by torch's own check; False where torch
    cannot tell (an older or non-x86 build)."""
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def fastest_attention(device: torch.device | str, precision: str, training: bool) -> str:
    """The `attn_implementation` EchoAI runs fastest with on `device` in `precision` ("no" / "fp32", "bf16",
    "fp16"), for training (forward + backward) or for inference (forward only).

    The chunked matmul kernel on a CPU with native kernels for the half precision (`half_precision_is_native`) --
    for training, where it beat torch's fused SDPA at every training shape EchoAI runs on both such CPUs measured,
    and for bf16 inference where the CPU has no AMX, where it beat SDPA on the AVX-512 CPU while SDPA won on the CPU
    with AMX; transformers' default "sdpa" everywhere else: in fp32, for inference on a CPU with AMX and fp16
    inference (measured with AMX only), on a CPU whose half precision is emulated (there SDPA was the faster at
    every shape), and on GPUs (not measured). docs/BENCHMARKS.md, *Attention kernels*.
    """
    cpu_half = torch.device(device).type == "cpu" and precision in CHUNKED_ATTENTION_PRECISIONS
    if not cpu_half or not half_precision_is_native(precision):
        return "sdpa"
    if training or (precision == "bf16" and not cpu_has_amx()):
        return CHUNKED_ATTENTION
    return "sdpa"


def use_fastest_attention(model: torch.nn.Module, device: torch.device | str, precision: str, training: bool) -> None:
    """Give an EchoAI model (installed or loaded as remote code) `fastest_attention(device, precision, training)`,
    which `model.config._attn_implementation` then shows. Any other model (the CNN baseline) is left as it is."""
    if getattr(getattr(model, "config", None), "model_type", None) == EchoAIConfig.model_type:
        model.set_attn_implementation(fastest_attention(device, precision, training))


def half_precision_is_native(precision: str) -> bool:
    """Whether this CPU has oneDNN's kernels for `precision` ("bf16" or "fp16"): AVX-512 or AMX for bf16, AVX-512
    FP16 or AMX-FP16 for fp16 (torch's own check, which decides whether its CPU convolutions and matmuls take
    oneDNN's paths). Without them autocast still runs, on arithmetic emulated in fp32, element by element in
    places. True where torch cannot tell (an older or non-x86 build): no false alarm."""
    check = {"bf16": "_is_mkldnn_bf16_supported", "fp16": "_is_mkldnn_fp16_supported"}[precision]
    try:
        return bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):
        return True


def warn_if_half_precision_is_emulated(device: torch.device | str, precision: str | None, fix: str) -> bool:
    """Log a warning, ending with `fix` (the flag to change), when a run on a CPU asks for bf16 or fp16 that
    the CPU has no kernels for (`half_precision_is_native`): every step then runs many times slower than in fp32
    (docs/BENCHMARKS.md, *Half precision on a CPU without its kernels*), a cost a user should hear of at the
    start, not find in the step rate. Returns whether it warned."""
    if torch.device(device).type != "cpu" or precision not in ("bf16", "fp16") or half_precision_is_native(precision):
        return False
    logger.warning(
        "this CPU has no %s kernels (oneDNN needs AVX-512 or AMX; torch reports %s): %s runs on emulated "
        "arithmetic, many times slower than fp32. %s",
        precision, torch.backends.cpu.get_cpu_capability(), precision, fix,
    )  # fmt: skip
    return True


def prepare_for_inference(model: torch.nn.Module, device: torch.device | str, bf16: bool) -> None:
    """What `scripts/evaluate.py` and `scripts/predict.py` set before they score videos: the attention kernel
    fastest for inference in their precision (bf16 autocast with `--bf16`, else fp32), and the warning where
    that bf16 would be emulated."""
    precision = "bf16" if bf16 else "no"
    use_fastest_attention(model, device, precision, training=False)
    warn_if_half_precision_is_emulated(device, precision, "Run without --bf16.")
