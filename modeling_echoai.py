"""EchoAI: a ViViT-style echocardiogram video encoder, pretrained as a masked video autoencoder.

Architecture
------------
* **Tubelet embedding** (ViViT / VideoMAE): a Conv3d with kernel = stride = (tubelet, patch, patch) turns a
  clip into a grid of tokens.
* **Separable learned position embeddings** (ViViT's spatial + temporal embeddings): token (t, n) gets
  `spatial[n] + temporal[t]`, so frame order is encoded independently of position in the frame, and
  each table can be resampled on its own axis (`interpolate_pos_encoding=True`): bicubic over the 2-D
  patch grid, linear over time.
  `position_embedding_type="sinusoidal"` holds VideoMAE's fixed sin-cos table over all tokens instead, so
  converted VideoMAE weights run exactly; it is resampled over the (T', h, w) grid the same way.
* **Encoder**: pre-norm ViT blocks (fused QKV, stochastic depth), a final LayerNorm. With a mask it encodes only
  the visible tokens (MAE). The attention kernel is whatever `config._attn_implementation` names in transformers'
  `AttentionInterface`: "sdpa" (the default), "eager", or `"echoai_chunked"`, registered by this file on import
  (`chunked_attention_forward`: the eager matmuls over batch chunks small enough for the scores to stay in the
  CPU's caches). The kernel is chosen by name, never swapped in behind another: the scripts pick it where
  docs/BENCHMARKS.md measured it faster than torch's SDPA (training on a CPU in bf16; `perf_echoai`).
* **Pretraining** (`EchoAIForPreTraining`, VideoMAE): tube masking (90 % by default), a narrow decoder over
  visible + mask tokens, pixels of the masked tubelets regressed with the norm-pix MSE loss (the `tiny` preset:
  MaskFeat's gradient histograms under random masks, `hog_patches`); with `decoder_mask_ratio` (VideoMAE V2's dual
  masking) a training step's decoder gets only a random part of them.
* **Fine-tuning** (`EchoAIForVideoClassification`): mean-pooled tokens -> head; `num_labels=1` with
  `problem_type="regression"` estimates ejection fraction.

This file imports only torch, transformers, einops and `configuration_echoai`, so `save_pretrained`
can ship it as Hub remote code.

Shape letters used in comments and einops patterns:
    B batch, T frames, C channels, H x W frame size,
    t tubelet (frames per token), p patch side, T' = T / t token slices, h = H / p, w = W / p,
    N = h * w tokens per slice, L = T' * N tokens per clip, V visible tokens, M masked tokens (V + M = L),
    D encoder width, E decoder width, P = t * p * p * C pixels per tubelet.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn
from transformers import (
    AttentionInterface,
    AutoConfig,
    AutoModel,
    AutoModelForPreTraining,
    AutoModelForVideoClassification,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, can_return_tuple
from transformers.utils.output_capturing import capture_outputs


try:  # loaded as Hub remote code: the two files sit side by side in one dynamic package
    from .configuration_echoai import EchoAIConfig
except ImportError:  # installed as top-level modules (`pip install echoai`)
    from configuration_echoai import EchoAIConfig


# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------


@dataclass
class EchoAIForPreTrainingOutput(ModelOutput):
    """
    Output of `EchoAIForPreTraining`.

    Args:
        loss (`torch.FloatTensor` of shape `()`): norm-pix MSE over the masked tubelets the decoder predicted.
        logits (`torch.FloatTensor` of shape `(B, M, P)`): predicted pixels of the masked tubelets, in the
            order of the mask's hidden entries (ascending token index); P = tubelet * patch² * channels,
            laid out as (t p q c), or with `reconstruction_target_pool` = k each frame's k x k block averages
            (P = tubelet * (patch / k)² * channels). With `norm_pix_loss` they are per-tubelet normalised pixels.
            Under decoder masking (B, K, P): only the K hidden tubelets `decoder_mask` keeps, in the same order.
        mask (`torch.FloatTensor` of shape `(B, L)`): the mask used, 1.0 = hidden and 0.0 = visible, as
            `ViTMAEForPreTrainingOutput.mask`; returned so a mask the model drew itself can be inspected or
            visualised (`mask.bool()` is the `bool_masked_pos` to pass back in).
        decoder_mask (`torch.FloatTensor` of shape `(B, L)`, *optional*): under decoder masking, 1.0 = a hidden
            tubelet the decoder left out (not predicted, not in the loss); `mask - decoder_mask` marks the K
            predicted ones. None when the full decoder ran.
        hidden_states, attentions: the encoder's, when requested.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    mask: torch.FloatTensor | None = None
    decoder_mask: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class EchoAIForVideoClassificationOutput(ImageClassifierOutput):
    """
    Output of `EchoAIForVideoClassification`: transformers' `ImageClassifierOutput` (`loss`, `logits`,
    `hidden_states`, `attentions`), plus the parts of the loss when the LV segmentation head is trained.

    Args:
        head_loss (`torch.FloatTensor` of shape `()`): the EF (or classification) loss alone, when `lv_masks` are
            given; `loss` is then `head_loss + lv_segmentation_weight * lv_segmentation_loss`.
        lv_segmentation_loss (`torch.FloatTensor` of shape `()`): binary cross-entropy + soft Dice of the LV mask,
            averaged over the clips that have one (0 when none has).
        lv_mask_logits (`torch.FloatTensor` of shape `(B, H, W)`): the LV head's logits on each clip's traced frame
            (on its first frame's token slice where the clip has none).
    """

    head_loss: torch.FloatTensor | None = None
    lv_segmentation_loss: torch.FloatTensor | None = None
    lv_mask_logits: torch.FloatTensor | None = None


# --------------------------------------------------------------------------------------------------
# Pure helpers: patchify, masking, position-table resampling
# --------------------------------------------------------------------------------------------------


def patchify(pixel_values: torch.Tensor, tubelet_size: int, patch_size: int) -> torch.Tensor:
    """(B, T, C, H, W) -> (B, L, P), tokens in the Conv3d's (T', h, w) order, pixels as (t p q c)."""
    return rearrange(
        pixel_values, "b (T t) c (h p) (w q) -> b (T h w) (t p q c)", t=tubelet_size, p=patch_size, q=patch_size
    )


def unpatchify(patches: torch.Tensor, tubelet_size: int, patch_size: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of `patchify`: (B, L, P) -> (B, T, C, H, W) for a token grid (T', h, w)."""
    num_slices, h, w = grid
    return rearrange(
        patches, "b (T h w) (t p q c) -> b (T t) c (h p) (w q)",
        T=num_slices, h=h, w=w, t=tubelet_size, p=patch_size, q=patch_size,
    )  # fmt: skip


def pooled_patches(pixel_values: torch.Tensor, config: EchoAIConfig) -> torch.Tensor:
    """(B, T, C, H, W) -> (B, L, P): tubelets with each frame average-pooled in k x k pixel blocks first when
    `config.reconstruction_target_pool` = k > 1 (P = t (p / k)² c)."""
    k = config.reconstruction_target_pool
    if k > 1:
        frames = F.avg_pool2d(pixel_values.flatten(0, 1), k)
        pixel_values = frames.unflatten(0, pixel_values.shape[:2])
    return patchify(pixel_values, config.tubelet_size, config.patch_size // k)


def static_part(pixel_values: torch.Tensor) -> torch.Tensor:
    """Each pixel's mean over the clip's frames, repeated for every frame: what a `"motion"` target leaves out."""
    return pixel_values.mean(dim=1, keepdim=True).expand_as(pixel_values)


HOG_BINS = 9  # unsigned gradient orientations over [0, pi), 20 degrees each (Dalal & Triggs; MaskFeat)


def hog_patches(pixel_values: torch.Tensor, config: EchoAIConfig) -> torch.Tensor:
    """(B, T, C, H, W) -> (B, L, t (p / k)² 9): MaskFeat's target (Wei et al. 2022), a histogram of oriented
    gradients of each frame, in k x k pixel cells (`config.reconstruction_target_pool` = k), L2-normalised over the
    cells of each tubelet frame.

    Gradients are central differences of the frame's grey level (the channels' mean); each pixel adds its gradient
    magnitude to the bin of its orientation. The local normalisation makes the target blind to gain and depth
    changes, and a cell's histogram to where in the cell an edge lies: what is left is the tissue's edges and their
    directions -- the ventricle's outline -- rather than its brightness and speckle."""
    k, batch_size = config.reconstruction_target_pool, pixel_values.shape[0]
    grey = pixel_values.float().mean(dim=2).flatten(0, 1)[:, None]  # (B T, 1, H, W)
    padded = F.pad(grey, (1, 1, 1, 1), mode="replicate")
    dx = padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]
    dy = padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]
    orientation = torch.atan2(dy, dx).remainder(torch.pi)  # [0, pi]: pi itself wraps to the last bin
    bins = (orientation * (HOG_BINS / torch.pi)).long().clamp(max=HOG_BINS - 1)
    histograms = torch.zeros(grey.shape[0], HOG_BINS, *grey.shape[2:], device=grey.device)
    histograms.scatter_(1, bins, torch.hypot(dx, dy))
    cells = F.avg_pool2d(histograms, k)  # (B T, 9, H / k, W / k)
    cells = cells.unflatten(0, (batch_size, -1))  # (B, T, 9, H / k, W / k)
    patches = patchify(cells, config.tubelet_size, config.patch_size // k)  # (B, L, t (p / k)² 9)
    frames = patches.unflatten(-1, (config.tubelet_size, -1))  # (B, L, t, (p / k)² 9)
    return F.normalize(frames, dim=-1, eps=1e-6).flatten(2).to(pixel_values.dtype)


def target_patches(pixel_values: torch.Tensor, config: EchoAIConfig) -> torch.Tensor:
    """(B, T, C, H, W) -> (B, L, P): the tubelets the decoder learns to predict (`pooled_patches`), of the pixels
    or, with `config.reconstruction_target="motion"`, of each frame minus the clip's mean frame; with `"hog"`,
    their histograms of oriented gradients (`hog_patches`)."""
    if config.reconstruction_target == "hog":
        return hog_patches(pixel_values, config)
    if config.reconstruction_target == "motion":
        pixel_values = pixel_values - static_part(pixel_values)
    return pooled_patches(pixel_values, config)


def reconstruction_target_size(config: EchoAIConfig) -> int:
    """P, the values the decoder predicts per hidden tubelet: t (p / k)² c (`target_patches`), with c the
    `HOG_BINS` orientations for a `"hog"` target."""
    channels = HOG_BINS if config.reconstruction_target == "hog" else config.num_channels
    return config.tubelet_size * (config.patch_size // config.reconstruction_target_pool) ** 2 * channels


def _centered_patches(
    patches: torch.Tensor, eps: float, groups: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, patches - mean, std) per tubelet, std from the unbiased variance + eps (as in MAE); with `groups`
    = C, per channel of each tubelet (P's last axis is the channel). Returned as (..., C, P / C): the layout
    `ungroup_patches` turns back into (t p q c).

    Two explicit passes (the mean, then the norm of the deviations) rather than `Tensor.var`: the same values
    within 1e-6, and measured faster on CPU for the (B, M, P) target of a pretraining step (docs/BENCHMARKS.md).
    """
    patches = rearrange(patches, "... (x g) -> ... g x", g=groups)  # a view when groups == 1
    mean = patches.mean(dim=-1, keepdim=True)
    centered = patches - mean
    variance = torch.linalg.vector_norm(centered, dim=-1, keepdim=True).square() / (patches.shape[-1] - 1)
    return mean, centered, (variance + eps).sqrt()


def ungroup_patches(grouped: torch.Tensor, size: int) -> torch.Tensor:
    """(..., g, x) or a (..., g, 1) statistic -> (..., P) in patchify's (t p q c) layout, P = `size`."""
    grouped = grouped.expand(*grouped.shape[:-1], size // grouped.shape[-2])  # a statistic over its group
    return rearrange(grouped, "... g x -> ... (x g)")


def patch_statistics(patches: torch.Tensor, eps: float = 1e-6, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Each tubelet's (or with `groups` = C, each tubelet channel's) pixel mean and std (unbiased variance +
    eps, as in MAE), shaped as `patches` (B, M, P)."""
    mean, _, std = _centered_patches(patches, eps, groups)
    return ungroup_patches(mean, patches.shape[-1]), ungroup_patches(std, patches.shape[-1])


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6, groups: int = 1) -> torch.Tensor:
    """MAE's norm-pix target: each tubelet's pixels minus their mean, over their std. `groups` = C normalises
    each channel of a tubelet on its own (transformers' `VideoMAEForPreTraining` target)."""
    _, centered, std = _centered_patches(patches, eps, groups)
    return ungroup_patches(centered / std, patches.shape[-1])


def make_mask(
    batch_size: int,
    grid: tuple[int, int, int],
    mask_ratio: float,
    strategy: str = "tube",
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.BoolTensor:
    """
    Draw a (B, L) boolean mask over a (T', h, w) token grid: True = hidden from the encoder, False = kept.

    `"tube"` (VideoMAE): the same int(mask_ratio * N) spatial positions are hidden in every token slice, so
    a masked patch cannot be copied from its temporal neighbour (echo frames are highly redundant).
    `"random"` (MAE-ST): int(mask_ratio * L) tokens hidden independently. Either way every sample hides the
    same number of tokens, which lets the encoder gather the visible ones into a dense (B, V, D) tensor.
    Uses `generator` if given (reproducible masks), else torch's global RNG.
    """
    num_slices, h, w = grid
    positions = h * w if strategy == "tube" else num_slices * h * w
    num_masked = int(mask_ratio * positions)
    rng_device = generator.device if generator is not None else device
    noise = torch.rand(batch_size, positions, generator=generator, device=rng_device)
    mask = lowest_noise(noise, num_masked)
    if strategy == "tube":
        mask = repeat(mask, "b n -> b (T n)", T=num_slices)
    return mask.to(device)


def lowest_noise(noise: torch.Tensor, count: int) -> torch.BoolTensor:
    """(B, K) noise -> (B, K) bool, True at each row's `count` lowest values: for uniform noise, `count` positions
    per row chosen uniformly at random (MAE's random masking, by rank)."""
    return noise.argsort(dim=1).argsort(dim=1) < count


def make_decoder_mask(
    bool_masked_pos: torch.BoolTensor, decoder_mask_ratio: float, generator: torch.Generator | None = None
) -> torch.BoolTensor:
    """
    Draw a decoder mask (VideoMAE V2's "dual masking") for an encoder mask (B, L): True = a tubelet hidden from
    the encoder that the decoder leaves out too (no mask token, no loss), False = every other token.

    int(decoder_mask_ratio * M) of each sample's M hidden tubelets are left out, chosen uniformly at random per
    sample, so every sample keeps the same K = M - int(decoder_mask_ratio * M) for the decoder to predict (a dense
    (B, K, P) prediction; K >= 1 as the ratio is below 1). VideoMAE V2 draws its decoder mask over all tokens
    ("running cell") independently of the encoder's, which leaves out the same fraction of the hidden ones on
    average; choosing among the hidden ones directly fixes K for any token grid. Uses `generator` if given
    (reproducible masks), else torch's global RNG.
    """
    num_dropped = int(decoder_mask_ratio * int(bool_masked_pos[0].sum()))
    rng_device = generator.device if generator is not None else bool_masked_pos.device
    noise = torch.rand(bool_masked_pos.shape, generator=generator, device=rng_device).to(bool_masked_pos.device)
    # Visible tokens rank last, so only hidden ones are left out (num_dropped < M).
    return lowest_noise(noise.masked_fill(~bool_masked_pos, float("inf")), num_dropped)


def decoded_positions(
    bool_masked_pos: torch.BoolTensor, decoder_bool_masked_pos: torch.BoolTensor | None
) -> torch.BoolTensor:
    """(B, L) True at the hidden tubelets the decoder predicts: all of `bool_masked_pos`'s, less those the decoder
    mask leaves out. Its entries at visible tokens are ignored (visible tokens always enter the decoder, as in
    VideoMAE V2); every sample must keep the same number, at least one."""
    if decoder_bool_masked_pos is None:
        return bool_masked_pos
    if decoder_bool_masked_pos.shape != bool_masked_pos.shape or decoder_bool_masked_pos.dtype != torch.bool:
        raise ValueError(
            f"decoder_bool_masked_pos must be a bool tensor shaped as bool_masked_pos {tuple(bool_masked_pos.shape)}, "
            f"got {decoder_bool_masked_pos.dtype} {tuple(decoder_bool_masked_pos.shape)}."
        )
    predicted = bool_masked_pos & ~decoder_bool_masked_pos
    if torch.compiler.is_compiling():  # as in `check_mask`: reading the counts would break the graph
        return predicted
    counts = predicted.sum(dim=1)
    if not bool((counts == counts[0]).all()):
        raise ValueError(
            f"decoder_bool_masked_pos leaves a different number of hidden tokens per sample to the decoder "
            f"({counts.tolist()}); every sample must keep the same count."
        )
    if int(counts[0]) == 0:
        raise ValueError(
            "decoder_bool_masked_pos leaves out every hidden token; the decoder must predict at least one."
        )
    return predicted


def resample_temporal(table: torch.Tensor, num_slices: int) -> torch.Tensor:
    """Linearly resample a (T'0, D) temporal table to (T', D); identity when the length already matches.

    Tokens are treated as cell centres (align_corners=False), i.e. the new clip spans the same time as the
    one the table was learned for, sampled more or less densely.
    """
    if table.shape[0] == num_slices:
        return table
    resampled = F.interpolate(rearrange(table, "T d -> 1 d T").float(), size=num_slices, mode="linear")
    return rearrange(resampled, "1 d T -> T d").to(table.dtype)


def resample_spatial(table: torch.Tensor, grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Bicubically resample a (h0 * w0, D) spatial table to (h * w, D); identity when the grid matches."""
    if tuple(grid) == tuple(new_grid):
        return table
    image = rearrange(table, "(h w) d -> 1 d h w", h=grid[0], w=grid[1]).float()
    resampled = F.interpolate(image, size=tuple(new_grid), mode="bicubic", align_corners=False)
    return rearrange(resampled, "1 d h w -> (h w) d").to(table.dtype)


def resample_table(table: torch.Tensor, grid: tuple[int, int, int], new_grid: tuple[int, int, int]) -> torch.Tensor:
    """Resample a full (T'0 * h0 * w0, D) position table to another (T', h, w) token grid: bicubically over the
    patch grid, linearly over time, as the separable tables are (and for a table that is temporal[t] + spatial[n],
    the same result, the resampling being linear). Identity when the grid matches."""
    if tuple(grid) == tuple(new_grid):
        return table
    num_slices, h0, w0 = grid
    frames = rearrange(table, "(T n) d -> n (T d)", T=num_slices)  # each slice's table as channels of one image
    frames = resample_spatial(frames, (h0, w0), new_grid[1:])  # (h * w, T'0 * D)
    slices = rearrange(frames, "n (T d) -> T (n d)", T=num_slices)
    slices = resample_temporal(slices, new_grid[0])  # (T', h * w * D)
    return rearrange(slices, "T (n d) -> (T n) d", d=table.shape[-1])


def sinusoidal_table(num_positions: int, width: int) -> torch.Tensor:
    """The fixed (num_positions, width) sin-cos table of "Attention Is All You Need", built as transformers'
    VideoMAE builds it: position i, channel j holds sin (even j) or cos (odd j) of i / 10000^(2 * (j // 2) / width),
    computed in float64 and rounded to float32."""
    positions = torch.arange(num_positions, dtype=torch.float64)[:, None]
    exponents = (2 * (torch.arange(width) // 2)).to(torch.float64) / width
    angles = positions / torch.pow(10000.0, exponents)  # (num_positions, width)
    table = torch.empty_like(angles)
    table[:, 0::2], table[:, 1::2] = angles[:, 0::2].sin(), angles[:, 1::2].cos()
    return table.float()


# --------------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------------


class EchoAIPositionEmbeddings(nn.Module):
    """Separable learned position embeddings: a spatial table over the patch grid and a temporal table over
    token slices, summed per token. Used by the encoder (width D) and the decoder (width E)."""

    def __init__(self, config: EchoAIConfig, width: int):
        super().__init__()
        self.grid = (config.image_size // config.patch_size,) * 2  # (h0, w0) the tables are learned for
        self.spatial = nn.Parameter(torch.zeros(self.grid[0] * self.grid[1], width))  # (N0, width)
        self.temporal = nn.Parameter(torch.zeros(config.num_frames // config.tubelet_size, width))  # (T'0, width)

    @torch.no_grad()
    def resize(self, num_slices: int, grid: tuple[int, int]) -> None:
        """Resample both tables in place to `num_slices` token slices and an (h, w) patch grid."""
        self.spatial = nn.Parameter(resample_spatial(self.spatial, self.grid, grid))
        self.temporal = nn.Parameter(resample_temporal(self.temporal, num_slices))
        self.grid = tuple(grid)

    def forward(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """The (L, width) table for a (T', h, w) token grid, resampled if it differs from the learned one."""
        num_slices, h, w = grid
        spatial = resample_spatial(self.spatial, self.grid, (h, w))  # (N, width)
        temporal = resample_temporal(self.temporal, num_slices)  # (T', width)
        return rearrange(temporal[:, None, :] + spatial[None, :, :], "T n d -> (T n) d")


class EchoAISinusoidalPositionEmbeddings(nn.Module):
    """VideoMAE's position embeddings: one fixed sin-cos table over all L tokens of the config's grid, in the
    tokens' (slice, row, column) order (`position_embedding_type="sinusoidal"`). A buffer, never trained, saved
    with the weights so a table resampled by `resize` reloads as it was; other grids are resampled from it
    (`resample_table`). Same interface as `EchoAIPositionEmbeddings`."""

    def __init__(self, config: EchoAIConfig, width: int):
        super().__init__()
        self.grid = (config.image_size // config.patch_size,) * 2  # (h0, w0) of the table
        self.num_slices = config.num_frames // config.tubelet_size  # T'0
        # Built here and again by `_init_weights` (which a model created on the meta device needs), or loaded.
        num_positions = self.num_slices * self.grid[0] * self.grid[1]
        self.register_buffer("table", sinusoidal_table(num_positions, width))  # (L0, width)

    @torch.no_grad()
    def resize(self, num_slices: int, grid: tuple[int, int]) -> None:
        """Resample the table in place to `num_slices` token slices and an (h, w) patch grid."""
        self.table = resample_table(self.table, (self.num_slices, *self.grid), (num_slices, *grid))
        self.num_slices, self.grid = num_slices, tuple(grid)

    def forward(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """The (L, width) table for a (T', h, w) token grid, resampled if it differs from the table's own."""
        return resample_table(self.table, (self.num_slices, *self.grid), grid)


# `config.position_embedding_type` -> the module holding the encoder's and the decoder's position tables.
POSITION_EMBEDDINGS = {"separable": EchoAIPositionEmbeddings, "sinusoidal": EchoAISinusoidalPositionEmbeddings}


class EchoAIConvStem(nn.Module):
    """Early convolutions before the tubelet projection ("Early Convolutions Help Transformers See Better",
    Xiao et al. 2021): `len(stem_channels)` blocks of Conv3d (3 x 3 x 3, spatial stride 2) + GroupNorm (one
    group per channel) + ReLU.

    A plain patch projection must learn edges and textures from scratch in one linear map per tubelet; a few
    strided convolutions give the encoder locality and some translation invariance first, which is what a
    ViT lacks on a few hundred labelled videos. The frame count is kept, the frame side divided by
    2 ** len(stem_channels); the projection that follows cuts the rest of the tubelet, so the token grid and
    everything after it are the ViViT encoder's.

    Under a mask the stem works as a sparse convolution (as in SparK and ConvNeXt V2): `keep` marks the visible
    pixels, each normalisation takes its statistics over the visible positions only, and the hidden positions are
    set back to zero after every block. A plain GroupNorm would take them over an input that is 90 % zeros in
    pretraining and over whole clips in fine-tuning, so every feature learned in pretraining would arrive
    rescaled in fine-tuning.
    """

    def __init__(self, config: EchoAIConfig):
        super().__init__()
        blocks, in_channels = [], config.num_channels
        for channels in config.stem_channels:
            blocks += [
                nn.Conv3d(in_channels, channels, kernel_size=3, stride=(1, 2, 2), padding=1, bias=False),
                # Per clip and channel: the same in training and inference, for any batch size (unlike BatchNorm).
                nn.GroupNorm(channels, channels, eps=config.layer_norm_eps),
                nn.ReLU(inplace=True),
            ]
            in_channels = channels
        self.blocks = nn.Sequential(*blocks)

    def forward(self, pixels: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, C_stem, T, H / 2^k, W / 2^k); `keep` (B, 1, T, H, W), 1 where visible."""
        if keep is None:
            return self.blocks(pixels)
        x, layers = pixels, list(self.blocks)
        for conv, norm, activation in (layers[i : i + 3] for i in range(0, len(layers), 3)):
            x = conv(x)
            keep = keep[..., :: conv.stride[1], :: conv.stride[2]]  # tubelets are whole blocks of pixels
            x = activation(masked_group_norm(x, keep, norm) * keep)
        return x


def masked_group_norm(x: torch.Tensor, keep: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """`norm` (one group per channel) with each clip's statistics taken where `keep` (B, 1, T, H, W) is 1."""
    dims = (2, 3, 4)
    count = keep.sum(dim=dims, keepdim=True).clamp_min(1.0)  # (B, 1, 1, 1, 1)
    mean = (x * keep).sum(dim=dims, keepdim=True) / count
    centered = x - mean  # once: the full-resolution maps are the stem's cost
    variance = (centered.square() * keep).sum(dim=dims, keepdim=True) / count
    x = centered * torch.rsqrt(variance + norm.eps)
    return x * norm.weight.view(1, -1, 1, 1, 1) + norm.bias.view(1, -1, 1, 1, 1)


class EchoAIPatchEmbeddings(nn.Module):
    """Tubelet embedding: each (t, p, p) tubelet's pixels mapped linearly to width D, stored as a Conv3d with
    kernel = stride = (t, p, p) (the layout of ViViT and VideoMAE checkpoints).

    A whole clip goes through the convolution. Under a mask only the visible tubelets are embedded, as one
    matmul over their patchified pixels with the same weights: 10 % of the work at mask ratio 0.9. (A whole clip
    keeps the convolution, which needs no patchify copy of the input; docs/BENCHMARKS.md compares the two.)

    With `config.stem_channels` a convolutional stem (`EchoAIConvStem`) runs first and the projection's kernel
    covers the rest of the tubelet (p / 2^k pixels). Under a mask the hidden tubelets' pixels are zeroed before
    the stem, and the stem then runs as a sparse convolution (`EchoAIConvStem`), so no visible token sees a hidden
    neighbour through the convolutions' overlapping windows.
    """

    def __init__(self, config: EchoAIConfig):
        super().__init__()
        self.tubelet_size, self.patch_size = config.tubelet_size, config.patch_size
        self.stem = EchoAIConvStem(config) if config.stem_channels else None
        stride = config.patch_size // 2 ** len(config.stem_channels or [])
        self.projection = nn.Conv3d(
            config.stem_channels[-1] if config.stem_channels else config.num_channels,
            config.hidden_size,
            kernel_size=(config.tubelet_size, stride, stride),
            stride=(config.tubelet_size, stride, stride),
        )

    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: torch.BoolTensor | None = None) -> torch.Tensor:
        if self.stem is not None:
            return self.forward_stem(pixel_values, bool_masked_pos)
        if bool_masked_pos is None:
            x = self.projection(rearrange(pixel_values, "b T c H W -> b c T H W"))  # (B, D, T', h, w)
            # Contiguous: the view's strides (L*D, 1, L) would otherwise follow the residual stream through
            # every layer, costing a copy per LayerNorm and slow elementwise adds.
            return rearrange(x, "b d T h w -> b (T h w) d").contiguous()  # (B, L, D)
        # Index the visible tubelets out of a strided view: only they are copied (patchify would copy all L).
        tubelets = rearrange(
            pixel_values,
            "b (T t) c (h p) (w q) -> b T h w t p q c",
            t=self.tubelet_size,
            p=self.patch_size,
            q=self.patch_size,
        )  # (B, T', h, w, t, p, q, C), a view
        visible = tubelets[~bool_masked_pos.view(tubelets.shape[:4])]  # (B * V, t, p, q, C)
        visible = rearrange(visible, "(b v) t p q c -> b v (t p q c)", b=pixel_values.shape[0])  # (B, V, P)
        # `patchify` orders a tubelet's pixels (t p q c); the convolution kernel is (c t p q).
        weight = rearrange(self.projection.weight, "d c t p q -> d (t p q c)")
        return F.linear(visible, weight, self.projection.bias)  # (B, V, D)

    def forward_stem(self, pixel_values: torch.Tensor, bool_masked_pos: torch.BoolTensor | None) -> torch.Tensor:
        x = rearrange(pixel_values, "b T c H W -> b c T H W")
        if bool_masked_pos is None:
            return rearrange(self.projection(self.stem(x)), "b d T h w -> b (T h w) d").contiguous()  # (B, L, D)
        keep = self.visible_pixels(bool_masked_pos, x.shape).to(x.dtype)  # (B, 1, T, H, W)
        x = rearrange(self.projection(self.stem(x * keep, keep)), "b d T h w -> b (T h w) d")  # (B, L, D)
        return select_rows(x, ~bool_masked_pos)  # (B, V, D)

    def visible_pixels(self, bool_masked_pos: torch.BoolTensor, shape: torch.Size) -> torch.BoolTensor:
        """(B, 1, T, H, W): True at every pixel of a (B, C, T, H, W) clip whose tubelet `bool_masked_pos` keeps."""
        t, p = self.tubelet_size, self.patch_size
        grid = dict(T=shape[2] // t, h=shape[3] // p, w=shape[4] // p)
        keep = rearrange(~bool_masked_pos, "b (T h w) -> b 1 T h w", **grid)
        return keep.repeat_interleave(t, dim=2).repeat_interleave(p, dim=3).repeat_interleave(p, dim=4)


class EchoAIEmbeddings(nn.Module):
    """Tubelet embedding + position embeddings (`config.position_embedding_type`), of the visible tubelets only
    when masked."""

    def __init__(self, config: EchoAIConfig):
        super().__init__()
        self.config = config
        self.patch_embeddings = EchoAIPatchEmbeddings(config)
        self.position_embeddings = POSITION_EMBEDDINGS[config.position_embedding_type](config, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.BoolTensor | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> torch.Tensor:
        grid = token_grid(self.config, pixel_values, interpolate_pos_encoding)
        batch_size, num_tokens = pixel_values.shape[0], grid[0] * grid[1] * grid[2]
        positions = self.position_embeddings(grid)  # (L, D), broadcast over the batch
        if bool_masked_pos is not None:
            check_mask(bool_masked_pos, batch_size, num_tokens)
            positions = select_positions(positions, ~bool_masked_pos)  # (B, V, D)
        embeddings = self.patch_embeddings(pixel_values, bool_masked_pos)
        return self.dropout(embeddings + positions.to(embeddings.dtype))  # (B, V or L, D)


def select_rows(x: torch.Tensor, keep: torch.BoolTensor) -> torch.Tensor:
    """(B, L, width), (B, L) bool -> (B, K, width): each sample's rows at its K kept positions, in order (every
    sample keeps the same K, as the masks here do)."""
    return x[keep].view(x.shape[0], -1, x.shape[-1])


def select_positions(table: torch.Tensor, keep: torch.BoolTensor) -> torch.Tensor:
    """(L, width) per-position table, (B, L) bool -> (B, K, width): each sample's rows at its K kept positions, in
    order. Indexes the table itself, so neither the forward nor the backward builds a (B, L, width) copy.

    `index_select`, not `table[columns]`: the samples select many of the same rows, so the backward sums repeats.
    On CPU advanced indexing's backward adds them atomically from several threads, in an order that changes from
    call to call, and two runs of one pretraining command drifted apart by a rounding per step; `index_select`'s
    backward adds them in index order at any thread count.
    """
    columns = keep.nonzero()[:, 1]  # row-major: sample by sample, positions ascending (as `x[keep]` orders them)
    return table.index_select(0, columns).view(keep.shape[0], -1, table.shape[-1])


def token_grid(
    config: EchoAIConfig, pixel_values: torch.Tensor, interpolate_pos_encoding: bool
) -> tuple[int, int, int]:
    """Validate `pixel_values` against the config and return its token grid (T', h, w).

    Every shape error a user can make is caught here with a message naming the fix, before a reshape
    deep inside the model fails cryptically.
    """
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 5:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise ValueError(
            f"pixel_values must be a 5-D tensor (batch, frames, channels, height, width); got {shape}. "
            "A single clip needs a batch dimension: pixel_values[None]."
        )
    _, num_frames, num_channels, height, width = pixel_values.shape
    if num_channels != config.num_channels:
        raise ValueError(
            f"pixel_values has {num_channels} channels (dim 2) but the model expects num_channels="
            f"{config.num_channels}. Check the layout is (batch, frames, channels, height, width)."
        )
    if num_frames % config.tubelet_size:
        raise ValueError(f"pixel_values has {num_frames} frames, not divisible by tubelet_size={config.tubelet_size}.")
    if height % config.patch_size or width % config.patch_size:
        raise ValueError(f"Frame size {height}x{width} is not divisible by patch_size={config.patch_size}.")
    if not interpolate_pos_encoding and (num_frames, height, width) != (
        config.num_frames,
        config.image_size,
        config.image_size,
    ):
        raise ValueError(
            f"Input clip is {num_frames} frames of {height}x{width} but the model was built for "
            f"{config.num_frames} frames of {config.image_size}x{config.image_size}. Pass "
            "interpolate_pos_encoding=True to resample the position embeddings, or resize the input."
        )
    return num_frames // config.tubelet_size, height // config.patch_size, width // config.patch_size


def check_mask(bool_masked_pos: torch.Tensor, batch_size: int, num_tokens: int) -> None:
    """A usable mask is (B, L) bool and hides the same number of tokens in every sample."""
    if bool_masked_pos.shape != (batch_size, num_tokens):
        raise ValueError(
            f"bool_masked_pos has shape {tuple(bool_masked_pos.shape)}, expected (batch, tokens) = "
            f"({batch_size}, {num_tokens})."
        )
    if bool_masked_pos.dtype != torch.bool:
        raise ValueError(f"bool_masked_pos must be a bool tensor, got {bool_masked_pos.dtype}.")
    if torch.compiler.is_compiling():  # the checks below read the mask's values: a graph break each
        return
    counts = bool_masked_pos.sum(dim=1)
    if not bool((counts == counts[0]).all()):
        raise ValueError(
            f"bool_masked_pos hides a different number of tokens per sample ({counts.tolist()}); every sample "
            "must hide the same count so the visible tokens form a dense batch."
        )
    if int(counts[0]) == num_tokens:
        raise ValueError("bool_masked_pos hides every token; at least one must stay visible.")


# --------------------------------------------------------------------------------------------------
# Transformer blocks
# --------------------------------------------------------------------------------------------------


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q kᵀ · scaling) v on (B, heads, L, d) tensors; returns (B, L, heads, d) and the weights.

    The scaling is applied to q (L x d) rather than to the (L x L) scores. The softmax runs in the inputs'
    dtype: CPU and CUDA kernels accumulate half-precision inputs in fp32 and round once on output, the values
    of an fp32 softmax cast back, without an fp32 copy of the scores kept for the backward.
    """
    weights = torch.matmul(query * scaling, key.transpose(-1, -2))
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = rearrange(torch.matmul(weights, value), "b heads l d -> b l heads d")
    return output, weights


# Scores per chunk in `chunked_attention_forward`: 4 M elements (8 MB in bf16) stay in the CPU's caches.
ATTENTION_CHUNK_ELEMENTS = 1 << 22
# The name `chunked_attention_forward` is registered under in transformers' `AttentionInterface`.
CHUNKED_ATTENTION = "echoai_chunked"


def chunked_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """`eager_attention_forward` over chunks of the batch small enough for the scores to stay in cache; returns
    (B, L, heads, d) and no weights, as SDPA does. Chosen by name, `attn_implementation="echoai_chunked"`: the
    same attention as "sdpa" and "eager", a kernel for training on CPUs in half precision, where two plain matmuls
    beat torch's fused SDPA kernel (bench/bench_attention.py, docs/BENCHMARKS.md)."""
    batch_size, num_heads, length, _ = query.shape
    chunk = max(1, ATTENTION_CHUNK_ELEMENTS // (num_heads * length * key.shape[2]))
    if chunk >= batch_size:
        # One chunk: no slicing, whose backward would write each of q, k and v's gradients into a zero-filled copy.
        return eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout)[0], None
    outputs = []
    for start in range(0, batch_size, chunk):
        part = slice(start, start + chunk)
        mask = attention_mask[part] if attention_mask is not None and attention_mask.shape[0] > 1 else attention_mask
        outputs.append(eager_attention_forward(module, query[part], key[part], value[part], mask, scaling, dropout)[0])
    return (outputs[0] if len(outputs) == 1 else torch.cat(outputs)), None


# On import, so a model loaded as Hub remote code (`trust_remote_code=True`) can be given this name too.
AttentionInterface.register(CHUNKED_ATTENTION, chunked_attention_forward)


class EchoAISelfAttention(nn.Module):
    """Multi-head self-attention with one fused QKV projection; the kernel is the one `config._attn_implementation`
    names ("sdpa", "eager", "echoai_chunked", or any other registered in transformers' `AttentionInterface`)."""

    def __init__(self, config: EchoAIConfig, width: int, num_heads: int):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.scaling = (width // num_heads) ** -0.5
        self.is_causal = False
        self.dropout_prob = config.attention_probs_dropout_prob
        self.qkv = nn.Linear(width, 3 * width, bias=config.qkv_bias)
        self.proj = nn.Linear(width, width)
        self.proj_dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        qkv = rearrange(
            self.qkv(hidden_states), "b l (three heads d) -> three b heads l d", three=3, heads=self.num_heads
        )
        query, key, value = qkv.unbind(0)  # each (B, heads, L, d)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, weights = attention_interface(
            self,
            query,
            key,
            value,
            None,
            is_causal=False,
            scaling=self.scaling,
            dropout=self.dropout_prob if self.training else 0.0,
        )
        output = rearrange(output, "b l heads d -> b l (heads d)")
        return self.proj_dropout(self.proj(output)), weights


class EchoAIMLP(nn.Module):
    def __init__(self, config: EchoAIConfig, width: int, intermediate_size: int):
        super().__init__()
        self.fc1 = nn.Linear(width, intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(intermediate_size, width)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(self.act(self.fc1(hidden_states)))))


class EchoAIDropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): drop a sample's whole residual branch with probability `rate`,
    scaling the kept ones by 1 / (1 - rate). Built only when rate > 0 (else `nn.Identity`)."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class EchoAILayer(GradientCheckpointingLayer):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x)))."""

    def __init__(self, config: EchoAIConfig, width: int, num_heads: int, intermediate_size: int, drop_path: float):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.attention = EchoAISelfAttention(config, width, num_heads)
        self.layernorm_after = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.mlp = EchoAIMLP(config, width, intermediate_size)
        self.drop_path = EchoAIDropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        attention_output, _ = self.attention(self.layernorm_before(hidden_states), **kwargs)
        hidden_states = hidden_states + self.drop_path(attention_output)
        return hidden_states + self.drop_path(self.mlp(self.layernorm_after(hidden_states)))


class EchoAIEncoder(nn.Module):
    def __init__(self, config: EchoAIConfig):
        super().__init__()
        # Stochastic depth rises linearly with depth, from 0 to drop_path_rate (timm, MAE fine-tuning).
        depth = config.num_hidden_layers
        rates = [config.drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.layer = nn.ModuleList(
            EchoAILayer(config, config.hidden_size, config.num_attention_heads, config.intermediate_size, rate)
            for rate in rates
        )
        self.gradient_checkpointing = False

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        for layer in self.layer:
            hidden_states = layer(hidden_states, **kwargs)
        return hidden_states


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


class EchoAIPreTrainedModel(PreTrainedModel):
    config_class = EchoAIConfig
    config: EchoAIConfig
    base_model_prefix = "echoai"
    main_input_name = "pixel_values"
    input_modalities = "video"
    supports_gradient_checkpointing = True
    _no_split_modules = ["EchoAIEmbeddings", "EchoAILayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "hidden_states": EchoAILayer,
        "attentions": EchoAISelfAttention,
    }

    def save_pretrained(self, save_directory, *args, **kwargs):
        # Map every Auto class, not just the saved model's own, so a pretraining checkpoint also loads as
        # `AutoModelForVideoClassification` (and vice versa) with `trust_remote_code=True`.
        if not __package__:
            self.config.auto_map = {**AUTO_MAP, **(getattr(self.config, "auto_map", None) or {})}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def resize_position_embeddings(self, num_frames: int | None = None, image_size: int | None = None) -> None:
        """Make this model's own geometry another clip length and/or frame size: every position table is
        resampled once (linearly in time, bicubically in space, as `interpolate_pos_encoding=True` does per
        call) and the config updated, so the model then runs and saves at the new geometry. This is how a
        checkpoint pretrained on 16-frame clips is fine-tuned on 8-frame ones."""
        config = self.config
        num_frames = config.num_frames if num_frames is None else num_frames
        image_size = config.image_size if image_size is None else image_size
        # Validate the new geometry before touching any weight.
        EchoAIConfig(**{**config.to_diff_dict(), "num_frames": num_frames, "image_size": image_size})
        side = image_size // config.patch_size
        for module in self.modules():
            if isinstance(module, tuple(POSITION_EMBEDDINGS.values())):
                module.resize(num_frames // config.tubelet_size, (side, side))
        config.num_frames, config.image_size = num_frames, image_size

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv3d)):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, EchoAIPositionEmbeddings):
            init.trunc_normal_(module.spatial, std=std)
            init.trunc_normal_(module.temporal, std=std)
        elif isinstance(module, EchoAISinusoidalPositionEmbeddings):
            init.copy_(module.table, sinusoidal_table(*module.table.shape))
        elif isinstance(module, EchoAIForPreTraining):
            init.normal_(module.mask_token, std=std)


class EchoAIModel(EchoAIPreTrainedModel):
    """The bare EchoAI encoder: `pixel_values` (B, T, C, H, W) -> `last_hidden_state` (B, L or V, D), after
    the final LayerNorm. With `bool_masked_pos` only the visible tokens are encoded (MAE)."""

    def __init__(self, config: EchoAIConfig):
        super().__init__(config)
        self.embeddings = EchoAIEmbeddings(config)
        self.encoder = EchoAIEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embeddings

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.BoolTensor | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs,
    ) -> BaseModelOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, T, C, H, W)`): clips normalised by the processor.
            bool_masked_pos (`torch.BoolTensor` of shape `(B, L)`, *optional*): True = token hidden from the
                encoder; every sample must hide the same count. L = (T / tubelet) * (H / patch) * (W / patch),
                tokens ordered (slice, row, column).
            interpolate_pos_encoding (`bool`): allow a frame count or frame size other than the config's by
                resampling the position tables (bicubic in space, linear in time).
            output_hidden_states / output_attentions (`bool`): return every layer's input/attention weights.
        """
        embeddings = self.embeddings(pixel_values, bool_masked_pos, interpolate_pos_encoding)
        hidden_states = self.encoder(embeddings, **kwargs)
        return BaseModelOutput(last_hidden_state=self.layernorm(hidden_states))


class EchoAIDecoder(nn.Module):
    """VideoMAE's decoder: a narrow transformer over the visible tokens and one mask token per hidden tubelet to
    predict (all L tokens, or V + K under decoder masking) that predicts those tubelets' pixels."""

    def __init__(self, config: EchoAIConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            EchoAILayer(
                config, config.decoder_hidden_size, config.decoder_num_attention_heads,
                config.decoder_intermediate_size, drop_path=0.0,
            )
            for _ in range(config.decoder_num_hidden_layers)
        )  # fmt: skip
        eps = config.layer_norm_eps if config.decoder_layer_norm_eps is None else config.decoder_layer_norm_eps
        self.norm = nn.LayerNorm(config.decoder_hidden_size, eps=eps)
        self.head = nn.Linear(config.decoder_hidden_size, reconstruction_target_size(config))
        self.gradient_checkpointing = False

    def forward(self, hidden_states: torch.Tensor, num_masked: int) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        # Only the mask tokens (the last M, or K) are predicted: the visible ones are never scored.
        return self.head(self.norm(hidden_states[:, -num_masked:]))  # (B, M or K, P)


class EchoAIForPreTraining(EchoAIPreTrainedModel):
    """EchoAI encoder + VideoMAE decoder for masked-autoencoder pretraining.

    The stages are the methods: `make_mask` -> `forward_encoder` (visible tokens only) -> `forward_decoder`
    (visible + mask tokens, predict masked pixels) -> `forward_loss` (norm-pix MSE on masked tubelets).

    With `config.decoder_mask_ratio` > 0 (VideoMAE V2's dual masking) a training step also draws a decoder mask
    (`make_decoder_mask`) and the decoder gets mask tokens for, and the loss covers, only the hidden tubelets it
    keeps: a cheaper decoder. In eval mode the full decoder runs unless a `decoder_bool_masked_pos` is given.
    """

    def __init__(self, config: EchoAIConfig):
        super().__init__(config)
        self.echoai = EchoAIModel(config)
        self.encoder_to_decoder = nn.Linear(config.hidden_size, config.decoder_hidden_size, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.decoder_hidden_size))
        self.decoder_position_embeddings = POSITION_EMBEDDINGS[config.position_embedding_type](
            config, config.decoder_hidden_size
        )
        self.decoder = EchoAIDecoder(config)
        # The norm-pix target's statistics: over each tubelet (1 group) or each of its channels.
        self.norm_pix_groups = config.num_channels if config.norm_pix_per_channel else 1
        self.post_init()

    def make_mask(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.BoolTensor:
        """The (B, L) mask this model draws for `pixel_values` when none is given: `config.mask_ratio` of the
        tokens hidden with `config.mask_strategy` ("tube": T' * int(mask_ratio * N) tokens;
        "random": int(mask_ratio * L))."""
        grid = token_grid(self.config, pixel_values, interpolate_pos_encoding)
        return make_mask(
            pixel_values.shape[0], grid, self.config.mask_ratio, self.config.mask_strategy,
            device=pixel_values.device, generator=generator,
        )  # fmt: skip

    def forward_encoder(self, pixel_values, bool_masked_pos, interpolate_pos_encoding, **kwargs) -> BaseModelOutput:
        return self.echoai(
            pixel_values, bool_masked_pos=bool_masked_pos, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs
        )

    def make_decoder_mask(
        self, bool_masked_pos: torch.BoolTensor, generator: torch.Generator | None = None
    ) -> torch.BoolTensor | None:
        """The (B, L) decoder mask a training step draws for `bool_masked_pos`: True = a hidden tubelet the decoder
        leaves out, int(config.decoder_mask_ratio * M) per sample (`make_decoder_mask`); None when the ratio is 0
        (the full decoder), without drawing from `generator`."""
        if not self.config.decoder_mask_ratio:
            return None
        return make_decoder_mask(bool_masked_pos, self.config.decoder_mask_ratio, generator)

    def forward_decoder(
        self,
        visible: torch.Tensor,
        bool_masked_pos: torch.BoolTensor,
        grid: tuple[int, int, int],
        predicted_pos: torch.BoolTensor,
    ) -> torch.Tensor:
        """(B, V, D) encoded visible tokens -> (B, M, P) predicted pixels of the masked tubelets, or (B, K, P) of
        the K hidden tubelets `predicted_pos` marks under decoder masking (`decoded_positions`)."""
        visible = self.encoder_to_decoder(visible)  # (B, V, E)
        positions = self.decoder_position_embeddings(grid).to(visible.dtype)  # (L, E)
        # Tokens need not be unshuffled: attention is order-free, so each token just carries its own
        # position embedding; the mask tokens go last so the head reads them as one slice.
        visible_positions = select_positions(positions, ~bool_masked_pos)  # (B, V, E)
        masked_positions = select_positions(positions, predicted_pos)  # (B, M or K, E)
        tokens = torch.cat([visible + visible_positions, self.mask_token + masked_positions], dim=1)  # (B, V + M, E)
        return self.decoder(tokens, num_masked=masked_positions.shape[1])

    def forward_loss(
        self, pixel_values: torch.Tensor, logits: torch.Tensor, bool_masked_pos: torch.BoolTensor
    ) -> torch.Tensor:
        """Mean squared error between predicted and true pixels, over the tubelets `bool_masked_pos` marks: the
        masked ones, or under decoder masking the predicted ones (`decoded_positions`)."""
        target = self.reconstruction_target(pixel_values, bool_masked_pos)
        return F.mse_loss(logits.float(), target.float())

    def reconstruction_target(self, pixel_values: torch.Tensor, bool_masked_pos: torch.BoolTensor) -> torch.Tensor:
        """The (B, M, P) values the decoder must predict: the masked tubelets (`target_patches`), per-tubelet (or,
        with `norm_pix_per_channel`, per tubelet channel) normalised if `norm_pix_loss`. Computed from `pixel_values`
        as given (already normalised by the processor), so no dataset statistics are hidden in the model."""
        patches = select_rows(target_patches(pixel_values, self.config), bool_masked_pos)  # (B, M, P)
        return normalize_patches(patches, groups=self.norm_pix_groups) if self.config.norm_pix_loss else patches

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.BoolTensor | None = None,
        interpolate_pos_encoding: bool = False,
        decoder_bool_masked_pos: torch.BoolTensor | None = None,
        **kwargs,
    ) -> EchoAIForPreTrainingOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, T, C, H, W)`): clips normalised by the processor.
            bool_masked_pos (`torch.BoolTensor` of shape `(B, L)`, *optional*): True = hidden. When `None` the
                model draws one with `make_mask` (torch's global RNG: seed it for reproducible masks).
            interpolate_pos_encoding (`bool`): accept another frame count / size than the config's.
            decoder_bool_masked_pos (`torch.BoolTensor` of shape `(B, L)`, *optional*): True = a hidden tubelet the
                decoder leaves out (entries at visible tokens are ignored); every sample must keep the same number
                of hidden tubelets, at least one. When `None`, a training step with `config.decoder_mask_ratio` > 0
                draws one with `make_decoder_mask` (torch's global RNG); otherwise the full decoder runs.
        """
        grid = token_grid(self.config, pixel_values, interpolate_pos_encoding)
        if bool_masked_pos is None:
            bool_masked_pos = self.make_mask(pixel_values, interpolate_pos_encoding)
        outputs = self.forward_encoder(pixel_values, bool_masked_pos, interpolate_pos_encoding, **kwargs)
        if decoder_bool_masked_pos is None and self.training:  # decoder masking saves training time only
            decoder_bool_masked_pos = self.make_decoder_mask(bool_masked_pos)
        predicted_pos = decoded_positions(bool_masked_pos, decoder_bool_masked_pos)  # (B, L)
        logits = self.forward_decoder(outputs.last_hidden_state, bool_masked_pos, grid, predicted_pos)
        loss = self.forward_loss(pixel_values, logits, predicted_pos)
        return EchoAIForPreTrainingOutput(
            loss=loss,
            logits=logits,
            mask=bool_masked_pos.float(),
            decoder_mask=None if decoder_bool_masked_pos is None else (bool_masked_pos & ~predicted_pos).float(),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    @torch.no_grad()
    def reconstruct(
        self,
        pixel_values: torch.Tensor,
        logits: torch.Tensor,
        bool_masked_pos: torch.BoolTensor,
        add_static: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Turn a prediction back into videos for viewing: returns `(masked, reconstruction)`, both
        (B, T, C, H, W) in `pixel_values`' units. `masked` has hidden tubelets set to 0; `reconstruction` is the
        input with hidden tubelets replaced by the prediction (mapped back through each tubelet's true mean
        and std when `norm_pix_loss`, as in MAE's visualisation; with a `"motion"` target, plus the clip's mean
        frame unless `add_static=False`, which leaves the predicted motion itself). `logits` must predict every
        hidden tubelet: those of the full decoder (eval mode, or `decoder_bool_masked_pos` all False)."""
        config = self.config
        if config.reconstruction_target == "hog":
            raise ValueError(
                "reconstruct draws predicted pixels; a reconstruction_target='hog' model predicts gradient "
                "histograms, which have no pixels to draw."
            )
        grid = token_grid(config, pixel_values, interpolate_pos_encoding=True)
        num_masked = int(bool_masked_pos[0].sum())
        if logits.shape[1] != num_masked:
            raise ValueError(
                f"reconstruct needs logits for all {num_masked} hidden tubelets, got {logits.shape[1]} (a decoder-"
                "masked step); predict them with the full decoder: decoder_bool_masked_pos=torch.zeros_like(mask)."
            )
        patches = patchify(pixel_values, config.tubelet_size, config.patch_size)  # (B, L, P)
        prediction = logits.to(patches.dtype)
        if config.norm_pix_loss:
            true = select_rows(target_patches(pixel_values, config), bool_masked_pos)
            mean, std = patch_statistics(true, groups=self.norm_pix_groups)  # the inverse of `normalize_patches`
            prediction = prediction * std + mean
        if config.reconstruction_target == "motion" and add_static:  # what the target left out: the mean frame
            prediction = prediction + select_rows(pooled_patches(static_part(pixel_values), config), bool_masked_pos)
        if (k := config.reconstruction_target_pool) > 1:  # each predicted k x k block average fills its block
            prediction = rearrange(
                prediction, "b m (t p q c) -> b m t p q c",
                t=config.tubelet_size, p=config.patch_size // k, q=config.patch_size // k,
            ).repeat_interleave(k, dim=3).repeat_interleave(k, dim=4).flatten(2)  # fmt: skip
        masked = patches.masked_fill(bool_masked_pos[..., None], 0.0)
        reconstruction = patches.clone()
        reconstruction[bool_masked_pos] = rearrange(prediction, "b m p -> (b m) p")
        return (
            unpatchify(masked, config.tubelet_size, config.patch_size, grid),
            unpatchify(reconstruction, config.tubelet_size, config.patch_size, grid),
        )


def pool_tokens(last_hidden_state: torch.Tensor, num_slices: int) -> torch.Tensor:
    """(B, L, D) -> (B, D): the mean of all tokens (VideoMAE's pooling)."""
    return last_hidden_state.mean(dim=1)


def pool_tokens_mean_max_min(last_hidden_state: torch.Tensor, num_slices: int) -> torch.Tensor:
    """(B, L, D) -> (B, 3D): each token slice's spatial mean, then its mean, maximum and minimum over time.

    EF compares the ventricle's largest and smallest states within a cycle, wherever they fall in the clip. A
    mean over all tokens blurs the two together and leaves the encoder to line them up through attention; the
    extremes of the per-slice summaries hand them to the head directly, for any clip length or start.
    """
    slices = rearrange(last_hidden_state, "b (T n) d -> b T n d", T=num_slices).mean(dim=2)  # (B, T', D)
    return torch.cat([slices.mean(dim=1), slices.amax(dim=1), slices.amin(dim=1)], dim=-1)  # (B, 3D)


POOLINGS: dict[str, tuple[Callable[[torch.Tensor, int], torch.Tensor], int]] = {
    # name -> (pooling function, pooled width in multiples of D)
    "mean": (pool_tokens, 1),
    "mean_max_min": (pool_tokens_mean_max_min, 3),
}


class EchoAILVMaskHead(nn.Module):
    """A light dense head for the auxiliary LV segmentation loss: each token of a slice gives the p x p mask
    logits of its patch (LayerNorm + Linear, as MAE's pixel decoder head is per token), reassembled into the
    slice's (H, W) logit image. The slice's tokens summarise its `tubelet_size` frames; a traced frame is scored
    against the slice that holds it."""

    def __init__(self, config: EchoAIConfig):
        super().__init__()
        self.config = config
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.proj = nn.Linear(config.hidden_size, config.patch_size**2)

    def forward(
        self, last_hidden_state: torch.Tensor, grid: tuple[int, int, int], frames: torch.Tensor
    ) -> torch.Tensor:
        """(B, L, D) tokens of the token grid (T', h, w), (B,) frame positions (-1: none, read as 0) -> the logits
        (B, H, W) of each clip's frame."""
        num_slices, h, w = grid
        slices = (frames.clamp(min=0) // self.config.tubelet_size).to(last_hidden_state.device)  # (B,)
        tokens = rearrange(last_hidden_state, "b (T n) d -> b T n d", T=num_slices)
        tokens = tokens[torch.arange(len(slices), device=tokens.device), slices]  # (B, N, D)
        logits = self.proj(self.norm(tokens))  # (B, N, p * p)
        image = unpatchify(
            logits, tubelet_size=1, patch_size=self.config.patch_size, grid=(1, h, w)
        )  # (B, 1, 1, H, W)
        return image[:, 0, 0]


def lv_segmentation_loss(logits: torch.Tensor, masks: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy + soft Dice of LV mask logits (B, H, W) against masks (B, H, W) in [0, 1], averaged
    over the clips whose frame position is >= 0 (0 when none is; the graph still reaches every logit).

    Dice (1 - 2|P M| / (|P| + |M|), smoothed by one pixel) weighs the LV, a small part of the frame, as much as the
    background; cross-entropy alone is dominated by the background's many easy pixels (as in the segmentation
    losses of the U-Net family). Soft masks (antialiased edges) are valid targets for both."""
    logits, masks = logits.float(), masks.to(logits.device, torch.float32)
    has_mask = (frames.to(logits.device) >= 0).float()  # (B,)
    bce = F.binary_cross_entropy_with_logits(logits, masks, reduction="none").mean(dim=(1, 2))  # (B,)
    probabilities = logits.sigmoid()
    overlap = (probabilities * masks).sum(dim=(1, 2))
    dice = 1 - (2 * overlap + 1) / (probabilities.sum(dim=(1, 2)) + masks.sum(dim=(1, 2)) + 1)  # (B,)
    return ((bce + dice) * has_mask).sum() / has_mask.sum().clamp(min=1)


def add_lv_segmentation_loss(
    loss: torch.Tensor | None,
    weight: float,
    masks: torch.Tensor,
    frames: torch.Tensor | None,
    predict_masks: Callable[[torch.Tensor], torch.Tensor] | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """The auxiliary LV-mask loss of a model with an LV head, for EchoAI and the R(2+1)D baseline alike:
    `predict_masks(frames)` gives the head's logits (B, H, W) on each clip's traced frame, scored against `masks`
    (`lv_segmentation_loss`) and added to the EF `loss` with `weight` (alone where there is none); `None` for a
    model built without the head. Returns the total loss and the output's parts (`head_loss`,
    `lv_segmentation_loss`, `lv_mask_logits`)."""
    if predict_masks is None:
        raise ValueError(
            "lv_masks were given but this model has no LV segmentation head: build it with lv_segmentation_weight > 0 "
            "(finetune.py --lv_segmentation_weight)."
        )
    if frames is None:
        raise ValueError("lv_masks need lv_mask_frames: each mask's frame position in its clip (-1: none)")
    logits = predict_masks(frames)
    if masks.shape != logits.shape:
        raise ValueError(f"lv_masks must be (batch, height, width) = {tuple(logits.shape)}, got {tuple(masks.shape)}")
    lv_loss = lv_segmentation_loss(logits, masks, frames)
    weighted = weight * lv_loss
    total = weighted if loss is None else loss + weighted
    return total, dict(head_loss=loss, lv_segmentation_loss=lv_loss, lv_mask_logits=logits)


class EchoAIForVideoClassification(EchoAIPreTrainedModel):
    """EchoAI encoder + a head on the pooled tokens (`config.pooling`: the mean of all tokens, or the mean,
    maximum and minimum over time of each token slice's mean).

    `num_labels=1` (`problem_type="regression"`) estimates a continuous target such as ejection fraction: the
    head predicts `(y - regression_target_mean) / regression_target_std` and `logits` are mapped back to the
    target's units, shape (B, 1). `num_labels > 1` is classification with transformers' usual losses.
    """

    # A pretraining checkpoint's decoder is expected to be left behind when fine-tuning, and the LV segmentation
    # head (`lv_segmentation_weight`) when a model is built without it.
    _keys_to_ignore_on_load_unexpected = [r"^decoder", r"^encoder_to_decoder", r"^mask_token", r"^lv_head"]

    def __init__(self, config: EchoAIConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.echoai = EchoAIModel(config)
        # There is no class token: the clip is summarised by pooling its tokens. `use_mean_pooling` adds
        # VideoMAE's extra LayerNorm on the pooled vector (`fc_norm`).
        self.pool, multiple = POOLINGS[config.pooling]
        width = multiple * config.hidden_size
        self.fc_norm = nn.LayerNorm(width, eps=config.layer_norm_eps) if config.use_mean_pooling else nn.Identity()
        self.classifier = nn.Linear(width, config.num_labels) if config.num_labels > 0 else nn.Identity()
        # Only trained through `lv_masks`; predictions never read it.
        self.lv_head = EchoAILVMaskHead(config) if config.lv_segmentation_weight > 0 else None
        self.post_init()

    def is_regression(self) -> bool:
        return self.config.problem_type == "regression" or (self.config.problem_type is None and self.num_labels == 1)

    def forward_head(self, last_hidden_state: torch.Tensor, num_slices: int) -> torch.Tensor:
        """(B, L, D) tokens of `num_slices` token slices -> (B, num_labels) head output (unit-scale for
        regression)."""
        return self.classifier(self.fc_norm(self.pool(last_hidden_state, num_slices)))

    def regression_loss(self, head_output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        mean, std = self.config.regression_target_mean, self.config.regression_target_std
        target = (labels.to(head_output.dtype).view(head_output.shape) - mean) / std
        losses = {"mse": F.mse_loss, "l1": F.l1_loss, "huber": F.huber_loss}
        return losses[self.config.regression_loss](head_output.float(), target.float())

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        lv_masks: torch.Tensor | None = None,
        lv_mask_frames: torch.Tensor | None = None,
        **kwargs,
    ) -> EchoAIForVideoClassificationOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, T, C, H, W)`): clips normalised by the processor.
            labels (`torch.Tensor` of shape `(B,)` or `(B, num_labels)`, *optional*): EF in % for regression
                (any shape with B * num_labels values), class indices or multi-hot targets for classification.
            interpolate_pos_encoding (`bool`): accept another frame count / size than the config's.
            lv_masks (`torch.FloatTensor` of shape `(B, H, W)`, *optional*): the left-ventricle mask of one frame
                of each clip, in [0, 1], at the clip's frame size (training only; needs `lv_segmentation_weight` >
                0). The loss then adds `lv_segmentation_weight` times the mask loss.
            lv_mask_frames (`torch.LongTensor` of shape `(B,)`, *optional*, with `lv_masks`): the masked frame's
                position in each clip; -1 where a clip has no mask (it adds nothing to the loss).
        """
        outputs = self.echoai(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
        num_slices = pixel_values.shape[1] // self.config.tubelet_size  # T'
        head_output = self.forward_head(outputs.last_hidden_state, num_slices)  # (B, num_labels)
        loss = None
        if self.is_regression():
            mean, std = self.config.regression_target_mean, self.config.regression_target_std
            logits = head_output * std + mean  # back to the target's units (EF %)
            if labels is not None:
                loss = self.regression_loss(head_output, labels)
        else:
            logits = head_output
            if labels is not None:
                loss = self.loss_function(labels, logits, self.config, **kwargs)
        parts = {}
        if lv_masks is not None:
            grid = token_grid(self.config, pixel_values, interpolate_pos_encoding)
            loss, parts = add_lv_segmentation_loss(
                loss, self.config.lv_segmentation_weight, lv_masks, lv_mask_frames,
                None if self.lv_head is None else lambda frames: self.lv_head(outputs.last_hidden_state, grid, frames),
            )  # fmt: skip
        return EchoAIForVideoClassificationOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions, **parts
        )


# --------------------------------------------------------------------------------------------------
# Auto-class registration
# --------------------------------------------------------------------------------------------------

# Only when imported as the installed package: as Hub remote code the classes are found through the
# config's `auto_map` instead, and registering a second "echoai" there would clash with an installed one.
AUTO_MAP = {
    "AutoConfig": "configuration_echoai.EchoAIConfig",
    "AutoModel": "modeling_echoai.EchoAIModel",
    "AutoModelForPreTraining": "modeling_echoai.EchoAIForPreTraining",
    "AutoModelForVideoClassification": "modeling_echoai.EchoAIForVideoClassification",
}

if not __package__:
    AutoConfig.register("echoai", EchoAIConfig, exist_ok=True)
    AutoModel.register(EchoAIConfig, EchoAIModel, exist_ok=True)
    AutoModelForPreTraining.register(EchoAIConfig, EchoAIForPreTraining, exist_ok=True)
    AutoModelForVideoClassification.register(EchoAIConfig, EchoAIForVideoClassification, exist_ok=True)
    # `save_pretrained` then writes `auto_map` and copies both source files next to the weights.
    EchoAIConfig.register_for_auto_class()
    EchoAIModel.register_for_auto_class("AutoModel")
    EchoAIForPreTraining.register_for_auto_class("AutoModelForPreTraining")
    EchoAIForVideoClassification.register_for_auto_class("AutoModelForVideoClassification")


__all__ = [
    "EchoAIConfig",
    "EchoAIForPreTraining",
    "EchoAIForPreTrainingOutput",
    "EchoAIForVideoClassification",
    "EchoAIForVideoClassificationOutput",
    "EchoAIModel",
    "EchoAIPreTrainedModel",
    "CHUNKED_ATTENTION",
    "make_decoder_mask",
    "make_mask",
    "patchify",
    "unpatchify",
]
