"""Starting from public VideoMAE weights: `scripts/convert_videomae_to_echoai.py` turns a transformers VideoMAE
checkpoint into an EchoAI one that computes the same outputs, which the training scripts then continue from at
another geometry; and the sinusoidal position table that makes the conversion exact behaves as the separable one.

Nothing is downloaded: each VideoMAE is built at random at a tiny geometry and saved locally."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from data_fixtures import tiny_corpus
from safetensors.torch import load_file, save_file
from test_finetune import NUM_VIDEOS, finetune_argv
from test_modeling import build, clips, tiny_config
from test_training import load_script
from transformers import (
    AutoModelForPreTraining,
    VideoMAEConfig,
    VideoMAEForPreTraining,
    VideoMAEModel,
    VivitConfig,
    VivitModel,
)
from transformers.models.videomae.modeling_videomae import get_sinusoid_encoding_table
from transformers.utils.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from modeling_echoai import (
    CHUNKED_ATTENTION,
    EchoAIForPreTraining,
    EchoAIForVideoClassification,
    EchoAIModel,
    make_mask,
    normalize_patches,
    patchify,
    resample_table,
)
from video_processing_echoai import EchoAIVideoProcessor


REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "convert_videomae_to_echoai.py"
# The source: 8 frames of 64 px, tubelet 2, patch 8 -> 4 slices x 64 patches = 256 tokens, at a tiny width.
GEOMETRY = dict(image_size=64, patch_size=8, num_frames=8, tubelet_size=2)
WIDTHS = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, decoder_hidden_size=16,
    decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=32,
)  # fmt: skip


def random_videomae(model_class=VideoMAEForPreTraining, seed: int = 0, **overrides):
    """A VideoMAE with every tensor random (biases, norms and the mask token too, so none can be mapped wrongly
    and go unnoticed behind an init of zeros or ones). `use_mean_pooling=False` as in the Hub's pretraining
    checkpoints: the encoder ends in a LayerNorm."""
    torch.manual_seed(seed)
    model = model_class(VideoMAEConfig(**{**GEOMETRY, **WIDTHS, "use_mean_pooling": False, **overrides}))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.eval()


def convert(source: Path, output: Path) -> dict[str, float]:
    return load_script("convert_videomae_to_echoai").main(["--videomae", str(source), "--output_dir", str(output)])


def conversion_error(source: Path, output: Path) -> str:
    with pytest.raises(SystemExit) as raised:
        convert(source, output)
    message = str(raised.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


def processed_clips(batch_size: int = 2, seed: int = 0) -> torch.Tensor:
    """Frames in [0, 1] normalised with ImageNet's mean/std, as VideoMAE's (and the converted) processor does."""
    generator = torch.Generator().manual_seed(seed)
    frames = torch.rand(batch_size, GEOMETRY["num_frames"], 3, 64, 64, generator=generator)
    mean, std = (torch.tensor(v).view(1, 1, 3, 1, 1) for v in (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    return (frames - mean) / std


@pytest.fixture(scope="module")
def videomae(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("videomae")
    random_videomae().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def converted(videomae, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("converted")
    convert(videomae, output)
    return output


# --------------------------------------------------------------------------------------------------
# The conversion is exact
# --------------------------------------------------------------------------------------------------


def test_converted_pretraining_model_gives_videomaes_loss_predictions_and_encoding(videomae, converted):
    reference = VideoMAEForPreTraining.from_pretrained(videomae).eval()
    model = AutoModelForPreTraining.from_pretrained(converted).eval()
    assert isinstance(model, EchoAIForPreTraining) and model.config.position_embedding_type == "sinusoidal"
    x = processed_clips()
    mask = make_mask(2, (4, 8, 8), 0.9, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(x, bool_masked_pos=mask), reference(x, bool_masked_pos=mask)
        torch.testing.assert_close(ours.logits, theirs.logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.loss, theirs.loss, rtol=0, atol=1e-5)
        # The encoder alone, on whole clips and on the visible tokens only.
        for kwargs in ({}, {"bool_masked_pos": mask}):
            torch.testing.assert_close(
                model.echoai(x, **kwargs).last_hidden_state,
                reference.videomae(x, **kwargs).last_hidden_state,
                rtol=0,
                atol=1e-5,
            )


def test_only_the_target_epsilon_separates_the_two_losses(converted):
    """The decoder predicts the same pixels; the targets differ only by where the 1e-6 enters the per-channel
    std (VideoMAE: std + 1e-6 of [0, 1] pixels; EchoAI: sqrt(var + 1e-6) of `pixel_values`). With the epsilon
    left out of both, EchoAI's target is VideoMAE's."""
    model = EchoAIForPreTraining.from_pretrained(converted).eval()
    x = processed_clips(batch_size=1)
    patches = patchify(x, 2, 8)  # (1, L, P), P = (t p q c)
    std = torch.tensor(IMAGENET_DEFAULT_STD).repeat(2 * 8 * 8)
    pixels = patches * std + torch.tensor(IMAGENET_DEFAULT_MEAN).repeat(2 * 8 * 8)  # back to [0, 1]
    videomae_target = normalize_patches(pixels, eps=0.0, groups=3)
    torch.testing.assert_close(normalize_patches(patches, eps=0.0, groups=3), videomae_target, rtol=1e-5, atol=1e-5)
    mask = torch.ones(1, patches.shape[1], dtype=torch.bool)
    assert (model.reconstruction_target(x, mask) - videomae_target).abs().max() < 1e-4


def test_an_encoder_only_videomae_becomes_an_echoai_encoder_the_classifier_loads(tmp_path):
    encoder = random_videomae(VideoMAEModel, seed=1)
    encoder.save_pretrained(tmp_path / "videomae")
    differences = convert(tmp_path / "videomae", tmp_path / "echoai")
    assert set(differences) == {"last_hidden_state"}
    model = EchoAIModel.from_pretrained(tmp_path / "echoai").eval()
    x = processed_clips()
    with torch.no_grad():
        torch.testing.assert_close(model(x).last_hidden_state, encoder(x).last_hidden_state, rtol=0, atol=1e-5)
    classifier = EchoAIForVideoClassification.from_pretrained(tmp_path / "echoai", num_labels=1)
    torch.testing.assert_close(classifier.echoai.layernorm.weight, model.layernorm.weight)


def test_the_saved_processor_normalises_as_videomae_and_the_config_states_every_choice(converted):
    processor = EchoAIVideoProcessor.from_pretrained(converted)
    assert processor.image_mean == pytest.approx(list(IMAGENET_DEFAULT_MEAN))
    assert processor.image_std == pytest.approx(list(IMAGENET_DEFAULT_STD))
    assert (processor.num_frames, processor.image_size, processor.num_channels) == (8, 64, 3)
    config = json.loads((converted / "config.json").read_text())
    assert config["position_embedding_type"] == "sinusoidal" and config["norm_pix_per_channel"] is True
    assert config["decoder_layer_norm_eps"] == 1e-5 and config["layer_norm_eps"] == 1e-12
    weights = load_file(converted / "model.safetensors")
    assert torch.equal(weights["echoai.embeddings.position_embeddings.table"], get_sinusoid_encoding_table(256, 32)[0])
    assert torch.equal(weights["decoder_position_embeddings.table"], get_sinusoid_encoding_table(256, 16)[0])
    # VideoMAE has no key bias: zero in the fused projection (rows D..2D).
    assert not weights["echoai.encoder.layer.0.attention.qkv.bias"][32:64].any()


# --------------------------------------------------------------------------------------------------
# The training scripts continue from it, at a smaller frame and a shorter clip
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return tiny_corpus(tmp_path_factory, num_videos=NUM_VIDEOS)


def test_continued_pretraining_then_fine_tuning_at_32_px_and_4_frames(converted, corpus, tmp_path):
    """convert -> pretrain.py on echoes -> finetune.py, resampling the 64 px / 8-frame tables to 32 px / 4 frames."""
    geometry = ["--config_overrides", "image_size=32,num_frames=4", "--per_device_train_batch_size", "2"]
    pretrain = load_script("pretrain").main(
        ["--data_dir", str(corpus), "--output_dir", str(tmp_path / "pretrain"), "--model_name_or_path",
         str(converted), "--max_train_steps", "2", "--reconstruction_steps", "0", *geometry]
    )  # fmt: skip
    assert pretrain.state.global_step == 2 and all(torch.isfinite(torch.tensor(pretrain.losses)))
    continued = EchoAIForPreTraining.from_pretrained(tmp_path / "pretrain")
    start = json.loads((tmp_path / "pretrain" / "all_results.json").read_text())["start"]  # what it continued
    assert (
        start["model_name_or_path"] == str(converted)
        and start["sha256"] == hashlib.sha256((converted / "model.safetensors").read_bytes()).hexdigest()
    )
    assert (continued.config.image_size, continued.config.num_frames) == (32, 4)
    assert continued.config.position_embedding_type == "sinusoidal" and continued.config.norm_pix_per_channel
    assert EchoAIVideoProcessor.from_pretrained(tmp_path / "pretrain").image_std == pytest.approx(
        list(IMAGENET_DEFAULT_STD)
    )
    # The fixed table is the converted one resampled to 2 slices of 4 x 4 patches, untouched by training.
    source = EchoAIForPreTraining.from_pretrained(converted).echoai.embeddings.position_embeddings.table
    torch.testing.assert_close(
        continued.echoai.embeddings.position_embeddings.table, resample_table(source, (4, 8, 8), (2, 4, 4))
    )
    finetune = load_script("finetune").main(
        finetune_argv(corpus, tmp_path / "finetune", "--model_name_or_path", str(tmp_path / "pretrain"),
                      "--max_train_steps", "2", "--eval_num_clips", "1")
    )  # fmt: skip
    assert finetune.state.global_step == 2
    model = EchoAIForVideoClassification.from_pretrained(tmp_path / "finetune").eval()
    x = EchoAIVideoProcessor.from_pretrained(tmp_path / "finetune")(sorted((corpus / "Videos").glob("*.avi"))[:2])
    with torch.no_grad():
        assert model(x["pixel_values"]).logits.shape == (2, 1)


def test_fine_tuning_starts_from_the_converted_checkpoint_directly(converted, corpus, tmp_path):
    result = load_script("finetune").main(
        finetune_argv(corpus, tmp_path / "run", "--model_name_or_path", str(converted), "--config_overrides",
                      "image_size=32,num_frames=4", "--max_train_steps", "2", "--eval_num_clips", "1")
    )  # fmt: skip
    assert result.state.global_step == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    model = EchoAIForVideoClassification.from_pretrained(tmp_path / "run")
    assert model.echoai.embeddings.position_embeddings.table.shape == (2 * 16, 32)
    processor = EchoAIVideoProcessor.from_pretrained(tmp_path / "run")  # the converted one, at the new geometry
    assert (processor.image_size, processor.num_frames) == (32, 4)
    assert processor.image_mean == pytest.approx(list(IMAGENET_DEFAULT_MEAN))


# --------------------------------------------------------------------------------------------------
# What cannot be converted is named in one line
# --------------------------------------------------------------------------------------------------


def copy_checkpoint(videomae: Path, folder: Path) -> Path:
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((videomae / name).read_bytes())
    return folder


def edit_config(folder: Path, **fields) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **fields}))


def edit_weights(folder: Path, edit) -> None:
    weights = load_file(folder / "model.safetensors")
    edit(weights)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path):
    config = VivitConfig(image_size=32, num_frames=4, tubelet_size=[2, 8, 8], hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=4, intermediate_size=64)  # fmt: skip
    VivitModel(config).save_pretrained(tmp_path / "vivit")
    message = conversion_error(tmp_path / "vivit", tmp_path / "out")
    assert "'vivit'" in message and "VideoMAE (model_type 'videomae') only" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "config_fields, message",
    [
        ({"patch_size": 16}, r"projection.weight has shape \(32, 3, 2, 8, 8\), EchoAI's .* \(32, 3, 2, 16, 16\)"),
        ({"tubelet_size": 4}, r"projection.weight has shape \(32, 3, 2, 8, 8\), EchoAI's .* \(32, 3, 4, 8, 8\)"),
        ({"patch_size": [8, 4]}, r"patch_size=\[8, 4\] is not square"),
        ({"num_frames": 7}, r"cannot be expressed .*num_frames=7 must be divisible by tubelet_size=2"),
        ({"norm_pix_loss": False}, r"regresses raw pixels .*\(norm_pix_loss=False\)"),
    ],
)
def test_a_geometry_the_weights_or_echoai_cannot_hold_is_refused(videomae, tmp_path, config_fields, message):
    folder = copy_checkpoint(videomae, tmp_path / "videomae")
    edit_config(folder, **config_fields)
    assert re.search(message, conversion_error(folder, tmp_path / "out"))


def test_a_missing_or_unexpected_tensor_is_named(videomae, tmp_path):
    missing = copy_checkpoint(videomae, tmp_path / "missing")
    edit_weights(missing, lambda weights: weights.pop("videomae.encoder.layer.1.attention.attention.v_bias"))
    message = conversion_error(missing, tmp_path / "out")
    assert "lacks 1 tensor(s)" in message and "videomae.encoder.layer.1.attention.attention.v_bias" in message
    extra = copy_checkpoint(videomae, tmp_path / "extra")
    edit_weights(extra, lambda weights: weights.update({"fc_norm.weight": torch.ones(32)}))
    message = conversion_error(extra, tmp_path / "out")
    assert "1 tensor(s) with no EchoAI counterpart" in message and "fc_norm.weight" in message


def test_an_encoder_without_its_final_layernorm_is_refused(tmp_path):
    random_videomae(VideoMAEModel, use_mean_pooling=True).save_pretrained(tmp_path / "videomae")
    assert "ends without a LayerNorm (use_mean_pooling=True" in conversion_error(tmp_path / "videomae", tmp_path / "o")


def test_missing_or_unreadable_weights_and_a_missing_config_are_refused(videomae, tmp_path):
    folder = tmp_path / "no_weights"
    folder.mkdir()
    (folder / "config.json").write_bytes((videomae / "config.json").read_bytes())
    (folder / "pytorch_model.bin").write_bytes(b"")
    message = conversion_error(folder, tmp_path / "out")
    assert "has no model.safetensors (['pytorch_model.bin'])" in message and "save_pretrained" in message
    (folder / "model.safetensors").write_bytes(b"not a tensor file")
    assert "model.safetensors is not a readable safetensors file" in conversion_error(folder, tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no config.json" in conversion_error(empty, tmp_path / "out")


def test_the_command_line_reports_an_unreachable_source_in_one_line_without_a_traceback(tmp_path):
    """Offline, a name that is no folder is tried as a Hub id and fails with the reason, not a traceback."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.run(
        [sys.executable, str(SCRIPT), "--videomae", "MCG-NJU/videomae-base-not-here", "--output_dir", str(tmp_path)],
        capture_output=True, text=True, env=environment, timeout=300,
    )  # fmt: skip
    assert process.returncode == 1 and "Traceback" not in process.stderr
    assert process.stderr.startswith("error: --videomae MCG-NJU/videomae-base-not-here: no such folder")
    assert len(process.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------------
# The sinusoidal table passes the separable table's model equivalences
# --------------------------------------------------------------------------------------------------


def sinusoidal_config(**overrides):
    return tiny_config(position_embedding_type="sinusoidal", num_labels=1, **overrides)


def test_sinusoidal_table_is_videomaes_fixed_and_not_trained():
    model = build(EchoAIForPreTraining, sinusoidal_config())
    table = model.echoai.embeddings.position_embeddings.table
    assert torch.equal(table, get_sinusoid_encoding_table(32, 32)[0])
    assert not any("position_embeddings" in name for name, _ in model.named_parameters())
    assert "echoai.embeddings.position_embeddings.table" in model.state_dict()


@pytest.mark.parametrize("model_class", [EchoAIModel, EchoAIForPreTraining, EchoAIForVideoClassification])
def test_sinusoidal_models_reload_agree_across_attention_kernels_and_batch(model_class, tmp_path):
    config = sinusoidal_config()
    x = clips(config, batch_size=3)
    kwargs = {"bool_masked_pos": make_mask(3, (2, 4, 4), 0.75)} if model_class is EchoAIForPreTraining else {}
    model = build(model_class, config)
    with torch.no_grad():
        whole = model(x, **kwargs)[0]
        if model_class is not EchoAIForPreTraining:  # the loss is a batch mean; outputs are per sample
            torch.testing.assert_close(model(x[1:2])[0], whole[1:2], rtol=1e-5, atol=1e-5)
        for implementation in ("eager", CHUNKED_ATTENTION):
            config._attn_implementation = implementation
            torch.testing.assert_close(build(model_class, config)(x, **kwargs)[0], whole, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = model_class.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x, **kwargs)[0], whole, rtol=1e-6, atol=1e-6)


def test_sinusoidal_table_resamples_like_the_separable_tables():
    """On a table that is temporal[t] + spatial[n], `resample_table` gives what resampling each separable table
    on its own axis gives; at the native grid it is the identity."""
    separable = build(EchoAIModel, tiny_config(num_frames=8)).embeddings.position_embeddings  # 4 slices, 4 x 4
    full = separable((4, 4, 4))
    for grid in ((8, 6, 6), (2, 4, 4), (4, 2, 2), (3, 5, 5)):
        torch.testing.assert_close(resample_table(full, (4, 4, 4), grid), separable(grid), rtol=1e-5, atol=1e-6)
    assert resample_table(full, (4, 4, 4), (4, 4, 4)) is full


@pytest.mark.parametrize("num_frames, image_size", [(8, 32), (4, 48), (2, 16)])
def test_sinusoidal_interpolation_runs_and_resizing_matches_it_and_survives_save_load(
    num_frames, image_size, tmp_path
):
    config = sinusoidal_config()
    model = build(EchoAIForVideoClassification, config)
    x = clips(config, num_frames=num_frames, image_size=image_size)
    with torch.no_grad():
        torch.testing.assert_close(model(clips(config), interpolate_pos_encoding=True).logits, model(clips(config)).logits,
                                   rtol=0, atol=0)  # fmt: skip
        expected = model(x, interpolate_pos_encoding=True).logits
        pretraining = build(EchoAIForPreTraining, config)(x, interpolate_pos_encoding=True)
    assert torch.isfinite(expected).all() and torch.isfinite(pretraining.loss)
    model.resize_position_embeddings(num_frames=num_frames, image_size=image_size)
    tokens = (num_frames // 2) * (image_size // 8) ** 2
    assert model.echoai.embeddings.position_embeddings.table.shape == (tokens, 32)
    model.save_pretrained(tmp_path)
    reloaded = EchoAIForVideoClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(reloaded(x).logits, expected, rtol=1e-5, atol=1e-5)


def test_per_channel_norm_pix_target_and_its_inverse():
    config = tiny_config(norm_pix_per_channel=True)
    model = build(EchoAIForPreTraining, config)
    x = clips(config)
    mask = make_mask(2, (2, 4, 4), 0.75)
    target = model.reconstruction_target(x, mask)  # (B, M, P), P = (t p q c)
    per_channel = target.unflatten(-1, (-1, 3))
    torch.testing.assert_close(per_channel.mean(dim=-2), torch.zeros(2, 24, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_channel.std(dim=-2), torch.ones(2, 24, 3), atol=1e-5, rtol=0)
    _, reconstruction = model.reconstruct(x, target, mask)
    torch.testing.assert_close(reconstruction, x, atol=1e-4, rtol=1e-4)
    with pytest.raises(Exception, match="norm_pix_per_channel=True .* needs norm_pix_loss=True"):
        tiny_config(norm_pix_per_channel=True, norm_pix_loss=False)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"position_embedding_type": "flat"}, "position_embedding_type"),
        ({"decoder_layer_norm_eps": 0.0}, "decoder_layer_norm_eps must be positive, got 0.0"),
        ({"layer_norm_eps": -1e-6}, "layer_norm_eps must be positive"),
    ],
)
def test_the_new_config_fields_are_validated(fields, message):
    with pytest.raises(Exception, match=message):
        tiny_config(**fields)
    assert tiny_config().decoder_layer_norm_eps is None  # the default: the decoder's LayerNorm uses layer_norm_eps
