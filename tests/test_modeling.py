"""Properties of the EchoAI models a user relies on: shapes, round trips, equivalences, masking, errors."""

import json
import os

import pytest
import torch
from einops import rearrange
from huggingface_hub.errors import StrictDataclassError
from remote_code import run_without_echoai
from transformers import AutoConfig, AutoModel, AutoModelForPreTraining, AutoModelForVideoClassification

from configuration_echoai import PRESETS, EchoAIConfig
from modeling_echoai import (
    CHUNKED_ATTENTION,
    EchoAIForPreTraining,
    EchoAIForVideoClassification,
    EchoAIModel,
    make_mask,
    masked_group_norm,
    patchify,
    select_positions,
    unpatchify,
)
from video_io_echoai import write_video
from video_processing_echoai import EchoAIVideoProcessor


def tiny_config(**overrides) -> EchoAIConfig:
    """A few thousand parameters: 4 frames of 32x32, tubelet 2, patch 8 -> 2 slices x 16 patches = 32 tokens."""
    fields = dict(
        image_size=32,
        patch_size=8,
        num_frames=4,
        tubelet_size=2,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        decoder_hidden_size=16,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
        mask_ratio=0.75,
    )
    fields.update(overrides)
    return EchoAIConfig(**fields)


def clips(config: EchoAIConfig, batch_size: int = 2, seed: int = 0, **geometry) -> torch.Tensor:
    frames = geometry.get("num_frames", config.num_frames)
    size = geometry.get("image_size", config.image_size)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, frames, config.num_channels, size, size, generator=generator)


def build(model_class, config, seed=0):
    torch.manual_seed(seed)
    return model_class(config).eval()


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_and_round_trip_as_plain_config_json(name, tmp_path):
    config = EchoAIConfig.from_preset(name)
    assert config.hidden_size == PRESETS[name]["hidden_size"]
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "echoai" and saved["hidden_size"] == config.hidden_size
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(reloaded, EchoAIConfig)
    ignored = {"_name_or_path", "auto_map"}  # where it was loaded from; written by save_pretrained
    assert {k: v for k, v in reloaded.to_dict().items() if k not in ignored} == {
        k: v for k, v in config.to_dict().items() if k not in ignored
    }


def test_a_config_edited_by_hand_is_validated_again_before_it_is_saved(tmp_path):
    config = tiny_config()
    config.num_frames = 5  # a valid type, so `@strict` lets the assignment through; the geometry is checked on save
    with pytest.raises(StrictDataclassError, match="num_frames=5 must be divisible by tubelet_size=2"):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_preset_overrides_and_unknown_preset():
    assert EchoAIConfig.from_preset("tiny", mask_ratio=0.8).mask_ratio == 0.8
    with pytest.raises(ValueError, match="Unknown EchoAI preset 'huge'"):
        EchoAIConfig.from_preset("huge")


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(image_size=100), r"image_size=100 must be divisible by patch_size=16"),
        (dict(num_frames=15), r"num_frames=15 must be divisible by tubelet_size=2"),
        (dict(hidden_size=100, num_attention_heads=6), r"hidden_size=100 must be divisible by num_attention_heads=6"),
        (dict(decoder_hidden_size=100), r"decoder_hidden_size=100 must be divisible by decoder_num_attention_heads"),
        (dict(mask_ratio=1.0), r"mask_ratio must lie in \(0, 1\), got 1.0"),
        (dict(mask_ratio=0.0), r"mask_ratio must lie in \(0, 1\), got 0.0"),
        (dict(mask_ratio=-0.5), r"mask_ratio must lie in \(0, 1\)"),
        (dict(mask_strategy="block"), r"Field 'mask_strategy' expected one of \('tube', 'random'\), got block"),
        (dict(patch_size=0), r"patch_size must be a positive integer, got 0"),
        (dict(drop_path_rate=1.5), r"drop_path_rate must lie in \[0, 1\)"),
        (dict(regression_loss="l3"), r"Field 'regression_loss' expected one of \('mse', 'l1', 'huber'\), got l3"),
        (dict(regression_target_std=0.0), r"regression_target_std must be positive"),
        (dict(stem_channels=[8, 8, 8, 8, 8]), r"patch_size=16 must be divisible by 2 \*\* len\(stem_channels\) = 32"),
        (dict(stem_channels=[]), r"stem_channels must be None or a non-empty list of positive integers"),
        (dict(stem_channels=[8, 0]), r"stem_channels must be None or a non-empty list of positive integers"),
        (dict(pooling="max"), r"Field 'pooling' expected one of \('mean', 'mean_max_min'\), got max"),
        (dict(patch_size=True), r"Field 'patch_size' expected int, got bool"),
    ],
)
def test_invalid_config_names_field_and_value(fields, message):
    # As transformers' configs: `@strict` reports a wrong type or `Literal` choice as a field error, and the value
    # checks of `validate_architecture` as a class-validation error; both name the field and the value.
    with pytest.raises(StrictDataclassError, match=message):
        EchoAIConfig(**fields)


# --------------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------------


def test_output_shapes_of_every_model():
    config = tiny_config()
    x = clips(config, batch_size=3)
    num_tokens, num_masked = 32, 2 * int(0.75 * 16)
    pixels_per_tubelet = 2 * 8 * 8 * 3

    encoded = build(EchoAIModel, config)(x, output_hidden_states=True)
    assert encoded.last_hidden_state.shape == (3, num_tokens, 32)
    assert len(encoded.hidden_states) == config.num_hidden_layers + 1
    assert all(h.shape == (3, num_tokens, 32) for h in encoded.hidden_states)

    pretrained = build(EchoAIForPreTraining, config)(x)
    assert pretrained.logits.shape == (3, num_masked, pixels_per_tubelet)
    # The mask comes back as ViTMAE's does: float, 1 = hidden.
    assert pretrained.mask.shape == (3, num_tokens) and pretrained.mask.dtype == torch.float32
    assert set(pretrained.mask.unique().tolist()) == {0.0, 1.0} and (pretrained.mask.sum(1) == num_masked).all()
    given = make_mask(3, (2, 4, 4), 0.75, generator=torch.Generator().manual_seed(5))
    returned = build(EchoAIForPreTraining, config)(x, bool_masked_pos=given).mask
    assert torch.equal(returned, given.float()), "the mask returned is the mask used"
    assert pretrained.loss.shape == () and torch.isfinite(pretrained.loss)

    regression = build(EchoAIForVideoClassification, tiny_config(num_labels=1))(x, labels=torch.tensor([50.0, 60, 30]))
    assert regression.logits.shape == (3, 1) and regression.loss.shape == ()

    one = build(EchoAIForVideoClassification, tiny_config(num_labels=1))(x[:1])
    assert one.logits.shape == (1, 1), "a batch of one keeps its (B, 1) shape"

    classification = build(EchoAIForVideoClassification, tiny_config(num_labels=3))(x, labels=torch.tensor([0, 2, 1]))
    assert classification.logits.shape == (3, 3) and classification.loss.shape == ()


def test_attentions_are_returned_with_eager_attention():
    config = tiny_config()
    config._attn_implementation = "eager"
    out = build(EchoAIModel, config)(clips(config), output_attentions=True)
    assert len(out.attentions) == config.num_hidden_layers
    assert out.attentions[0].shape == (2, config.num_attention_heads, 32, 32)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, 4, 32))


def test_encoder_sees_only_visible_tokens():
    config = tiny_config()
    model = build(EchoAIModel, config)
    mask = make_mask(2, (2, 4, 4), 0.75)
    out = model(clips(config), bool_masked_pos=mask)
    assert out.last_hidden_state.shape == (2, 32 - 24, 32)


# --------------------------------------------------------------------------------------------------
# Equivalences
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_class", [EchoAIModel, EchoAIForPreTraining, EchoAIForVideoClassification])
def test_save_load_round_trip_gives_identical_outputs(model_class, tmp_path):
    config = tiny_config(num_labels=1)
    model = build(model_class, config)
    x = clips(config)
    kwargs = {"bool_masked_pos": make_mask(2, (2, 4, 4), 0.75)} if model_class is EchoAIForPreTraining else {}
    with torch.no_grad():
        before = model(x, **kwargs)[0]
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists(), "weights are saved as safetensors"
    reloaded = model_class.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        after = reloaded(x, **kwargs)[0]
    # Equal up to float rounding: reloaded weights may sit at other memory alignments, which changes the
    # summation order of the vectorised matmul kernels (differences of ~1e-8).
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model_class", [EchoAIModel, EchoAIForPreTraining, EchoAIForVideoClassification])
def test_eager_sdpa_and_chunked_attention_agree(model_class):
    config = tiny_config(num_labels=1)
    x = clips(config)
    mask = make_mask(2, (2, 4, 4), 0.75)
    kwargs = {"bool_masked_pos": mask} if model_class is EchoAIForPreTraining else {}
    outputs = {}
    for implementation in ("eager", "sdpa", CHUNKED_ATTENTION):
        config._attn_implementation = implementation
        model = build(model_class, config)
        assert model.config._attn_implementation == implementation
        with torch.no_grad():
            outputs[implementation] = model(x, **kwargs)[0]
    torch.testing.assert_close(outputs["sdpa"], outputs["eager"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs[CHUNKED_ATTENTION], outputs["eager"], rtol=1e-5, atol=1e-5)


def test_every_attention_kernel_is_selectable_through_from_pretrained(tmp_path):
    build(EchoAIModel, tiny_config()).save_pretrained(tmp_path)
    assert AutoModel.from_pretrained(tmp_path).config._attn_implementation == "sdpa", "transformers' default"
    for implementation in ("eager", "sdpa", CHUNKED_ATTENTION):
        model = AutoModel.from_pretrained(tmp_path, attn_implementation=implementation)
        assert model.config._attn_implementation == implementation
        model.set_attn_implementation("eager")
        model.set_attn_implementation(implementation)
        assert model.config._attn_implementation == implementation
    # The kernel is a run-time choice: it is not written into the saved config.
    model.save_pretrained(tmp_path / "again")
    assert "attn_implementation" not in (tmp_path / "again" / "config.json").read_text()


def test_one_sample_alone_equals_it_inside_a_batch():
    config = tiny_config(num_labels=1)
    x = clips(config, batch_size=4)
    mask = make_mask(4, (2, 4, 4), 0.75, generator=torch.Generator().manual_seed(1))
    encoder = build(EchoAIModel, config)
    pretraining = build(EchoAIForPreTraining, config)
    regression = build(EchoAIForVideoClassification, config)
    with torch.no_grad():
        torch.testing.assert_close(
            encoder(x[2:3]).last_hidden_state, encoder(x).last_hidden_state[2:3], atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            pretraining(x[2:3], bool_masked_pos=mask[2:3]).logits,
            pretraining(x, bool_masked_pos=mask).logits[2:3],
            atol=1e-5,
            rtol=1e-5,
        )
        torch.testing.assert_close(regression(x[2:3]).logits, regression(x).logits[2:3], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_class", [EchoAIForPreTraining, EchoAIForVideoClassification])
def test_gradient_checkpointing_gives_the_same_gradients(model_class):
    config = tiny_config(num_labels=1)
    x = clips(config)
    kwargs = (
        {"bool_masked_pos": make_mask(2, (2, 4, 4), 0.75)}
        if model_class is EchoAIForPreTraining
        else {"labels": torch.tensor([40.0, 70.0])}
    )
    grads = []
    for checkpointing in (False, True):
        model = build(model_class, config).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.is_activation_checkpointing
        model(x, **kwargs).loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-6, atol=1e-7, msg=name)


# --------------------------------------------------------------------------------------------------
# Masking and pretraining
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
def test_tube_mask_hides_the_same_patches_in_every_slice(ratio):
    mask = make_mask(3, (4, 5, 5), ratio, "tube", generator=torch.Generator().manual_seed(0))
    assert mask.shape == (3, 4 * 25)
    assert (mask.sum(1) == 4 * int(ratio * 25)).all()
    per_slice = mask.view(3, 4, 25)
    assert (per_slice == per_slice[:, :1]).all(), "tube masking repeats one spatial mask over time"


def test_random_mask_count_and_independence_over_time():
    mask = make_mask(3, (4, 5, 5), 0.9, "random", generator=torch.Generator().manual_seed(0))
    assert (mask.sum(1) == int(0.9 * 100)).all()
    per_slice = mask.view(3, 4, 25)
    assert not (per_slice == per_slice[:, :1]).all()


def test_model_draws_its_mask_reproducibly():
    config = tiny_config()
    model = build(EchoAIForPreTraining, config)
    x = clips(config)
    torch.manual_seed(7)
    first = model(x)
    torch.manual_seed(7)
    second = model(x)
    assert torch.equal(first.mask, second.mask)
    torch.testing.assert_close(first.loss, second.loss, rtol=0, atol=0)
    assert first.mask.sum(1).tolist() == [2 * int(0.75 * 16)] * 2
    a = model.make_mask(x, generator=torch.Generator().manual_seed(3))
    b = model.make_mask(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert not torch.equal(a, model.make_mask(x, generator=torch.Generator().manual_seed(4)))


def test_position_table_gradients_are_bit_identical_from_run_to_run():
    """Every sample selects rows of the same position table, so the backward sums repeated rows; it must sum them
    in a fixed order. The backward of `table[index]` on CPU did not with several threads, and two runs of one
    pretraining command drifted apart by a rounding per step (docs/EXPERIMENTS.md, item 61)."""
    torch.set_num_threads(2)  # the race needs threads; conftest restores the default
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(392, 64, generator=generator, requires_grad=True)  # the tiny preset's decoder: 8 x 7 x 7
    keep = make_mask(8, (8, 7, 7), 0.9, "tube", generator=generator)  # the hidden rows the mask tokens take
    upstream = torch.randn(8, int(keep[0].sum()), 64, generator=generator)
    gradients = []
    for _ in range(10):
        table.grad = None
        selected = select_positions(table, keep)
        (selected * upstream).sum().backward()
        gradients.append(table.grad.clone())
    assert torch.equal(selected, table[keep.nonzero()[:, 1]].view_as(selected))
    assert all(torch.equal(gradients[0], gradient) for gradient in gradients[1:])


def test_random_mask_strategy_is_used_by_the_model():
    model = build(EchoAIForPreTraining, tiny_config(mask_strategy="random"))
    mask = model.make_mask(clips(model.config, batch_size=8), generator=torch.Generator().manual_seed(0))
    assert (mask.sum(1) == int(0.75 * 32)).all()
    assert not (mask.view(8, 2, 16)[:, 0] == mask.view(8, 2, 16)[:, 1]).all()


def test_patchify_round_trip_and_layout_matches_the_tubelet_convolution():
    x = torch.randn(2, 4, 3, 32, 32)
    patches = patchify(x, 2, 8)
    assert patches.shape == (2, 32, 2 * 8 * 8 * 3)
    torch.testing.assert_close(unpatchify(patches, 2, 8, (2, 4, 4)), x, rtol=0, atol=0)
    # Token k = (slice, row, column) must be the same tubelet the Conv3d embeds as token k.
    conv = torch.nn.Conv3d(3, 1, kernel_size=(2, 8, 8), stride=(2, 8, 8), bias=False)
    conv_tokens = conv(x.permute(0, 2, 1, 3, 4)).flatten(1)  # (B, L)
    weights = conv.weight[0].permute(1, 2, 3, 0).reshape(-1)  # (t p q c), patchify's pixel order
    torch.testing.assert_close(patches @ weights, conv_tokens, rtol=1e-5, atol=1e-5)


def test_loss_is_norm_pix_mse_on_masked_tubelets_only():
    config = tiny_config()
    model = build(EchoAIForPreTraining, config)
    x = clips(config)
    mask = make_mask(2, (2, 4, 4), 0.75, generator=torch.Generator().manual_seed(0))
    out = model(x, bool_masked_pos=mask)
    patches = patchify(x, 2, 8)[mask].view(2, -1, 384)
    target = (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(out.loss, ((out.logits - target) ** 2).mean())
    # Pixels of visible tubelets are never scored: changing them cannot change the target.
    changed = patchify(x, 2, 8).clone()
    changed[~mask] = 100.0
    torch.testing.assert_close(model.reconstruction_target(unpatchify(changed, 2, 8, (2, 4, 4)), mask), target)


def test_single_channel_and_raw_pixel_loss():
    config = tiny_config(num_channels=1, norm_pix_loss=False)
    model = build(EchoAIForPreTraining, config)
    x = clips(config)
    mask = make_mask(2, (2, 4, 4), 0.75)
    out = model(x, bool_masked_pos=mask)
    assert out.logits.shape == (2, 24, 2 * 8 * 8 * 1)
    torch.testing.assert_close(out.loss, ((out.logits - patchify(x, 2, 8)[mask].view(2, 24, -1)) ** 2).mean())


@pytest.mark.parametrize("target", ["pixels", "motion"])
def test_reconstruct_with_a_perfect_prediction_returns_the_input(target):
    config = tiny_config(reconstruction_target=target)
    model = build(EchoAIForPreTraining, config)
    x = clips(config)
    mask = make_mask(2, (2, 4, 4), 0.75)
    perfect = model.reconstruction_target(x, mask)
    masked, reconstruction = model.reconstruct(x, perfect, mask)
    assert masked.shape == reconstruction.shape == x.shape
    torch.testing.assert_close(reconstruction, x, atol=1e-4, rtol=1e-4)
    visible = ~mask.view(2, 2, 1, 4, 1, 4, 1).expand(2, 2, 2, 4, 8, 4, 8).reshape(2, 4, 1, 32, 32)
    torch.testing.assert_close(masked, x * visible)


def test_a_pooled_target_is_each_frames_block_averages_normalised_per_tubelet():
    config = tiny_config(reconstruction_target_pool=4)
    model = build(EchoAIForPreTraining, config)
    x = clips(config)
    mask = make_mask(2, (2, 4, 4), 0.75, generator=torch.Generator().manual_seed(0))
    out = model(x, bool_masked_pos=mask)
    assert model.decoder.head.out_features == out.logits.shape[-1] == 2 * 2 * 2 * 3  # t (p / k)² c
    # Token (slice 0, row 1, column 2), frame 1, block (0, 1): the mean of its 4 x 4 pixels, per channel.
    blocks = x.unflatten(3, (8, 4)).unflatten(5, (8, 4)).mean(dim=(4, 6))  # (B, T, C, 8, 8)
    token = 1 * 4 + 2
    raw = rearrange(blocks[:, :2, :, 2:4, 4:6], "b t c p q -> b (t p q c)")
    target = (raw - raw.mean(-1, keepdim=True)) / (raw.var(-1, keepdim=True) + 1e-6).sqrt()
    row = int(mask[0, :token].sum())  # the token's place among sample 0's hidden tubelets
    assert mask[0, token]
    torch.testing.assert_close(model.reconstruction_target(x, mask)[0, row], target[0])
    # A perfect prediction reconstructs every hidden tubelet as its block averages, visible ones untouched.
    _, reconstruction = model.reconstruct(x, model.reconstruction_target(x, mask), mask)
    averages = blocks.repeat_interleave(4, dim=3).repeat_interleave(4, dim=4)
    hidden = mask.view(2, 2, 1, 4, 1, 4, 1).expand(2, 2, 2, 4, 8, 4, 8).reshape(2, 4, 1, 32, 32)
    torch.testing.assert_close(reconstruction, torch.where(hidden, averages, x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_a_motion_target_is_each_frame_minus_the_clips_mean_frame(norm_pix_loss):
    config = tiny_config(reconstruction_target="motion", norm_pix_loss=norm_pix_loss)
    model = build(EchoAIForPreTraining, config)
    x = clips(config)
    mask = make_mask(2, (2, 4, 4), 0.75, generator=torch.Generator().manual_seed(0))
    residual = patchify(x - x.mean(dim=1, keepdim=True), config.tubelet_size, config.patch_size)
    expected = rearrange(residual[mask], "(b m) p -> b m p", b=2)
    if norm_pix_loss:
        expected = (expected - expected.mean(-1, keepdim=True)) / (expected.var(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(model.reconstruction_target(x, mask), expected)
    # A still clip (one frame repeated) has nothing to predict, however bright or textured the frame.
    still = x[:, :1].expand_as(x) * 3.0 + 1.0
    torch.testing.assert_close(model.reconstruction_target(still, mask), torch.zeros_like(expected))
    # Without the mean frame added back, a perfect prediction reconstructs the motion itself where tubelets hide.
    _, motion = model.reconstruct(x, model.reconstruction_target(x, mask), mask, add_static=False)
    hidden = mask.view(2, 2, 1, 4, 1, 4, 1).expand(2, 2, 2, 4, 8, 4, 8).reshape(2, 4, 1, 32, 32)
    torch.testing.assert_close(motion, torch.where(hidden, x - x.mean(dim=1, keepdim=True), x), atol=1e-4, rtol=1e-4)


def test_a_hog_target_bins_each_edge_by_its_orientation_whatever_the_gain():
    config = tiny_config(reconstruction_target="hog", reconstruction_target_pool=4, norm_pix_loss=False)
    model = build(EchoAIForPreTraining, config)
    assert model.decoder.head.out_features == 2 * 2 * 2 * 9  # t (p / k)² orientation bins
    # A vertical edge (brightness steps along x) has horizontal gradients: orientation 0, the first bin; a
    # horizontal edge (along y) orientation pi / 2, the fifth of the nine 20-degree bins.
    x = torch.zeros(1, 4, 3, 32, 32)
    x[..., :, 12:] = 1.0
    y = x.transpose(-1, -2)
    mask = torch.ones(1, 32, dtype=torch.bool)
    mask[0, 0] = False  # hide every tubelet but one
    for clip, bin_ in ((x, 0), (y, 4)):
        target = model.reconstruction_target(clip, mask)  # (1, 31, t (p / k)² 9)
        bins = target.unflatten(-1, (-1, 9))  # (1, 31, t (p / k)², 9): each cell's histogram
        assert bins.sum() > 0
        torch.testing.assert_close(bins.sum(dim=(0, 1, 2)), bins[..., bin_].sum() * torch.eye(9)[bin_])
    # Each tubelet frame's histograms have unit norm (or are zero where the frame is flat), and a change of gain
    # and offset leaves the target as it was.
    x = clips(config)
    mask = make_mask(2, (2, 4, 4), 0.75, generator=torch.Generator().manual_seed(0))
    target = model.reconstruction_target(x, mask)
    torch.testing.assert_close(target.unflatten(-1, (2, -1)).norm(dim=-1), torch.ones(2, 24, 2))
    torch.testing.assert_close(model.reconstruction_target(3.0 * x + 1.0, mask), target, atol=1e-5, rtol=1e-5)
    # The model trains on it, and has no pixels to reconstruct.
    loss = model.train()(x, bool_masked_pos=mask).loss
    loss.backward()
    assert loss > 0 and model.decoder.head.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="predicts gradient histograms, which have no pixels to draw"):
        model.reconstruct(x, target, mask)


def test_a_hog_target_needs_norm_pix_loss_off():
    with pytest.raises(Exception, match="reconstruction_target='hog' is normalised per tubelet frame already"):
        tiny_config(reconstruction_target="hog", reconstruction_target_pool=4)


def test_the_target_pool_must_divide_the_patch():
    with pytest.raises(Exception, match="reconstruction_target_pool=3 must be a positive divisor of patch_size=8"):
        tiny_config(reconstruction_target_pool=3)


def test_one_pretraining_step_lowers_the_loss_on_the_same_batch():
    config = tiny_config()
    model = build(EchoAIForPreTraining, config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, mask = clips(config), make_mask(2, (2, 4, 4), 0.75)
    losses = []
    for _ in range(5):
        loss = model(x, bool_masked_pos=mask).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0]


# --------------------------------------------------------------------------------------------------
# Position embeddings
# --------------------------------------------------------------------------------------------------


def test_shuffling_frame_order_changes_the_encoding():
    config = tiny_config(num_frames=8)
    model = build(EchoAIModel, config)
    x = clips(config, batch_size=1)
    reversed_slices = x.view(1, 4, 2, 3, 32, 32).flip(1).reshape_as(x)
    with torch.no_grad():
        a = model(x).last_hidden_state.mean(1)
        b = model(reversed_slices).last_hidden_state.mean(1)
    assert (a - b).abs().max() > 1e-3, "temporal embeddings must make frame order matter"


@pytest.mark.parametrize("num_frames, image_size", [(8, 32), (4, 48), (8, 48), (2, 16)])
def test_interpolated_position_encoding_runs_and_stays_finite(num_frames, image_size):
    config = tiny_config(num_labels=1)
    x = clips(config, num_frames=num_frames, image_size=image_size)
    tokens = (num_frames // 2) * (image_size // 8) ** 2
    with torch.no_grad():
        encoded = build(EchoAIModel, config)(x, interpolate_pos_encoding=True).last_hidden_state
        pretrained = build(EchoAIForPreTraining, config)(x, interpolate_pos_encoding=True)
        regression = build(EchoAIForVideoClassification, config)(x, interpolate_pos_encoding=True)
    assert encoded.shape == (2, tokens, 32) and torch.isfinite(encoded).all()
    assert pretrained.mask.shape == (2, tokens) and torch.isfinite(pretrained.loss)
    assert regression.logits.shape == (2, 1) and torch.isfinite(regression.logits).all()


def test_interpolation_is_identity_at_the_native_geometry():
    config = tiny_config()
    model = build(EchoAIModel, config)
    x = clips(config)
    with torch.no_grad():
        torch.testing.assert_close(model(x, interpolate_pos_encoding=True)[0], model(x)[0], rtol=0, atol=0)


def test_interpolated_tables_stay_separable_and_resample_each_axis():
    """Time is resampled only along time and space only along space: the table for a new grid is still
    temporal[t] + spatial[n], with a smooth temporal ramp staying a ramp and a constant staying constant."""
    config = tiny_config(num_frames=8)  # T'0 = 4 slices, 4x4 grid
    embeddings = build(EchoAIModel, config).embeddings.position_embeddings
    with torch.no_grad():
        embeddings.temporal.copy_(torch.arange(4.0)[:, None].expand(4, 32))  # 0, 1, 2, 3 over time
        embeddings.spatial.fill_(5.0)
        table = embeddings((8, 6, 6)).view(8, 36, 32)
    torch.testing.assert_close(table, table[:, :1].expand_as(table), msg="space must not leak into time")
    values = table[:, 0, 0]
    assert torch.all(values.diff() >= 0) and values.min() > 5.0 - 1e-5 and values.max() < 8.0 + 1e-5
    steps = values.diff()  # 4 slices stretched over 8: a ramp of slope 1/2 per slice away from the clamped ends
    torch.testing.assert_close(steps[1:-1], torch.full((5,), 0.5))
    # Down-sampling a linear ramp to 2 slices gives the means of each half (cell-centred resampling).
    with torch.no_grad():
        down = embeddings((2, 4, 4)).view(2, 16, 32)[:, 0, 0]
    torch.testing.assert_close(down, torch.tensor([5.5, 7.5]))


# --------------------------------------------------------------------------------------------------
# Heads and loading
# --------------------------------------------------------------------------------------------------


def test_regression_head_predicts_in_target_units_and_trains_on_unit_scale():
    config = tiny_config(num_labels=1, regression_target_mean=55.0, regression_target_std=12.0)
    model = build(EchoAIForVideoClassification, config)
    x, labels = clips(config), torch.tensor([40.0, 70.0])
    out = model(x, labels=labels)
    with torch.no_grad():
        head = model.forward_head(model.echoai(x).last_hidden_state, num_slices=x.shape[1] // config.tubelet_size)
    torch.testing.assert_close(out.logits, head * 12.0 + 55.0)
    torch.testing.assert_close(out.loss, ((head.view(-1) - (labels - 55.0) / 12.0) ** 2).mean())


@pytest.mark.parametrize(
    "kind, reference", [("l1", torch.nn.functional.l1_loss), ("huber", torch.nn.functional.huber_loss)]
)
def test_selectable_regression_losses(kind, reference):
    model = build(EchoAIForVideoClassification, tiny_config(num_labels=1, regression_loss=kind))
    x, labels = clips(model.config), torch.tensor([1.5, -0.5])
    out = model(x, labels=labels)
    torch.testing.assert_close(out.loss, reference(out.logits.view(-1), labels))


def test_pretraining_checkpoint_loads_into_the_classifier_with_its_encoder(tmp_path):
    config = tiny_config()
    pretrained = build(EchoAIForPreTraining, config)
    pretrained.save_pretrained(tmp_path)
    classifier = AutoModelForVideoClassification.from_pretrained(tmp_path, num_labels=1)
    assert isinstance(classifier, EchoAIForVideoClassification)
    source = pretrained.echoai.state_dict()
    for name, value in classifier.echoai.state_dict().items():
        torch.testing.assert_close(value, source[name], rtol=0, atol=0, msg=name)
    assert torch.isfinite(classifier.classifier.weight).all()


def test_auto_classes_resolve_to_echoai(tmp_path):
    config = tiny_config()
    for auto, model_class in [
        (AutoModel, EchoAIModel),
        (AutoModelForPreTraining, EchoAIForPreTraining),
        (AutoModelForVideoClassification, EchoAIForVideoClassification),
    ]:
        assert type(auto.from_config(config)) is model_class


def test_saved_folder_loads_as_remote_code_without_echoai_installed(tmp_path):
    """A Hub user who never installed EchoAI loads a checkpoint and its processor with `trust_remote_code=True`."""
    config = tiny_config(num_labels=1)
    model = build(EchoAIForVideoClassification, config)
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    EchoAIVideoProcessor(num_frames=4, image_size=32, image_mean=0.25, image_std=0.5).save_pretrained(checkpoint)
    saved = json.loads((checkpoint / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForVideoClassification"] == "modeling_echoai.EchoAIForVideoClassification"
    assert {
        "modeling_echoai.py",
        "configuration_echoai.py",
        "video_processing_echoai.py",
        "video_io_echoai.py",
    } <= set(os.listdir(checkpoint))
    x = clips(config)
    torch.save(x, tmp_path / "x.pt")
    write_video(tmp_path / "clip.mp4", torch.randint(0, 255, (10, 32, 32), dtype=torch.uint8).numpy())
    with torch.no_grad():
        torch.save(model(x).logits, tmp_path / "expected.pt")

    stdout = run_without_echoai(
        f"""
        import torch
        from transformers import AutoModelForVideoClassification, AutoModelForPreTraining
        from transformers.models.auto.video_processing_auto import AutoVideoProcessor
        model = AutoModelForVideoClassification.from_pretrained({str(checkpoint)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            logits = model(torch.load({str(tmp_path / "x.pt")!r})).logits
        torch.testing.assert_close(logits, torch.load({str(tmp_path / "expected.pt")!r}), rtol=1e-6, atol=1e-6)
        # The chunked attention kernel is registered when the remote modeling file is imported, so it can be named.
        chunked = AutoModelForVideoClassification.from_pretrained(
            {str(checkpoint)!r}, trust_remote_code=True, attn_implementation={CHUNKED_ATTENTION!r}
        ).eval()
        assert chunked.config._attn_implementation == {CHUNKED_ATTENTION!r}
        with torch.no_grad():
            chunked_logits = chunked(torch.load({str(tmp_path / "x.pt")!r})).logits
        torch.testing.assert_close(chunked_logits, logits, rtol=1e-5, atol=1e-5)
        pretraining = AutoModelForPreTraining.from_pretrained({str(checkpoint)!r}, trust_remote_code=True)
        assert type(pretraining).__name__ == "EchoAIForPreTraining"
        processor = AutoVideoProcessor.from_pretrained({str(checkpoint)!r}, trust_remote_code=True)
        assert type(processor).__name__ == "EchoAIVideoProcessor" and processor.image_mean == [0.25] * 3
        assert processor({str(tmp_path / "clip.mp4")!r})["pixel_values"].shape == (1, 4, 3, 32, 32)  # decodes
        print("remote code OK")
        """,
        tmp_path,
    )
    assert "remote code OK" in stdout


# --------------------------------------------------------------------------------------------------
# Errors a user can hit
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, message",
    [
        ((4, 3, 32, 32), r"must be a 5-D tensor .* got \(4, 3, 32, 32\)"),
        ((2, 4, 1, 32, 32), r"has 1 channels .* num_channels=3"),
        ((2, 3, 3, 32, 32), r"3 frames, not divisible by tubelet_size=2"),
        ((2, 4, 3, 30, 30), r"30x30 is not divisible by patch_size=8"),
        (
            (2, 8, 3, 32, 32),
            r"8 frames of 32x32 but the model was built for 4 frames of 32x32. Pass interpolate_pos_encoding=True",
        ),
        ((2, 4, 3, 48, 48), r"interpolate_pos_encoding=True"),
    ],
)
def test_bad_pixel_values_raise_clear_errors(shape, message):
    config = tiny_config(num_labels=1)
    for model_class in (EchoAIModel, EchoAIForPreTraining, EchoAIForVideoClassification):
        with pytest.raises(ValueError, match=message):
            build(model_class, config)(torch.randn(*shape))


def test_bad_masks_raise_clear_errors():
    config = tiny_config()
    model = build(EchoAIForPreTraining, config)
    x = clips(config)
    unequal = torch.zeros(2, 32, dtype=torch.bool)
    unequal[0, :24], unequal[1, :20] = True, True
    with pytest.raises(ValueError, match=r"different number of tokens per sample \(\[24, 20\]\)"):
        model(x, bool_masked_pos=unequal)
    with pytest.raises(ValueError, match=r"shape \(2, 30\), expected \(batch, tokens\) = \(2, 32\)"):
        model(x, bool_masked_pos=torch.zeros(2, 30, dtype=torch.bool))
    with pytest.raises(ValueError, match="must be a bool tensor"):
        model(x, bool_masked_pos=torch.zeros(2, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="hides every token"):
        model(x, bool_masked_pos=torch.ones(2, 32, dtype=torch.bool))


def test_resized_position_embeddings_match_interpolation_and_survive_save_load(tmp_path):
    """A 4-frame 32 px checkpoint made into an 8-frame 48 px model predicts what the original predicts with
    `interpolate_pos_encoding=True`, and saves and reloads at the new geometry."""
    config = tiny_config(num_labels=1)
    model = build(EchoAIForVideoClassification, config)
    x = clips(config, num_frames=8, image_size=48)
    with torch.no_grad():
        expected = model(x, interpolate_pos_encoding=True).logits
    model.resize_position_embeddings(num_frames=8, image_size=48)
    assert (model.config.num_frames, model.config.image_size) == (8, 48)
    assert model.echoai.embeddings.position_embeddings.temporal.shape == (4, 32)
    assert model.echoai.embeddings.position_embeddings.spatial.shape == (36, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = EchoAIForVideoClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(StrictDataclassError, match="num_frames=7 must be divisible by tubelet_size=2"):
        model.resize_position_embeddings(num_frames=7)
    pretraining = build(EchoAIForPreTraining, config)
    pretraining.resize_position_embeddings(num_frames=8)
    assert pretraining.decoder_position_embeddings.temporal.shape == (4, 16)


def test_masked_and_whole_clip_embedding_paths_agree():
    """The whole-clip convolution and the visible-tubelet matmul are the same linear map."""
    config = tiny_config()
    embeddings = build(EchoAIModel, config).embeddings
    x = clips(config)
    mask = make_mask(2, (2, 4, 4), 0.75, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = embeddings(x)  # (B, L, D)
        visible = embeddings(x, bool_masked_pos=mask)  # (B, V, D)
    torch.testing.assert_close(visible, whole[~mask].view(2, -1, 32), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Convolutional stem and pooling over the clip's extreme states
# --------------------------------------------------------------------------------------------------


def stem_config(**overrides) -> EchoAIConfig:
    return tiny_config(stem_channels=[4, 6], pooling="mean_max_min", num_labels=1, **overrides)


def test_stem_keeps_the_token_grid_and_every_model_runs():
    config = stem_config()
    x = clips(config)
    assert build(EchoAIModel, config)(x).last_hidden_state.shape == (2, 32, 32)
    assert build(EchoAIForVideoClassification, config)(x).logits.shape == (2, 1)
    mask = make_mask(2, (2, 4, 4), 0.75)
    out = build(EchoAIForPreTraining, config)(x, bool_masked_pos=mask)
    assert out.logits.shape == (2, 24, 2 * 8 * 8 * 3) and torch.isfinite(out.loss)


def test_stem_hides_masked_pixels_from_the_visible_tokens():
    """With overlapping convolutions a visible token could see into a hidden neighbour; the hidden tubelets are
    zeroed first, so changing their pixels leaves every visible token's encoding as it was."""
    config = stem_config()
    model = build(EchoAIModel, config)
    x = clips(config)
    mask = make_mask(2, (2, 4, 4), 0.75, generator=torch.Generator().manual_seed(3))
    hidden = rearrange(mask, "b (T h w) -> b T 1 1 h 1 w 1", T=2, h=4, w=4)
    noise = rearrange(torch.randn_like(x), "b (T t) c (h p) (w q) -> b T t c h p w q", t=2, p=8, q=8)
    changed = x + rearrange(noise * hidden, "b T t c h p w q -> b (T t) c (h p) (w q)")
    with torch.no_grad():
        torch.testing.assert_close(model(changed, bool_masked_pos=mask)[0], model(x, bool_masked_pos=mask)[0])
        # ... and the same pixels do change the encoding when nothing is hidden.
        assert not torch.allclose(model(changed)[0], model(x)[0])


def test_stem_under_an_empty_mask_is_the_unmasked_stem():
    """The sparse (masked) stem path computes what the plain one does when nothing is hidden."""
    config = stem_config()
    model = build(EchoAIModel, config)
    x = clips(config)
    nothing_hidden = torch.zeros(2, 32, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(model(x, bool_masked_pos=nothing_hidden)[0], model(x)[0], atol=1e-5, rtol=1e-5)


def test_masked_group_norm_takes_its_statistics_over_the_visible_positions_only():
    """Under a mask each stem normalisation sees the visible positions alone: a clip whose hidden part is cut
    away normalises its visible part exactly as the whole visible region would on its own."""
    norm = torch.nn.GroupNorm(3, 3)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0), norm.bias.uniform_(-1.0, 1.0)
    x = torch.randn(2, 3, 4, 6, 6) * 5 + 2
    keep = torch.zeros(2, 1, 4, 6, 6)
    keep[..., :, :3] = 1.0  # the left half visible
    masked = masked_group_norm(x, keep, norm)
    torch.testing.assert_close(masked[..., :3], norm(x[..., :3]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked_group_norm(x, torch.ones_like(keep), norm), norm(x), atol=1e-5, rtol=1e-5)


def test_stem_model_equivalences_batch_attention_and_reload(tmp_path):
    config = stem_config()
    x = clips(config, batch_size=3)
    model = build(EchoAIForVideoClassification, config)
    with torch.no_grad():
        whole = model(x).logits
        torch.testing.assert_close(model(x[1:2]).logits, whole[1:2], atol=1e-5, rtol=1e-5)
        config._attn_implementation = "eager"
        eager = build(EchoAIForVideoClassification, config)
        torch.testing.assert_close(eager(x).logits, whole, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = EchoAIForVideoClassification.from_pretrained(tmp_path).eval()
    assert reloaded.config.stem_channels == [4, 6] and reloaded.config.pooling == "mean_max_min"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, whole, rtol=1e-6, atol=1e-6)


def test_mean_max_min_pooling_is_the_slice_means_extremes():
    config = stem_config()
    model = build(EchoAIForVideoClassification, config)
    tokens = torch.randn(2, 32, 32)  # (B, L = 2 slices x 16 patches, D)
    slices = tokens.view(2, 2, 16, 32).mean(dim=2)  # (B, T', D)
    expected = torch.cat([slices.mean(1), slices.max(1).values, slices.min(1).values], dim=-1)
    torch.testing.assert_close(model.pool(tokens, 2), expected)
    assert model.classifier.in_features == 3 * config.hidden_size
    # Reversing the clip in time leaves the pooled extremes unchanged: they do not depend on where in the
    # clip the largest and smallest states fall.
    reversed_tokens = tokens.view(2, 2, 16, 32).flip(1).reshape(2, 32, 32)
    torch.testing.assert_close(model.pool(reversed_tokens, 2), expected)


def test_tiny_preset_is_the_recipe_that_reads_ef():
    """The README and docs/EXPERIMENTS.md describe this recipe; the scripts build `tiny` from the preset."""
    config, small = EchoAIConfig.from_preset("tiny"), EchoAIConfig.from_preset("small")
    assert config.stem_channels == [24, 48, 96] and config.pooling == "mean_max_min"
    assert small.stem_channels is None  # plain ViViT until measured at that scale
    # Pretraining: the best-measured start at this scale, MaskFeat's target in 4 x 4 cells under random masks;
    # `small` keeps VideoMAE's normalised pixels under tube masks.
    assert (config.reconstruction_target, config.reconstruction_target_pool) == ("hog", 4)
    assert config.mask_strategy == "random" and not config.norm_pix_loss
    assert (small.reconstruction_target, small.mask_strategy, small.norm_pix_loss) == ("pixels", "tube", True)
