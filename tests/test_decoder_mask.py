"""Decoder masking (`decoder_mask_ratio`, VideoMAE V2's dual masking): the decoder predicts, and the loss covers,
only a sampled part of the hidden tubelets; off (0.0) it is the full decoder, value for value."""

import shutil
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors.torch import load_file

from modeling_echoai import EchoAIForPreTraining, make_decoder_mask, make_mask, patchify
from training_echoai import save_reconstruction
from video_processing_echoai import EchoAIVideoProcessor


sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_fixtures import tiny_corpus  # noqa: E402
from test_modeling import build, clips, tiny_config  # noqa: E402
from test_training import load_script, pretrain_argv  # noqa: E402


GRID = (2, 4, 4)  # tiny_config's token grid: 32 tokens; its 0.75 tube mask hides M = 24


def masks(batch_size: int = 2, seed: int = 0, strategy: str = "tube") -> torch.BoolTensor:
    return make_mask(batch_size, GRID, 0.75, strategy, generator=torch.Generator().manual_seed(seed))


def step(model: EchoAIForPreTraining, x: torch.Tensor, mask: torch.BoolTensor, decoder_mask=None):
    return model(pixel_values=x, bool_masked_pos=mask, decoder_bool_masked_pos=decoder_mask)


# --------------------------------------------------------------------------------------------------
# Off, and the full decoder
# --------------------------------------------------------------------------------------------------


def test_ratio_zero_is_the_full_decoder_and_draws_nothing():
    model, x, mask = build(EchoAIForPreTraining, tiny_config()).train(), clips(tiny_config()), masks()
    generator = torch.Generator().manual_seed(5)
    state = generator.get_state()
    assert model.make_decoder_mask(mask, generator=generator) is None
    assert torch.equal(generator.get_state(), state), "a seeded run's generator is left as it was"

    plain = step(model, x, mask)
    assert plain.decoder_mask is None and plain.logits.shape == (2, 24, 8 * 8 * 2 * 3)
    keep_all = step(model, x, mask, torch.zeros_like(mask))  # the decoder-mask path, leaving nothing out
    assert torch.equal(keep_all.logits, plain.logits) and torch.equal(keep_all.loss, plain.loss)
    assert not keep_all.decoder_mask.any()


@pytest.mark.parametrize("decoder_mask", ["visible_only", "ratio_below_one_token"])
def test_a_decoder_mask_that_leaves_no_hidden_tubelet_out_gives_the_full_decoder(decoder_mask):
    config = tiny_config(decoder_mask_ratio=0.02)  # int(0.02 * 24) = 0 tubelets left out
    model, x, mask = build(EchoAIForPreTraining, config).train(), clips(config), masks()
    full = step(model, x, mask, torch.zeros_like(mask))
    if decoder_mask == "visible_only":  # entries at visible tokens are ignored: they always enter the decoder
        masked = step(model, x, mask, ~mask)
    else:
        masked = step(model, x, mask)
    torch.testing.assert_close(masked.logits, full.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(masked.loss, full.loss, rtol=0, atol=1e-6)


def test_eval_mode_runs_the_full_decoder_and_the_ratio_changes_no_weight():
    """Held-out losses and pictures cover every hidden tubelet, whatever ratio the model was trained with."""
    x, mask = clips(tiny_config()), masks()
    plain = build(EchoAIForPreTraining, tiny_config())
    dual = build(EchoAIForPreTraining, tiny_config(decoder_mask_ratio=0.5))
    ours, theirs = step(dual, x, mask), step(plain, x, mask)
    assert ours.decoder_mask is None and torch.equal(ours.logits, theirs.logits)


# --------------------------------------------------------------------------------------------------
# What the decoder predicts and what the loss covers
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.9])
@pytest.mark.parametrize("strategy", ["tube", "random"])
def test_the_decoder_predicts_k_hidden_tubelets_per_sample(ratio, strategy):
    config = tiny_config(decoder_mask_ratio=ratio, mask_strategy=strategy)
    model, x, mask = build(EchoAIForPreTraining, config).train(), clips(config, batch_size=3), masks(3, 1, strategy)
    outputs = step(model, x, mask)
    left_out = int(ratio * 24)
    assert outputs.logits.shape == (3, 24 - left_out, 8 * 8 * 2 * 3)
    decoder_mask = outputs.decoder_mask.bool()
    assert decoder_mask.sum(dim=1).tolist() == [left_out] * 3
    assert not (decoder_mask & ~mask).any(), "only hidden tubelets are left out"
    assert torch.equal(outputs.mask.bool(), mask)


def norm_pix_target(x: torch.Tensor, keep: torch.BoolTensor) -> torch.Tensor:
    """MAE's per-tubelet normalised pixels of the `keep` tubelets, (B, K, P), written out by hand."""
    patches = patchify(x, 2, 8)[keep].view(x.shape[0], -1, 8 * 8 * 2 * 3)
    mean, variance = patches.mean(dim=-1, keepdim=True), patches.var(dim=-1, unbiased=True, keepdim=True)
    return (patches - mean) / (variance + 1e-6).sqrt()


def test_the_loss_is_the_mean_squared_error_over_exactly_the_predicted_tubelets():
    config = tiny_config(decoder_mask_ratio=0.5)
    model, x, mask = build(EchoAIForPreTraining, config).train(), clips(config), masks()
    outputs = step(model, x, mask)
    predicted = mask & ~outputs.decoder_mask.bool()
    per_token = (outputs.logits - norm_pix_target(x, predicted)).square().mean(dim=-1)  # (B, K)
    assert per_token.shape == (2, 12)
    torch.testing.assert_close(outputs.loss, per_token.mean(), rtol=1e-5, atol=1e-7)


def test_each_prediction_belongs_to_its_tubelet():
    """With every decoder block reduced to the identity (zero output projections), a mask token's prediction
    depends on its own position only: the decoder-masked logits must then be the full decoder's at the kept
    tubelets, in ascending token order."""
    config = tiny_config(decoder_mask_ratio=0.5)
    model, x, mask = build(EchoAIForPreTraining, config).train(), clips(config), masks()
    with torch.no_grad():
        for layer in model.decoder.layers:
            for linear in (layer.attention.proj, layer.mlp.fc2):
                linear.weight.zero_()
                linear.bias.zero_()
    decoder_mask = make_decoder_mask(mask, 0.5, torch.Generator().manual_seed(3))
    masked, full = step(model, x, mask, decoder_mask), step(model, x, mask, torch.zeros_like(mask))
    kept = ~decoder_mask[mask].view(2, 24)  # which of each sample's M hidden tubelets the decoder kept
    expected = full.logits[kept].view(2, 12, -1)
    torch.testing.assert_close(masked.logits, expected, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Sampling: seeded, uniform among the hidden tubelets
# --------------------------------------------------------------------------------------------------


def test_decoder_masks_are_seeded_and_reproducible():
    mask = masks(4)
    first = make_decoder_mask(mask, 0.5, torch.Generator().manual_seed(7))
    assert torch.equal(first, make_decoder_mask(mask, 0.5, torch.Generator().manual_seed(7)))
    assert not torch.equal(first, make_decoder_mask(mask, 0.5, torch.Generator().manual_seed(8)))

    config = tiny_config(decoder_mask_ratio=0.5)
    model, x = build(EchoAIForPreTraining, config).train(), clips(config)
    losses = []
    for _ in range(2):
        torch.manual_seed(11)  # a mask the model draws itself comes from torch's global RNG
        losses.append(model(pixel_values=x).loss)
    assert torch.equal(losses[0], losses[1])


def test_every_hidden_tubelet_is_left_out_equally_often():
    mask = masks(4000, seed=2, strategy="random")
    left_out = make_decoder_mask(mask, 0.5, torch.Generator().manual_seed(0))
    rate = left_out.float().sum(dim=0) / mask.float().sum(dim=0)  # per token position, over the samples hiding it
    assert (rate - 0.5).abs().max() < 0.05, rate


# --------------------------------------------------------------------------------------------------
# Training, saving, pictures
# --------------------------------------------------------------------------------------------------


def test_a_decoder_masked_step_trains_every_part_and_the_ratio_survives_a_reload(tmp_path):
    config = tiny_config(decoder_mask_ratio=0.5)
    model, x, mask = build(EchoAIForPreTraining, config).train(), clips(config), masks()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    decoder_mask = model.make_decoder_mask(mask, generator=torch.Generator().manual_seed(0))
    before = step(model, x, mask, decoder_mask).loss
    before.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    optimizer.step()
    optimizer.zero_grad()
    assert step(model, x, mask, decoder_mask).loss < before

    model.save_pretrained(tmp_path)
    reloaded = EchoAIForPreTraining.from_pretrained(tmp_path).train()
    assert reloaded.config.decoder_mask_ratio == 0.5
    torch.testing.assert_close(step(reloaded, x, mask, decoder_mask).logits, step(model, x, mask, decoder_mask).logits)


def test_the_reconstruction_picture_shows_every_hidden_tubelet(tmp_path):
    config = tiny_config(decoder_mask_ratio=0.5)
    model, x, mask = build(EchoAIForPreTraining, config).train(), clips(config), masks()
    outputs = step(model, x, mask)
    with pytest.raises(ValueError, match="reconstruct needs logits for all 24 hidden tubelets, got 12"):
        model.reconstruct(x[:1], outputs.logits[:1], mask[:1])
    processor = EchoAIVideoProcessor(num_frames=4, image_size=32)
    assert save_reconstruction(model, x, outputs, processor, tmp_path / "picture.png").stat().st_size > 0


def test_the_pictures_hidden_pixels_are_those_of_the_hidden_tubelets():
    config = tiny_config()
    model, mask = build(EchoAIForPreTraining, config), masks(batch_size=1)
    x = clips(config)[:1].abs() + 1  # no pixel is 0, so reconstruct's zeros are exactly the hidden ones
    masked, _ = model.reconstruct(x, model(pixel_values=x, bool_masked_pos=mask).logits, mask)
    visible = model.echoai.embeddings.patch_embeddings.visible_pixels(mask, x.transpose(1, 2).shape)
    hidden = ~visible[0].transpose(0, 1)  # as save_reconstruction shows them
    assert hidden.shape == (x.shape[1], 1, *x.shape[-2:]) and 0 < hidden.float().mean() < 1
    assert torch.equal(hidden.expand_as(masked[0]), masked[0] == 0)


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_a_ratio_outside_zero_to_one_names_the_field(ratio):
    with pytest.raises(StrictDataclassError, match=rf"decoder_mask_ratio must lie in \[0, 1\), got {ratio}"):
        tiny_config(decoder_mask_ratio=ratio)


def test_unusable_decoder_masks_are_one_line_errors():
    model, x, mask = build(EchoAIForPreTraining, tiny_config()), clips(tiny_config()), masks()
    uneven = torch.zeros_like(mask)
    uneven[0, mask[0].nonzero()[0]] = True  # sample 0 loses one hidden tubelet, sample 1 none
    cases = [
        (mask[:, :-1], r"shaped as bool_masked_pos \(2, 32\), got torch.bool \(2, 31\)"),
        (mask.float(), r"must be a bool tensor shaped as bool_masked_pos"),
        (uneven, r"different number of hidden tokens per sample to the decoder \(\[23, 24\]\)"),
        (mask.clone(), "leaves out every hidden token"),
    ]
    for decoder_mask, message in cases:
        with pytest.raises(ValueError, match=message) as raised:
            step(model, x, mask, decoder_mask)
        assert "\n" not in str(raised.value)


# --------------------------------------------------------------------------------------------------
# The pretraining script: seeded decoder masks, so a resumed run is bit-identical
# --------------------------------------------------------------------------------------------------


def test_a_resumed_decoder_masked_pretraining_run_ends_with_the_straight_runs_weights(tmp_path_factory, tmp_path):
    corpus = tiny_corpus(tmp_path_factory)
    pretrain = load_script("pretrain")
    argv = [*pretrain_argv(corpus, tmp_path / "straight"), "--max_train_steps", "4", "--checkpointing_steps", "2"]
    index = argv.index("--config_overrides") + 1
    argv[index] += ",decoder_mask_ratio=0.5"
    argv[argv.index("--reconstruction_steps") + 1] = "1"  # a picture every step, from decoder-masked outputs
    straight = pretrain.main(argv)
    assert straight.model.config.decoder_mask_ratio == 0.5
    assert len(list((tmp_path / "straight" / "reconstructions").glob("*.png"))) == 4

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(
        tmp_path / "straight" / "checkpoints" / "step_0000002", resumed_dir / "checkpoints" / "step_0000002"
    )
    argv[argv.index("--output_dir") + 1] = str(resumed_dir)
    resumed = pretrain.main([*argv, "--resume_from_checkpoint", "latest"])
    assert resumed.losses == straight.losses[2:]
    expected, got = (
        load_file(tmp_path / "straight" / "model.safetensors"),
        load_file(resumed_dir / "model.safetensors"),
    )
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
