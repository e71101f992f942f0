"""The speed settings in `perf_echoai` are explicit choices: what they pick, and that they change no prediction."""

import logging

import pytest
import torch
from test_modeling import build, clips, tiny_config

import perf_echoai
from baselines_echoai import build_baseline
from modeling_echoai import CHUNKED_ATTENTION, EchoAIForVideoClassification
from perf_echoai import fastest_attention, half_precision_is_native, use_fastest_attention


@pytest.mark.parametrize(
    "device, precision, training, without_amx, with_amx",
    [
        ("cpu", "bf16", True, CHUNKED_ATTENTION, CHUNKED_ATTENTION),
        ("cpu", "fp16", True, CHUNKED_ATTENTION, CHUNKED_ATTENTION),
        (torch.device("cpu"), "bf16", True, CHUNKED_ATTENTION, CHUNKED_ATTENTION),
        ("cpu", "bf16", False, CHUNKED_ATTENTION, "sdpa"),
        ("cpu", "fp16", False, "sdpa", "sdpa"),
        ("cpu", "no", True, "sdpa", "sdpa"),
        ("cpu", "fp32", False, "sdpa", "sdpa"),
        ("cuda", "bf16", True, "sdpa", "sdpa"),
        ("cuda", "bf16", False, "sdpa", "sdpa"),
    ],
)
def test_fastest_attention_is_chunked_for_native_cpu_half_precision_but_bf16_inference_with_amx(
    monkeypatch, device, precision, training, without_amx, with_amx
):
    """Where the CPU has kernels for the half precision, the chunked kernel trains in it and runs bf16 inference
    unless the CPU has AMX; SDPA runs everything else, and everything where the half precision is emulated."""
    for native in (True, False):
        monkeypatch.setattr(perf_echoai, "half_precision_is_native", lambda precision, native=native: native)
        for amx, expected in ((False, without_amx), (True, with_amx)):
            monkeypatch.setattr(perf_echoai, "cpu_has_amx", lambda amx=amx: amx)
            chosen = fastest_attention(device, precision, training)
            assert chosen == (expected if native else "sdpa"), f"native: {native}, AMX: {amx}"


def test_cpu_has_amx_follows_torch_and_is_false_where_torch_cannot_tell(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert perf_echoai.cpu_has_amx() is True
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert perf_echoai.cpu_has_amx() is False


@pytest.mark.parametrize("amx, inference", [(False, CHUNKED_ATTENTION), (True, "sdpa")])
def test_use_fastest_attention_sets_echoai_visibly_and_leaves_other_models_alone(monkeypatch, amx, inference):
    monkeypatch.setattr(perf_echoai, "cpu_has_amx", lambda: amx)
    monkeypatch.setattr(perf_echoai, "half_precision_is_native", lambda precision: True)
    model = build(EchoAIForVideoClassification, tiny_config(num_labels=1))
    x = clips(model.config)
    with torch.no_grad():
        before = model(x).logits
    use_fastest_attention(model, "cpu", "bf16", training=True)
    assert model.config._attn_implementation == CHUNKED_ATTENTION
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, rtol=1e-5, atol=1e-5)
    use_fastest_attention(model, "cpu", "bf16", training=False)
    assert model.config._attn_implementation == inference
    use_fastest_attention(model, "cpu", "no", training=False)
    assert model.config._attn_implementation == "sdpa"

    baseline = build_baseline("r2plus1d_18", base_width=4, stem_width=4)  # a CNN: no attention to choose
    use_fastest_attention(baseline, "cpu", "bf16", training=True)
    assert not hasattr(baseline.config, "_attn_implementation")


@pytest.mark.parametrize(
    "device, precision, native, warns",
    [
        ("cpu", "bf16", False, True),
        (torch.device("cpu"), "fp16", False, True),
        ("cpu", "bf16", True, False),
        ("cpu", "no", False, False),
        ("cpu", None, False, False),  # accelerate's default when nothing is configured
        ("cuda", "bf16", False, False),
    ],
)
def test_half_precision_warning_only_where_the_cpu_lacks_its_kernels(monkeypatch, caplog, device, precision, native,
                                                                     warns):  # fmt: skip
    monkeypatch.setattr(perf_echoai, "half_precision_is_native", lambda precision: native)
    with caplog.at_level(logging.WARNING, logger="perf_echoai"):
        assert perf_echoai.warn_if_half_precision_is_emulated(device, precision, "Run without --bf16.") is warns
    if warns:
        (record,) = caplog.records
        assert f"no {precision} kernels" in record.getMessage() and record.getMessage().endswith("without --bf16.")
    else:
        assert not caplog.records


def test_half_precision_is_native_asks_torch_and_assumes_native_when_torch_cannot_tell(monkeypatch):
    for precision in ("bf16", "fp16"):
        assert isinstance(half_precision_is_native(precision), bool)

    def unknown():
        raise RuntimeError("no such operator")

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", unknown)
    assert half_precision_is_native("bf16") is True
