"""The fast paths compute what the plain model would.

`bench/bench_pretrain.py` measures how fast EchoAI is; these tests pin down that it still computes the same
thing. `plain_pretraining_loss` is the masked autoencoder written out as directly as possible from the same
parameters: the convolution over every tubelet and the mask applied after it, tokens in their original order
with mask tokens in place (VideoMAE's layout), attention as softmax(q kᵀ / √d) v in fp32, the target by
reshape + permute and `Tensor.var`. The model's optimised path (visible tubelets gathered without patchifying
the clip, mask tokens appended, fused QKV, SDPA, two-pass tubelet statistics, fused AdamW) must follow it
step for step.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from test_modeling import build, clips, tiny_config

import modeling_echoai
from modeling_echoai import (
    CHUNKED_ATTENTION,
    EchoAIForPreTraining,
    EchoAIForVideoClassification,
    chunked_attention_forward,
    make_mask,
)


def plain_layer(layer, x: torch.Tensor) -> torch.Tensor:
    attention = layer.attention
    batch, length, width = x.shape
    heads = attention.num_heads
    h = layer.layernorm_before(x)
    q, k, v = F.linear(h, attention.qkv.weight, attention.qkv.bias).split(width, dim=-1)
    q, k, v = (t.reshape(batch, length, heads, -1).transpose(1, 2) for t in (q, k, v))
    scores = (q @ k.transpose(-1, -2) / (width // heads) ** 0.5).softmax(dim=-1, dtype=torch.float32)
    context = (scores @ v).transpose(1, 2).reshape(batch, length, width)
    x = x + attention.proj(context)
    return x + layer.mlp.fc2(F.gelu(layer.mlp.fc1(layer.layernorm_after(x))))


def plain_positions(table) -> torch.Tensor:
    return (table.temporal[:, None, :] + table.spatial[None, :, :]).flatten(0, 1)  # (L, width)


def plain_pretraining_loss(model: EchoAIForPreTraining, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    c = model.config
    batch, frames, channels, size, _ = x.shape
    t, p = c.tubelet_size, c.patch_size
    embeddings = model.echoai.embeddings
    tokens = embeddings.patch_embeddings.projection(x.transpose(1, 2)).flatten(2).transpose(1, 2)  # (B, L, D)
    tokens = tokens + plain_positions(embeddings.position_embeddings)
    hidden = tokens[~mask].reshape(batch, -1, c.hidden_size)
    for layer in model.echoai.encoder.layer:
        hidden = plain_layer(layer, hidden)
    hidden = model.encoder_to_decoder(model.echoai.layernorm(hidden))
    full = model.mask_token.expand(batch, mask.shape[1], -1).clone()
    full[~mask] = hidden.reshape(-1, c.decoder_hidden_size)
    full = full + plain_positions(model.decoder_position_embeddings)
    for layer in model.decoder.layers:
        full = plain_layer(layer, full)
    prediction = model.decoder.head(model.decoder.norm(full))[mask]  # (B * M, P), tokens in raster order
    grid = (frames // t, size // p, size // p)
    patches = x.reshape(batch, grid[0], t, channels, grid[1], p, grid[2], p)
    patches = patches.permute(0, 1, 4, 6, 2, 5, 7, 3).reshape(batch, -1, t * p * p * channels)[mask]
    target = (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + 1e-6).sqrt()
    return F.mse_loss(prediction, target)


def test_pretraining_follows_the_plain_model_for_20_steps():
    config = tiny_config(hidden_size=64, num_attention_heads=4, decoder_hidden_size=32, decoder_num_hidden_layers=2)
    optimised = build(EchoAIForPreTraining, config).train()
    plain = build(EchoAIForPreTraining, config).train()
    assert optimised.config._attn_implementation == "sdpa"
    fused = torch.optim.AdamW(optimised.parameters(), lr=1e-3, weight_decay=0.05, fused=True)
    loop = torch.optim.AdamW(plain.parameters(), lr=1e-3, weight_decay=0.05, foreach=False)
    generator = torch.Generator().manual_seed(0)
    x = clips(config, batch_size=3)
    losses = []
    for _ in range(20):  # one batch, a new mask each step: the loss falls as the model fits it
        mask = make_mask(3, (2, 4, 4), config.mask_ratio, generator=generator)
        for model, optimizer in ((optimised, fused), (plain, loop)):
            loss = (
                model(x, bool_masked_pos=mask).loss if model is optimised else plain_pretraining_loss(model, x, mask)
            )
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    optimised_losses, plain_losses = losses[0::2], losses[1::2]
    assert max(abs(a - b) for a, b in zip(optimised_losses, plain_losses, strict=True)) < 1e-4, (
        optimised_losses,
        plain_losses,
    )
    assert optimised_losses[-1] < optimised_losses[0] - 0.05  # the comparison covers a run that learns


@pytest.mark.parametrize("chunk_elements", [1 << 22, 2 * 4 * 32 * 32])  # one chunk; chunks of 2 clips
def test_chunked_attention_equals_sdpa_with_gradients(monkeypatch, chunk_elements):
    monkeypatch.setattr(modeling_echoai, "ATTENTION_CHUNK_ELEMENTS", chunk_elements)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(5, 4, 32, 8, generator=generator, requires_grad=True) for _ in range(3))
    output, _ = chunked_attention_forward(torch.nn.Module(), q, k, v, None, scaling=8**-0.5)  # (B, L, heads, d)
    reference = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    torch.testing.assert_close(output, reference, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(output.square().sum(), (q, k, v))
    reference_grads = torch.autograd.grad(reference.square().sum(), (q, k, v))
    for grad, reference_grad in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(grad, reference_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_class", [EchoAIForPreTraining, EchoAIForVideoClassification])
def test_sdpa_is_sdpa_and_the_chunked_kernel_is_chosen_by_name(monkeypatch, model_class):
    """Under bf16 autocast on CPU "sdpa" calls torch's SDPA, as asked; the chunked kernel runs only when named, never
    calls SDPA, and agrees exactly with eager attention under the same autocast and closely with fp32."""
    config = tiny_config(num_labels=1) if model_class is EchoAIForVideoClassification else tiny_config()
    models = {}
    for implementation in ("sdpa", "eager", CHUNKED_ATTENTION):
        models[implementation] = build(model_class, copy.deepcopy(config))
        models[implementation].set_attn_implementation(implementation)
        assert models[implementation].config._attn_implementation == implementation
    x = clips(config)
    kwargs = {"bool_masked_pos": make_mask(2, (2, 4, 4), 0.75)} if model_class is EchoAIForPreTraining else {}

    calls = []
    real_sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real_sdpa(*a, **k))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        chunked, eager = (models[name](x, **kwargs).logits for name in (CHUNKED_ATTENTION, "eager"))
        assert not calls
        models["sdpa"](x, **kwargs)
        assert calls, '"sdpa" must run torch\'s SDPA in bf16 on CPU too'
    torch.testing.assert_close(chunked, eager, rtol=0, atol=0)
    with torch.no_grad():
        full_precision = models["sdpa"](x, **kwargs).logits
    torch.testing.assert_close(chunked.float(), full_precision, rtol=0.05, atol=0.05)


def test_compiled_pretraining_step_equals_the_eager_one():
    """torch.compile (aot_eager: dynamo's graphs and AOT autograd, as inductor gets them) gives eager's loss and
    gradients."""
    config = tiny_config()
    eager = build(EchoAIForPreTraining, config).train()
    compiled = torch.compile(build(EchoAIForPreTraining, copy.deepcopy(config)).train(), backend="aot_eager")
    x = clips(config)
    mask = make_mask(2, (2, 4, 4), 0.75, generator=torch.Generator().manual_seed(0))
    losses = []
    for model in (eager, compiled):
        loss = model(x, bool_masked_pos=mask).loss
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    compiled_parameters = dict(compiled._orig_mod.named_parameters())
    for name, parameter in eager.named_parameters():
        torch.testing.assert_close(compiled_parameters[name].grad, parameter.grad, rtol=1e-5, atol=1e-6, msg=name)
