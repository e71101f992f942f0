"""Attention kernels on CPU at EchoAI's shapes: torch's fused SDPA against `chunked_attention_forward`.

This is the measurement behind `EchoAISelfAttention`'s rule: under "sdpa", CPU inputs in bf16 / fp16 take
`modeling_echoai.chunked_attention_forward` (q kᵀ and a v as two matmuls, softmax between, over batch chunks
whose scores stay in cache); fp32 keeps `torch.nn.functional.scaled_dot_product_attention`.

For each shape the small preset runs -- the pretraining encoder (V = 40 visible tokens, 6 heads), the
pretraining decoder (L = 392 tokens, 3 heads), the fine-tuning encoder (L = 392, 6 heads) and inference
(L = 392, 6 heads, batch 16) -- and each precision, both kernels run on the same (B, heads, L, 64) q, k, v,
taken from one fused QKV tensor as the model does; forward + backward of `output.sum()` in training shapes,
forward under `no_grad` in the inference shape. The two alternate call by call; medians and the ratio.

    python bench/bench_attention.py          # about a minute
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, machine_info, markdown_table  # noqa: E402

from modeling_echoai import chunked_attention_forward  # noqa: E402


SHAPES = [  # (what, batch, heads, tokens, training)
    ("pretraining encoder", 8, 6, 40, True),
    ("pretraining decoder", 8, 3, 392, True),
    ("fine-tuning encoder", 8, 6, 392, True),
    ("inference encoder", 16, 6, 392, False),
]
HEAD_DIM = 64


def kernels(batch: int, heads: int, tokens: int, training: bool, dtype: torch.dtype):
    qkv = torch.randn(batch, tokens, 3 * heads * HEAD_DIM, dtype=dtype, requires_grad=training)
    scaling = HEAD_DIM**-0.5
    module = torch.nn.Module().train(training)  # what the attention interface reads `training` from

    def run(attention):
        def step() -> None:
            with torch.set_grad_enabled(training):
                q, k, v = rearrange(qkv, "b l (three h d) -> three b h l d", three=3, h=heads).unbind(0)
                output = attention(q, k, v)
                if training:
                    output.sum().backward()
                    qkv.grad = None

        return step

    return {
        "fused SDPA": run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=scaling)),
        "chunked matmul": run(lambda q, k, v: chunked_attention_forward(module, q, k, v, None, scaling)[0]),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    print(" | ".join(f"{k}: {v}" for k, v in machine_info().items()))
    print("command: python " + " ".join(sys.argv))
    rows = []
    for what, batch, heads, tokens, training in SHAPES:
        for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            times = alternate(kernels(batch, heads, tokens, training, dtype), warmup=3, measured=args.rounds)
            fused, chunked = (statistics.median(times[k]) * 1e3 for k in ("fused SDPA", "chunked matmul"))
            rows.append([
                what, f"({batch}, {heads}, {tokens}, {HEAD_DIM})", "fwd + bwd" if training else "fwd", precision,
                f"{fused:.2f}", f"{chunked:.2f}", f"{fused / chunked:.2f}",
            ])  # fmt: skip
    headers = ["shape", "(B, heads, L, d)", "pass", "precision", "fused SDPA ms", "chunked matmul ms", "speed-up"]
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
