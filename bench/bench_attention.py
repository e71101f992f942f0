"""Attention kernels on CPU at EchoAI's shapes: "sdpa" against "echoai_chunked", by their registered names.

This is the measurement behind `perf_echoai.fastest_attention`, which the scripts use to choose EchoAI's
`attn_implementation`: "echoai_chunked" (`modeling_echoai.chunked_attention_forward`: q kᵀ and a v as two
matmuls, softmax between, over batch chunks whose scores stay in cache) where it is faster, transformers'
"sdpa" (`torch.nn.functional.scaled_dot_product_attention`) elsewhere. Both are called as the model calls them,
through `ALL_ATTENTION_FUNCTIONS[name]`.

Kernels: for each shape the small preset runs -- the pretraining encoder (V = 40 visible tokens, 6 heads), the
pretraining decoder (L = 392 tokens, 3 heads), the fine-tuning encoder (L = 392, 6 heads) and inference
(L = 392, 6 heads, batch 16) -- and each precision, both kernels run on the same (B, heads, L, 64) q, k, v,
taken from one fused QKV tensor as the model does; forward + backward of `output.sum()` in training shapes,
forward under `no_grad` in the inference shape. The two alternate call by call; medians and the ratio.

Model (`--model_rounds`, 0 to skip): the whole `small` model with each kernel, in fp32 and under bf16 autocast
(the precisions the scripts run on CPU): a pretraining step (batch 8, 90 % tube mask, forward + loss + backward +
fused AdamW, as bench/bench_pretrain.py) and an inference batch of 16 clips, alternating step by step.

    python bench/bench_attention.py          # a few minutes on the 2-core machine; --model_rounds 0: about a minute
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch
from einops import rearrange
from transformers import AttentionInterface


sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pretrain import inputs, pretraining_step  # noqa: E402
from common import alternate, machine_info, markdown_table, precision_context  # noqa: E402

from configuration_echoai import EchoAIConfig  # noqa: E402
from modeling_echoai import CHUNKED_ATTENTION, EchoAIForPreTraining, EchoAIForVideoClassification  # noqa: E402


KERNELS = ("sdpa", CHUNKED_ATTENTION)
SHAPES = [  # (what, batch, heads, tokens, training)
    ("pretraining encoder", 8, 6, 40, True),
    ("pretraining decoder", 8, 3, 392, True),
    ("fine-tuning encoder", 8, 6, 392, True),
    ("inference encoder", 16, 6, 392, False),
]
HEAD_DIM = 64
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def kernel_steps(batch: int, heads: int, tokens: int, training: bool, dtype: torch.dtype):
    qkv = torch.randn(batch, tokens, 3 * heads * HEAD_DIM, dtype=dtype, requires_grad=training)
    scaling = HEAD_DIM**-0.5
    module = torch.nn.Module().train(training)  # what the attention interface reads `training` from
    module.is_causal = False  # read by transformers' "sdpa"

    def step_for(name: str):
        attention = AttentionInterface()[name]

        def step() -> None:
            with torch.set_grad_enabled(training):
                q, k, v = rearrange(qkv, "b l (three h d) -> three b h l d", three=3, h=heads).unbind(0)
                output, _ = attention(module, q, k, v, None, scaling=scaling, dropout=0.0)
                if training:
                    output.sum().backward()
                    qkv.grad = None

        return step

    return {name: step_for(name) for name in KERNELS}


def model_steps(precision: str, batch: int = 8, eval_batch: int = 16) -> dict:
    """A `small` pretraining step and an inference batch per kernel, keyed (stage, kernel)."""
    config = EchoAIConfig.from_preset("small")
    pixel_values, mask = inputs(config, batch)
    clips = torch.randn(eval_batch, *pixel_values.shape[1:], generator=torch.Generator().manual_seed(1))
    steps = {}
    for name in KERNELS:
        torch.manual_seed(0)
        pretraining = EchoAIForPreTraining(copy.deepcopy(config)).train()
        pretraining.set_attn_implementation(name)
        steps["pretraining step, batch 8", name] = pretraining_step(pretraining, pixel_values, mask, precision)
        classifier = EchoAIForVideoClassification(EchoAIConfig.from_preset("small", num_labels=1)).eval()
        classifier.set_attn_implementation(name)

        def infer(model=classifier) -> None:
            with torch.no_grad(), precision_context(precision):
                model(pixel_values=clips)

        steps["inference, 16 clips", name] = infer
    return steps


def table_row(what: list[str], times: dict, key=lambda name: name) -> list[str]:
    sdpa, chunked = (statistics.median(times[key(name)]) * 1e3 for name in KERNELS)
    return what + [f"{sdpa:.2f}", f"{chunked:.2f}", f"{sdpa / chunked:.2f}"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="Alternating rounds per kernel shape.")
    parser.add_argument("--model_rounds", type=int, default=8, help="Alternating rounds per model precision.")
    args = parser.parse_args(argv)
    print(" | ".join(f"{k}: {v}" for k, v in machine_info().items()))
    print("command: python " + " ".join(sys.argv))
    rows = []
    for what, batch, heads, tokens, training in SHAPES:
        for precision, dtype in DTYPES.items():
            times = alternate(kernel_steps(batch, heads, tokens, training, dtype), warmup=3, measured=args.rounds)
            shape = [what, f"({batch}, {heads}, {tokens}, {HEAD_DIM})", "fwd + bwd" if training else "fwd", precision]
            rows.append(table_row(shape, times))
    headers = ["shape", "(B, heads, L, d)", "pass", "precision", "sdpa ms", f"{CHUNKED_ATTENTION} ms", "speed-up"]
    print(markdown_table(headers, rows))
    if args.model_rounds:
        rows = []
        for precision in ("fp32", "bf16"):
            steps = model_steps(precision)
            times = alternate(steps, warmup=2, measured=args.model_rounds)
            for stage in dict.fromkeys(stage for stage, _ in steps):
                rows.append(table_row([stage, precision], times, key=lambda name, stage=stage: (stage, name)))
        print()
        print(markdown_table(["`small` model", "precision"] + headers[4:], rows))


if __name__ == "__main__":
    main()
