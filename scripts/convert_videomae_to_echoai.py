#!/usr/bin/env python
"""Convert a transformers VideoMAE checkpoint (e.g. the Kinetics-400 `MCG-NJU/videomae-base`) into EchoAI's.

    python scripts/convert_videomae_to_echoai.py --videomae MCG-NJU/videomae-base --output_dir outputs/videomae-base
    python scripts/convert_videomae_to_echoai.py --videomae path/to/videomae_folder --output_dir outputs/videomae

A `VideoMAEForPreTraining` checkpoint (encoder + decoder) becomes an `EchoAIForPreTraining` one, which
`scripts/pretrain.py --model_name_or_path` continues pretraining on echoes; a `VideoMAEModel` (encoder only)
becomes an `EchoAIModel`. Either is what `scripts/finetune.py --model_name_or_path` starts from, at the source's
geometry or another (`--config_overrides image_size=112,num_frames=16` resamples the position tables).

The conversion is exact: the EchoAI config takes VideoMAE's fixed sin-cos position table
(`position_embedding_type="sinusoidal"`), its decoder's LayerNorm epsilon and its per-channel norm-pix target;
the key bias VideoMAE lacks is zero in EchoAI's fused query/key/value projection (a key bias shifts every score
of a query equally, so it never changes attention). An `EchoAIVideoProcessor` with VideoMAE's ImageNet
mean/std is saved beside the weights, so EchoAI's `pixel_values` are VideoMAE's.

What is checked, each failure a one-line error: the folder holds a VideoMAE (`config.json` `model_type`) with
safetensors weights; EchoAI can express it (square frames and patches, a final encoder LayerNorm, a decoder trained
on the norm-pix target); every VideoMAE tensor maps to an EchoAI one of the same shape, none missing, none left
over; and the converted model's outputs equal VideoMAE's (transformers' own `VideoMAE*` classes on the same
weights) on a masked random clip: encoder states and decoder predictions within `--atol` (relative where they
exceed 1). The pretraining losses differ only by where each adds its 1e-6 to the target's per-channel std
(VideoMAE un-normalises to [0, 1] pixels first and divides by std + 1e-6; EchoAI divides the deviations of
`pixel_values` by sqrt(var + 1e-6)): a few 1e-5 relative on synthetic echo clips, printed, not checked. Matching it
exactly would change EchoAI's default target or put ImageNet statistics inside the loss, which EchoAI keeps out of
the model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers.utils.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from configuration_echoai import EchoAIConfig
from modeling_echoai import EchoAIForPreTraining, EchoAIModel, make_mask
from video_processing_echoai import EchoAIVideoProcessor


class ConversionError(ValueError):
    """A checkpoint this script cannot convert exactly; the message names what and why."""


# VideoMAE config fields EchoAI has under the same name and meaning.
SHARED_FIELDS = (
    "num_channels", "num_frames", "tubelet_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "intermediate_size", "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range",
    "layer_norm_eps", "decoder_hidden_size", "decoder_num_hidden_layers", "decoder_num_attention_heads",
    "decoder_intermediate_size", "norm_pix_loss",
)  # fmt: skip

# The key map, EchoAI name <- VideoMAE name. One transformer block (encoder and decoder alike); query, key and
# value are fused into `attention.qkv` separately (`fuse_qkv`).
LAYER_KEYS = {
    "layernorm_before": "layernorm_before",
    "attention.proj": "attention.output.dense",
    "layernorm_after": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
ENCODER_KEYS = {
    "echoai.embeddings.patch_embeddings.projection": "videomae.embeddings.patch_embeddings.projection",
    "echoai.layernorm": "videomae.layernorm",
}
DECODER_KEYS = {
    "encoder_to_decoder": "encoder_to_decoder",
    "decoder.norm": "decoder.norm",
    "decoder.head": "decoder.head",
}


def resolve_folder(source: str) -> Path:
    """A local folder, or a Hub id downloaded (config and safetensors weights only) when online."""
    if Path(source).is_dir():
        return Path(source)
    if Path(source).exists():
        raise ConversionError(f"--videomae {source} is a file; pass the checkpoint's folder (config.json + weights)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(
            snapshot_download(source, allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json"])
        )
    except (OSError, HFValidationError) as error:  # offline, unknown repository, malformed id
        reason = str(error).splitlines()[0]
        raise ConversionError(
            f"--videomae {source}: no such folder, and no Hub checkpoint could be fetched ({reason})"
        ) from None


def read_checkpoint(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """`config.json` as a dict (read before any VideoMAE class sees it, so another architecture gets a clear
    error) and the weights, from `model.safetensors` or its shards."""
    if not (folder / "config.json").is_file():
        raise ConversionError(f"{folder} has no config.json; pass a transformers checkpoint folder")
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != "videomae":
        raise ConversionError(
            f"{folder} holds a {config.get('model_type')!r} checkpoint ({', '.join(config.get('architectures') or [])}); "
            "this script converts VideoMAE (model_type 'videomae') only"
        )
    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    )
    if not all((folder / name).is_file() for name in files):
        other = sorted(p.name for p in folder.glob("*.bin")) or "no weights at all"
        raise ConversionError(
            f"{folder} has no {files[0]} ({other}); load it with transformers' VideoMAE class and save_pretrained "
            "it to a folder (safetensors), then convert that folder"
        )
    weights = {}
    for name in files:
        try:
            weights.update(load_file(folder / name))
        except (OSError, SafetensorError) as error:
            raise ConversionError(f"{folder / name} is not a readable safetensors file ({error})") from None
    return config, weights


def echoai_config(videomae: dict, has_decoder: bool, has_final_norm: bool) -> EchoAIConfig:
    """The EchoAI config that computes what this VideoMAE computes, or an error naming what it cannot express."""
    image_size, patch_size = videomae.get("image_size", 224), videomae.get("patch_size", 16)
    for name, value in (("image_size", image_size), ("patch_size", patch_size)):
        if isinstance(value, (list, tuple)):
            if len(set(value)) != 1:
                raise ConversionError(f"VideoMAE {name}={value} is not square; EchoAI's frames and patches are")
            value = value[0]
        videomae = {**videomae, name: value}
    if not has_final_norm:
        raise ConversionError(
            "this VideoMAE encoder ends without a LayerNorm (use_mean_pooling=True, a fine-tuning layout) and "
            "EchoAI's always has one; convert the pretraining checkpoint (e.g. MCG-NJU/videomae-base)"
        )
    if has_decoder and not videomae.get("norm_pix_loss", True):
        raise ConversionError(
            "this VideoMAE's decoder regresses raw pixels un-normalised with ImageNet statistics (norm_pix_loss=False), "
            "a target EchoAI does not compute; convert its encoder (VideoMAEModel) or a norm_pix_loss=True checkpoint"
        )
    fields = {name: videomae[name] for name in SHARED_FIELDS if name in videomae}
    fields.update(
        image_size=videomae["image_size"],
        patch_size=videomae["patch_size"],
        qkv_bias=videomae.get("qv_bias", True),
        position_embedding_type="sinusoidal",
        decoder_layer_norm_eps=1e-5,  # VideoMAEDecoder.norm is a LayerNorm at torch's default eps
        norm_pix_per_channel=videomae.get("norm_pix_loss", True),
    )
    try:
        return EchoAIConfig(**fields)
    except (ValueError, TypeError, StrictDataclassError) as error:  # the cause names the field and the value
        message = f"the VideoMAE config cannot be expressed as an EchoAI one: {error.__cause__ or error}"
        raise ConversionError(message) from None


def expected_sources(config: EchoAIConfig, has_decoder: bool) -> dict[str, list[str]]:
    """EchoAI tensor name -> the VideoMAE tensor(s) it is made of (three for a fused qkv)."""
    prefixes = {"echoai.encoder.layer": ("videomae.encoder.layer", config.num_hidden_layers)}
    names = dict(ENCODER_KEYS)
    if has_decoder:
        names.update(DECODER_KEYS)
        prefixes["decoder.layers"] = ("decoder.decoder_layers", config.decoder_num_hidden_layers)
    for echoai_prefix, (videomae_prefix, depth) in prefixes.items():
        for i in range(depth):
            names.update({f"{echoai_prefix}.{i}.{a}": f"{videomae_prefix}.{i}.{b}" for a, b in LAYER_KEYS.items()})
    sources = {f"{a}.{kind}": [f"{b}.{kind}"] for a, b in names.items() for kind in ("weight", "bias")}
    sources = {k: v for k, v in sources.items() if not k.startswith("encoder_to_decoder.bias")}  # it has none
    for echoai_prefix, (videomae_prefix, depth) in prefixes.items():
        for i in range(depth):
            attention = f"{videomae_prefix}.{i}.attention.attention"
            sources[f"{echoai_prefix}.{i}.attention.qkv.weight"] = [
                f"{attention}.{n}.weight" for n in ("query", "key", "value")
            ]
            if config.qkv_bias:
                sources[f"{echoai_prefix}.{i}.attention.qkv.bias"] = [f"{attention}.{n}_bias" for n in ("q", "v")]
    if has_decoder:
        sources["mask_token"] = ["mask_token"]
    return sources


def fuse_qkv(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Query, key, value weights stacked as EchoAI's fused projection; for biases (query and value only) a zero
    key bias goes between them."""
    if len(tensors) == 2:
        query, value = tensors
        return torch.cat([query, torch.zeros_like(query), value])
    return torch.cat(tensors)


def convert_state_dict(
    weights: dict[str, torch.Tensor], sources: dict[str, list[str]], target: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Map VideoMAE's tensors to EchoAI names, checking that none is missing or left over and every shape."""
    needed = {name for names in sources.values() for name in names}
    missing, unexpected = sorted(needed - set(weights)), sorted(set(weights) - needed)
    if missing:
        raise ConversionError(
            f"the VideoMAE checkpoint lacks {len(missing)} tensor(s) EchoAI needs, e.g. {missing[:3]}"
        )
    if unexpected:
        raise ConversionError(
            f"the VideoMAE checkpoint has {len(unexpected)} tensor(s) with no EchoAI counterpart, e.g. {unexpected[:3]}"
        )
    converted = {}
    for name, names in sources.items():
        tensor = fuse_qkv([weights[n] for n in names]) if len(names) > 1 else weights[names[0]]
        if tensor.shape != target[name].shape:
            raise ConversionError(
                f"{' + '.join(names)} has shape {tuple(tensor.shape)}, EchoAI's {name} {tuple(target[name].shape)}: "
                "config.json and the weights disagree (patch_size, tubelet_size or a width)"
            )
        converted[name] = tensor.to(target[name].dtype)
    return converted


def build_echoai(videomae_config: dict, weights: dict[str, torch.Tensor]) -> EchoAIForPreTraining | EchoAIModel:
    """The converted model: `EchoAIForPreTraining` when the checkpoint has a decoder, else `EchoAIModel`."""
    if not any(name.startswith("videomae.") for name in weights):  # a bare VideoMAEModel saves no prefix
        weights = {f"videomae.{name}": tensor for name, tensor in weights.items()}
    # VideoMAE's checkpoints (the Hub's and transformers' `save_pretrained`) name the biases `q_bias` / `v_bias`;
    # a state dict taken from the module in memory names them `query.bias` / `value.bias`.
    weights = {
        key.replace(".query.bias", ".q_bias").replace(".value.bias", ".v_bias"): t for key, t in weights.items()
    }
    has_decoder = any(name.startswith("decoder.") for name in weights)
    config = echoai_config(videomae_config, has_decoder, has_final_norm="videomae.layernorm.weight" in weights)
    model = EchoAIForPreTraining(config) if has_decoder else EchoAIModel(config)
    prefix = "" if has_decoder else "echoai."  # name both alike: as the encoder inside EchoAIForPreTraining
    target = {f"{prefix}{name}": tensor for name, tensor in model.state_dict().items()}
    converted = convert_state_dict(weights, expected_sources(config, has_decoder), target)
    state = {name.removeprefix(prefix): tensor for name, tensor in converted.items()}
    missing, _ = model.load_state_dict(state, strict=False)
    # Only the fixed sin-cos tables are EchoAI's own: VideoMAE rebuilds them and does not save them.
    assert all(name.endswith("position_embeddings.table") for name in missing), missing
    return model.eval()


def imagenet_processor(config: EchoAIConfig) -> EchoAIVideoProcessor:
    """The processor VideoMAE's inputs come from: ImageNet mean/std over the config's clip and frame size."""
    if config.num_channels != 3:
        raise ConversionError(
            f"VideoMAE num_channels={config.num_channels}: its ImageNet normalisation (and this script) is for RGB"
        )
    return EchoAIVideoProcessor(
        num_frames=config.num_frames, image_size=config.image_size, num_channels=3,
        image_mean=list(IMAGENET_DEFAULT_MEAN), image_std=list(IMAGENET_DEFAULT_STD),
    )  # fmt: skip


def scaled_difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Largest absolute difference, divided by the reference's largest magnitude where that exceeds 1: fp32
    rounding grows with the values a deep encoder carries."""
    return float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1.0))


@torch.no_grad()
def compare_outputs(folder: Path, model, processor: EchoAIVideoProcessor, seed: int = 0) -> dict[str, float]:
    """Differences (`scaled_difference`) between transformers' VideoMAE (on the source folder) and the converted
    model, on one random clip normalised as the processor normalises and a 90 % tube mask."""
    from transformers import VideoMAEForPreTraining, VideoMAEModel

    config = model.config
    pretraining = isinstance(model, EchoAIForPreTraining)
    reference = (VideoMAEForPreTraining if pretraining else VideoMAEModel).from_pretrained(folder).eval()
    generator = torch.Generator().manual_seed(seed)
    shape = (1, config.num_frames, 3, config.image_size, config.image_size)
    mean, std = (torch.tensor(v).view(1, 1, 3, 1, 1) for v in (processor.image_mean, processor.image_std))
    pixels = (torch.rand(shape, generator=generator) - mean) / std
    side = config.image_size // config.patch_size
    mask = make_mask(1, (config.num_frames // config.tubelet_size, side, side), 0.9, generator=generator)
    encoder, videomae_encoder = (model.echoai, reference.videomae) if pretraining else (model, reference)
    differences = {
        "last_hidden_state": scaled_difference(
            encoder(pixels, bool_masked_pos=mask).last_hidden_state,
            videomae_encoder(pixels, bool_masked_pos=mask).last_hidden_state,
        )
    }
    if pretraining:
        ours, theirs = model(pixels, bool_masked_pos=mask), reference(pixels, bool_masked_pos=mask)
        differences.update(
            logits=scaled_difference(ours.logits, theirs.logits), loss=scaled_difference(ours.loss, theirs.loss)
        )
    return differences


def convert(source: str, output_dir: str, atol: float = 1e-4) -> dict[str, float]:
    """Convert, check the outputs against VideoMAE's, save model + processor; returns the differences."""
    folder = resolve_folder(source)
    videomae_config, weights = read_checkpoint(folder)
    model = build_echoai(videomae_config, weights)
    processor = imagenet_processor(model.config)
    differences = compare_outputs(folder, model, processor)
    # The loss is not compared: it differs by design, by the eps of the norm-pix target (see the docstring).
    wrong = {name: value for name, value in differences.items() if name != "loss" and value > atol}
    if wrong:
        raise ConversionError(f"the converted model's outputs differ from VideoMAE's by more than {atol}: {wrong}")
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return differences


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videomae", required=True, help="A VideoMAE checkpoint folder or Hub id (safetensors).")
    parser.add_argument("--output_dir", required=True, help="Where the EchoAI checkpoint and processor are saved.")
    parser.add_argument(
        "--atol",
        type=float,
        default=1e-4,
        help="Largest output difference from VideoMAE accepted (fp32; relative where an output exceeds 1).",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    try:
        differences = convert(args.videomae, args.output_dir, args.atol)
    except ConversionError as error:
        sys.exit(f"error: {error}")
    shown = ", ".join(f"{name} {value:.2e}" for name, value in differences.items())
    print(f"Converted {args.videomae} -> {args.output_dir}; largest differences from VideoMAE: {shown}")
    return differences


if __name__ == "__main__":
    main()
