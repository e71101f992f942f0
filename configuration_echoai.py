"""EchoAI model configuration.

One `EchoAIConfig` drives every module of the encoder, the masked-autoencoder decoder and the heads.
Field names follow transformers' `VideoMAEConfig` wherever VideoMAE has the same concept, so users who
know VideoMAE know EchoAI's config.

This file imports only transformers (and the standard library) so that `save_pretrained` can ship it
as Hub remote code next to `modeling_echoai.py`. It has no `from __future__ import annotations`: `@strict`
validates each field against its annotation (types, the choices of the `Literal` fields) only when the
annotations are real types rather than strings.
"""

import copy
from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


# Named sizes. Geometry (112 px, 16 frames, tubelet 2, patch 16) is EchoNet-Dynamic's and is shared by
# all presets; only widths and depths change. `small`/`base` follow ViT-S/ViT-B and VideoMAE's decoder
# proportions (decoder half the encoder width, 4 layers).
PRESETS: dict[str, dict] = {
    # About a million parameters: the CPU default of the training scripts. At this scale, on a few hundred
    # labelled videos, the plain ViViT does not learn EF (it collapses to the mean or memorises the videos);
    # a convolutional stem and pooling over the clip's extreme states do (docs/EXPERIMENTS.md). Its pretraining
    # predicts MaskFeat's gradient histograms in 4 x 4 cells under random masks: of the pretraining targets and
    # masks tried, the one level with scratch from 18 labels up (docs/EXPERIMENTS.md, section 3, items 28-36;
    # finer 2 x 2 cells lead with a quarter of the labels and trail with a tenth). Normalised pixels under tube
    # masks, which `small` and `base` keep, fine-tuned worse, and no target yet beats training from scratch at
    # this scale.
    "tiny": dict(
        stem_channels=[24, 48, 96],
        pooling="mean_max_min",
        reconstruction_target="hog",
        reconstruction_target_pool=4,
        norm_pix_loss=False,
        mask_strategy="random",
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=512,
        decoder_hidden_size=64,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=256,
    ),
    # ViT-S width (22 M encoder parameters).
    "small": dict(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
        decoder_hidden_size=192,
        decoder_num_hidden_layers=4,
        decoder_num_attention_heads=3,
        decoder_intermediate_size=768,
    ),
    # ViT-B width (86 M encoder parameters), the size class of the reference paper.
    "base": dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        decoder_hidden_size=384,
        decoder_num_hidden_layers=4,
        decoder_num_attention_heads=6,
        decoder_intermediate_size=1536,
    ),
}


# Fields `EchoAIConfig.validate_architecture` requires to be positive, and (divisor, multiple) pairs.
POSITIVE_FIELDS = (
    "image_size", "patch_size", "num_channels", "num_frames", "tubelet_size",
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "decoder_hidden_size", "decoder_num_hidden_layers", "decoder_num_attention_heads", "decoder_intermediate_size",
)  # fmt: skip
DIVISIBLE_FIELDS = (
    ("patch_size", "image_size"),
    ("tubelet_size", "num_frames"),
    ("num_attention_heads", "hidden_size"),
    ("decoder_num_attention_heads", "decoder_hidden_size"),
)


@strict
class EchoAIConfig(PreTrainedConfig):
    r"""
    Configuration of an EchoAI model: a ViViT-style video encoder with separable (spatial + temporal)
    learned position embeddings (or VideoMAE's fixed sinusoidal table, for converted VideoMAE weights),
    pretrained as a VideoMAE-style masked autoencoder.

    Geometry:
        image_size (`int`, defaults to 112): height and width of the input frames (EchoNet-Dynamic's 112 px).
        patch_size (`int`, defaults to 16): spatial side of a tubelet.
        num_channels (`int`, defaults to 3): channels of `pixel_values`; 1 is fine for grayscale echo.
        num_frames (`int`, defaults to 16): frames per clip the position embeddings are learned for.
            Other counts work with `interpolate_pos_encoding=True`.
        tubelet_size (`int`, defaults to 2): frames per tubelet (temporal side of the Conv3d patch).
        stem_channels (`list[int]`, *optional*): a convolutional stem before the tubelet projection, one
            Conv3d (3 x 3 x 3, spatial stride 2) + GroupNorm + ReLU block per entry with that many channels
            (early convolutions, Xiao et al. 2021). `patch_size` must be divisible by 2 ** len(stem_channels);
            the token grid is unchanged. None (the default) is the plain ViViT / VideoMAE linear projection.
        position_embedding_type (`str`, defaults to `"separable"`): `"separable"`: learned spatial and temporal
            tables, token (t, n) gets `spatial[n] + temporal[t]` (ViViT). `"sinusoidal"`: VideoMAE's fixed
            sin-cos table over all L tokens in (slice, row, column) order, not trained, built as transformers'
            `VideoMAEModel` builds it, so converted VideoMAE weights give VideoMAE's outputs
            (`scripts/convert_videomae_to_echoai.py`). Both are resampled the same way to other clip lengths
            and sizes (linearly in time, bicubically in space) and are saved with the weights.

    Encoder:
        hidden_size (`int`, defaults to 384): width D of the encoder.
        num_hidden_layers (`int`, defaults to 12): encoder depth.
        num_attention_heads (`int`, defaults to 6): heads per encoder attention layer; must divide `hidden_size`.
        intermediate_size (`int`, defaults to 1536): width of the encoder MLP.
        hidden_act (`str`, defaults to `"gelu"`): MLP activation, any key of `transformers.activations.ACT2FN`.
        hidden_dropout_prob (`float`, defaults to 0.0): dropout after attention projection and MLP.
        attention_probs_dropout_prob (`float`, defaults to 0.0): dropout on attention probabilities.
        drop_path_rate (`float`, defaults to 0.0): stochastic-depth rate of the last encoder layer, rising
            linearly from 0 at the first (as in timm / the MAE fine-tuning recipe).
        initializer_range (`float`, defaults to 0.02): std of the truncated-normal initialiser.
        layer_norm_eps (`float`, defaults to 1e-6): epsilon of every LayerNorm (but see `decoder_layer_norm_eps`).
        qkv_bias (`bool`, defaults to `True`): bias in the fused query/key/value projection.

    Masked-autoencoder pretraining:
        decoder_hidden_size (`int`, defaults to 192), decoder_num_hidden_layers (`int`, defaults to 4),
        decoder_num_attention_heads (`int`, defaults to 3), decoder_intermediate_size (`int`, defaults to 768):
            the VideoMAE-style decoder, used only by `EchoAIForPreTraining`.
        decoder_layer_norm_eps (`float`, *optional*): epsilon of the decoder's final LayerNorm; None (the default)
            is `layer_norm_eps`. transformers' VideoMAE leaves that one LayerNorm at torch's 1e-5 while its others
            use `layer_norm_eps`, so converted VideoMAE weights set 1e-5 here.
        norm_pix_loss (`bool`, defaults to `True`): regress each tubelet's pixels normalised by their own
            mean and variance (MAE's "norm-pix" target), instead of raw pixel values.
        norm_pix_per_channel (`bool`, defaults to `False`): with `norm_pix_loss`, normalise each channel of a
            tubelet by that channel's own mean and variance (the target of transformers'
            `VideoMAEForPreTraining`, set for converted VideoMAE weights) instead of all its pixels together (MAE).
        reconstruction_target_pool (`int`, defaults to 1): the decoder predicts each tubelet frame average-pooled
            in k x k pixel blocks, (patch_size / k)² values per frame, instead of every pixel (1). Speckle, the
            fine grain of an echo, cannot be predicted from the visible tubelets; pooling takes it out of the
            target so the loss is spent on the tissue's shape and brightness. Must divide `patch_size`.
        reconstruction_target (`str`, defaults to `"pixels"`): what the decoder predicts of each hidden tubelet:
            its `"pixels"`, or its `"motion"`: each frame minus the clip's mean frame, so that what stays still
            over the clip (the anatomy's layout, the gain, the sector's edge and labels) drops out of the target and
            what moves (the walls over the heart cycle, from which EF is read) is left. Applied before
            `reconstruction_target_pool` and `norm_pix_loss`. On the `tiny` preset the decoder learned none of it
            from a tenth of a phantom clip (docs/EXPERIMENTS.md, section 3, item 22): check the share of the target
            `scripts/pretrain.py` reports. `"hog"` is MaskFeat's target (Wei et al. 2022): each frame's histograms
            of oriented gradients in `reconstruction_target_pool` x `reconstruction_target_pool` cells (9 bins; 8
            px cells in MaskFeat), L2-normalised per tubelet frame; it needs `norm_pix_loss=False`.
        mask_ratio (`float`, defaults to 0.9): fraction of tubelets hidden from the encoder; in (0, 1).
        mask_strategy (`str`, defaults to `"tube"`): `"tube"` hides the same spatial patches in every
            tubelet slice (VideoMAE's tube masking, which stops the model copying a patch from its temporal
            neighbour); `"random"` hides tubelets independently.
        decoder_mask_ratio (`float`, defaults to 0.0): VideoMAE V2's decoder masking ("dual masking"): the fraction of
            the M hidden tubelets the decoder leaves out in training, int(decoder_mask_ratio * M) per sample, drawn
            at random among each sample's hidden tubelets (`modeling_echoai.make_decoder_mask`). The decoder then
            sees the visible tokens and mask tokens for the other K = M - int(decoder_mask_ratio * M) only, and the
            loss covers those K. VideoMAE V2's 0.5 hides half of all tokens from its decoder independently of the
            encoder's mask, which leaves out half of the hidden ones on average: the count this field gives at 0.5.
            In [0, 1); 0.0 (the default) is the full decoder. In eval mode the full decoder runs unless a decoder
            mask is passed, so held-out reconstruction losses and pictures cover every hidden tubelet.

    Heads:
        use_mean_pooling (`bool`, defaults to `True`): whether the head applies a LayerNorm (`fc_norm`) to the
            pooled vector. The name is VideoMAE's, where `False` reads a [CLS] token instead of pooling; EchoAI
            has no [CLS] token, so its tokens are always pooled as `pooling` says, and `False` only leaves the
            LayerNorm out (the pooled vector goes to the classifier as it is).
        pooling (`str`, defaults to `"mean"`): how the head summarises the tokens. `"mean"`: the mean of all
            tokens (VideoMAE). `"mean_max_min"`: each token slice's spatial mean, then the mean, maximum and
            minimum of those over time (3 x hidden_size wide), so the head sees the clip's extreme states --
            the largest and smallest ventricle EF compares -- wherever they fall in the clip.
        regression_loss (`str`, defaults to `"mse"`): `"mse"`, `"l1"` or `"huber"`, the loss of
            `EchoAIForVideoClassification` when `problem_type="regression"` (EF estimation).
        regression_target_mean (`float`, defaults to 0.0), regression_target_std (`float`, defaults to 1.0):
            the regression head predicts `(y - mean) / std` and its output is mapped back, so `logits` are in
            the target's own units (EF in %) while the head trains on a unit-scale target. Set them to the
            training split's EF statistics when fine-tuning.
        lv_segmentation_weight (`float`, defaults to 0.0): weight of an auxiliary loss of
            `EchoAIForVideoClassification` during fine-tuning: a light head (LayerNorm + Linear per token) predicts
            the left-ventricle mask of a traced frame of the clip (EchoNet-Dynamic's VolumeTracings at ED and ES)
            from that frame's token slice, scored by binary cross-entropy + soft Dice. It teaches the encoder where
            the ventricle is. 0 (the default) builds no head; the head never changes `logits`.

    Presets: `EchoAIConfig.from_preset("tiny" | "small" | "base", **overrides)`; see `PRESETS`.
    """

    model_type = "echoai"

    image_size: int = 112
    patch_size: int = 16
    num_channels: int = 3
    num_frames: int = 16
    tubelet_size: int = 2
    stem_channels: list[int] | None = None
    position_embedding_type: Literal["separable", "sinusoidal"] = "separable"
    hidden_size: int = 384
    num_hidden_layers: int = 12
    num_attention_heads: int = 6
    intermediate_size: int = 1536
    hidden_act: str = "gelu"
    hidden_dropout_prob: float | int = 0.0
    attention_probs_dropout_prob: float | int = 0.0
    drop_path_rate: float | int = 0.0
    initializer_range: float | int = 0.02
    layer_norm_eps: float | int = 1e-6
    qkv_bias: bool = True
    decoder_hidden_size: int = 192
    decoder_num_hidden_layers: int = 4
    decoder_num_attention_heads: int = 3
    decoder_intermediate_size: int = 768
    decoder_layer_norm_eps: float | int | None = None
    norm_pix_loss: bool = True
    norm_pix_per_channel: bool = False
    reconstruction_target_pool: int = 1
    reconstruction_target: Literal["pixels", "motion", "hog"] = "pixels"
    mask_ratio: float | int = 0.9
    mask_strategy: Literal["tube", "random"] = "tube"
    decoder_mask_ratio: float | int = 0.0
    use_mean_pooling: bool = True
    pooling: Literal["mean", "mean_max_min"] = "mean"
    regression_loss: Literal["mse", "l1", "huber"] = "mse"
    regression_target_mean: float | int = 0.0
    regression_target_std: float | int = 1.0
    lv_segmentation_weight: float | int = 0.0

    def validate_architecture(self) -> None:
        """Reject values the model cannot be built or trained with, naming the field and its value.

        The one place EchoAIConfig is validated: `@strict` runs every `validate_*` method once after `__init__`
        (wrapping the `ValueError` in its `StrictDataclassClassValidationError`) and again when `save_pretrained`
        writes the config, so a config edited by hand is re-checked before it is saved. Types, and the choices
        of the `Literal` fields (`position_embedding_type`, `mask_strategy`, `reconstruction_target`, `pooling`,
        `regression_loss`), `@strict` checks itself on every assignment.
        """
        for name in POSITIVE_FIELDS:
            if getattr(self, name) <= 0:
                raise ValueError(f"EchoAIConfig.{name} must be a positive integer, got {getattr(self, name)!r}.")
        for small, large in DIVISIBLE_FIELDS:
            if getattr(self, large) % getattr(self, small):
                raise ValueError(
                    f"EchoAIConfig.{large}={getattr(self, large)} must be divisible by {small}={getattr(self, small)}."
                )
        if self.stem_channels is not None:
            if not self.stem_channels or min(self.stem_channels) <= 0:
                raise ValueError(
                    f"EchoAIConfig.stem_channels must be None or a non-empty list of positive integers, got "
                    f"{self.stem_channels!r}."
                )
            if self.patch_size % 2 ** len(self.stem_channels):
                raise ValueError(
                    f"EchoAIConfig.patch_size={self.patch_size} must be divisible by 2 ** len(stem_channels) = "
                    f"{2 ** len(self.stem_channels)}: each stem block halves the frame side."
                )
        for name in ("layer_norm_eps", "decoder_layer_norm_eps"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"EchoAIConfig.{name} must be positive, got {getattr(self, name)!r}.")
        if self.norm_pix_per_channel and not self.norm_pix_loss:
            raise ValueError(
                "EchoAIConfig.norm_pix_per_channel=True normalises the norm-pix target per channel; it needs "
                "norm_pix_loss=True."
            )
        if self.reconstruction_target_pool <= 0 or self.patch_size % self.reconstruction_target_pool:
            raise ValueError(
                f"EchoAIConfig.reconstruction_target_pool={self.reconstruction_target_pool} must be a positive "
                f"divisor of patch_size={self.patch_size}."
            )
        if self.reconstruction_target == "hog" and self.norm_pix_loss:
            raise ValueError(
                "EchoAIConfig.reconstruction_target='hog' is normalised per tubelet frame already; set "
                "norm_pix_loss=False, or reconstruction_target='pixels' (with reconstruction_target_pool=1 for every "
                "pixel) for MAE's normalised pixels, which the tiny preset replaces with 'hog'."
            )
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"EchoAIConfig.mask_ratio must lie in (0, 1), got {self.mask_ratio!r}.")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate", "decoder_mask_ratio"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"EchoAIConfig.{name} must lie in [0, 1), got {getattr(self, name)!r}.")
        if not self.regression_target_std > 0:
            raise ValueError(
                f"EchoAIConfig.regression_target_std must be positive, got {self.regression_target_std!r}."
            )
        if not self.lv_segmentation_weight >= 0:
            raise ValueError(
                f"EchoAIConfig.lv_segmentation_weight must be >= 0 (0 turns the LV mask loss off), got "
                f"{self.lv_segmentation_weight!r}."
            )
        # Tube masking hides whole spatial positions, so at least one must stay visible per slice.
        tokens = self.patches_per_frame if self.mask_strategy == "tube" else self.num_patches
        if int(self.mask_ratio * tokens) >= tokens:
            raise ValueError(
                f"EchoAIConfig.mask_ratio={self.mask_ratio} hides all {tokens} maskable positions; lower it."
            )

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "EchoAIConfig":
        """Build the named preset (`tiny`, `small`, `base`), with any field overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"Unknown EchoAI preset {name!r}; choose one of {sorted(PRESETS)}.")
        return cls(**{**copy.deepcopy(PRESETS[name]), **overrides})

    # Derived geometry, used by the model and the processor; never stored, so it cannot disagree.
    @property
    def patches_per_frame(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_patches(self) -> int:
        """Tokens L = T' * N of a clip at the config's geometry."""
        return (self.num_frames // self.tubelet_size) * self.patches_per_frame


__all__ = ["EchoAIConfig", "PRESETS"]
