"""Baselines for EchoAI's EF estimates: EchoNet-Dynamic's own network, R(2+1)D-18, with a one-output head.

EchoNet-Dynamic (Ouyang et al., Nature 2020) regresses EF with torchvision's `r2plus1d_18`. Its architecture is
written here from the paper -- Tran et al., "A Closer Look at Spatiotemporal Convolutions for Action
Recognition", CVPR 2018 -- because torchvision cannot be used beside the project's CPU torch build (PyPI's wheel
fails to import: "operator torchvision::nms does not exist"). The layers, widths and parameter count are those of
torchvision's model, so it is the network EchoNet-Dynamic trains, randomly initialised (no weight download):

* (2+1)D convolution: a t × d × d convolution factorised into a 1 × d × d spatial one, BN, ReLU and a t × 1 × 1
  temporal one, with M = floor(t·d²·N_in·N_out / (d²·N_in + t·N_out)) channels between them, the number that
  keeps the parameter count of the full 3D convolution (the paper's section 3.5). As in torchvision (and so in
  EchoNet-Dynamic), both convolutions of a residual block use the M of the block's *input* width; the paper's
  formula per convolution would give the second convolution of each widening block a few more channels.
* Stem: 1 × 7 × 7 convolution to 45 channels with spatial stride 2, BN, ReLU, 3 × 1 × 1 convolution to 64, BN, ReLU.
* Four stages of two basic residual blocks (64, 128, 256, 512 channels); the first block of stages 2-4 halves
  time, height and width (stride 2 in both parts of its (2+1)D convolution) and projects its shortcut with a
  1 × 1 × 1 convolution + BN.
* Global average pooling over (T, H, W), then a linear head.
* Optional (`lv_segmentation_weight` > 0), for the auxiliary LV-mask loss EchoAI trains with when the training videos
  have tracings: the counterpart of `EchoAILVMaskHead` -- a LayerNorm and a linear layer on each cell of the last
  stage's feature map, in the temporal slice that holds the traced frame, each cell giving the mask logits of the
  16 × 16 pixels it covers (the map's stride; EchoAI's tiny preset has 16-pixel patches, so both heads are one
  linear layer per 16 × 16 block on the deepest features). The same loss (`modeling_echoai.add_lv_segmentation_loss`),
  so both models can get the same supervision. EchoNet-Dynamic segments with a separate DeepLabV3; this head is
  not that network, only the same extra signal.

31,300,638 parameters with one output: torchvision's 31,505,325 with its 400-class head, less 400 × 513, plus
513. The baseline is the default, full width. `base_width` / `stem_width` / `blocks_per_stage` shrink it, for tests
(2 / 2 / 1: 12.5 k parameters) or for CPU budgets, where the full network gets few steps in a fixed time (step
times: docs/EXPERIMENTS.md, section 2).

Input and output follow `EchoAIForVideoClassification` with `num_labels=1`: `pixel_values` (B, T, C, H, W) from
the same processor, `labels` EF in %, the head trained on the unit-scale target (EF - mean) / std with the training
split's mean and std, `logits` (B, 1) in EF %. So `training_echoai.train` and `predict_split` run it unchanged, on
the same loss (`scripts/finetune.py --baseline r2plus1d_18`).

Shape letters: B batch, T frames, C channels, H × W pixels; T', H', W' after striding; D feature width.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file, save_file
from torch import nn


try:  # loaded as Hub remote code, beside a fine-tuned model, through `inference_echoai.py`
    from .modeling_echoai import EchoAIForVideoClassificationOutput, add_lv_segmentation_loss
except ImportError:  # installed as a top-level module
    from modeling_echoai import EchoAIForVideoClassificationOutput, add_lv_segmentation_loss


CONFIG_FILE = "baseline_config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class R2Plus1DConfig:
    """The baseline's configuration: widths, the clip geometry its processor makes, and the EF scaling.

    Args:
        num_channels: channels of `pixel_values` (EchoNet: 3).
        num_frames, image_size: the clips the processor makes (the network itself takes any T, H, W; these only
            size the processor, as `EchoAIConfig`'s do).
        base_width: channels of the first stage; stages 2-4 double it (R(2+1)D-18: 64).
        stem_width: channels between the stem's spatial and temporal convolutions (R(2+1)D-18: 45).
        blocks_per_stage: residual blocks in each of the four stages (R(2+1)D-18: 2).
        num_labels: outputs of the head; 1 regresses EF.
        regression_loss: "mse", "l1" or "huber", on the unit-scale target.
        regression_target_mean, regression_target_std: the head predicts (EF - mean) / std; `logits` are EF in %.
        lv_segmentation_weight: weight of the auxiliary LV-mask loss (`EchoAIConfig.lv_segmentation_weight`); above
            0 the model has an LV head (`R2Plus1DLVMaskHead`), trained only through `lv_masks`.
    """

    num_channels: int = 3
    num_frames: int = 16
    image_size: int = 112
    base_width: int = 64
    stem_width: int = 45
    blocks_per_stage: int = 2
    num_labels: int = 1
    regression_loss: str = "mse"
    regression_target_mean: float = 0.0
    regression_target_std: float = 1.0
    lv_segmentation_weight: float = 0.0
    problem_type: str = "regression"  # read by code written for `EchoAIConfig`; the baseline only regresses

    def __post_init__(self):
        for name in ("num_channels", "num_frames", "image_size", "base_width", "stem_width", "blocks_per_stage"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"R2Plus1DConfig.{name} must be a positive integer, got {value!r}.")
        if self.num_labels != 1 or self.problem_type != "regression":
            raise ValueError(
                f"R2Plus1DConfig regresses one target (num_labels=1, problem_type='regression'), got num_labels="
                f"{self.num_labels!r}, problem_type={self.problem_type!r}."
            )
        if self.regression_loss not in ("mse", "l1", "huber"):
            raise ValueError(
                f"R2Plus1DConfig.regression_loss must be 'mse', 'l1' or 'huber', got {self.regression_loss!r}."
            )
        weight = self.lv_segmentation_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ValueError(
                f"R2Plus1DConfig.lv_segmentation_weight must be a number >= 0 (0: no LV head), got {weight!r}."
            )
        if not self.regression_target_std > 0:
            raise ValueError(
                f"R2Plus1DConfig.regression_target_std must be positive, got {self.regression_target_std!r}."
            )

    @classmethod
    def from_overrides(cls, **overrides) -> R2Plus1DConfig:
        """The defaults (R(2+1)D-18 at 16 × 112²) with `overrides`; an unknown field is an error that lists the known."""
        unknown = sorted(set(overrides) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"R2Plus1DConfig has no field(s) {unknown}; the baseline takes {sorted(cls.__dataclass_fields__)} "
                "(EchoAI's transformer fields do not apply to it)."
            )
        return cls(**overrides)


def mid_channels(in_channels: int, out_channels: int, t: int = 3, d: int = 3) -> int:
    """M = floor(t·d²·N_in·N_out / (d²·N_in + t·N_out)): the channels between a (2+1)D convolution's spatial and
    temporal parts for which it has as many parameters as a full t × d × d convolution (Tran et al. 2018, 3.5)."""
    return (t * d * d * in_channels * out_channels) // (d * d * in_channels + t * out_channels)


class Conv2Plus1D(nn.Sequential):
    """A 3 × 3 × 3 convolution factorised in space then time: 1 × 3 × 3 conv, BN, ReLU, 3 × 1 × 1 conv.

    A stride s is split the same way: (1, s, s) in the spatial part, (s, 1, 1) in the temporal part. No biases:
    a BN follows each part (the temporal part's is the caller's).
    """

    def __init__(self, in_channels: int, out_channels: int, mid: int, stride: int = 1):
        super().__init__(
            nn.Conv3d(in_channels, mid, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1), bias=False),
            nn.BatchNorm3d(mid),
            nn.ReLU(inplace=True),
            nn.Conv3d(mid, out_channels, (3, 1, 1), stride=(stride, 1, 1), padding=(1, 0, 0), bias=False),
        )


class ResidualBlock(nn.Module):
    """He et al.'s basic block with (2+1)D convolutions: conv, BN, ReLU, conv, BN, + shortcut, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        mid = mid_channels(in_channels, out_channels)  # for both convolutions, as torchvision's (module docstring)
        self.conv1 = Conv2Plus1D(in_channels, out_channels, mid, stride)
        self.bn1 = nn.BatchNorm3d(out_channels)
        self.conv2 = Conv2Plus1D(out_channels, out_channels, mid)
        self.bn2 = nn.BatchNorm3d(out_channels)
        # A block that changes the width or the resolution projects its input to the output's shape.
        self.shortcut = (
            nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm3d(out_channels)
            )
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


# The last stage's feature map is 16 times coarser than the frame: stride 2 in the stem and in stages 2, 3 and 4.
FEATURE_STRIDE = 16


class R2Plus1DLVMaskHead(nn.Module):
    """The LV-mask head: each cell of the last stage's map, in the temporal slice that holds the traced frame, gives
    the FEATURE_STRIDE × FEATURE_STRIDE mask logits of the pixels it covers (LayerNorm + Linear per cell, as
    `EchoAILVMaskHead` per token), reassembled into the (H, W) logit image."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.proj = nn.Linear(channels, FEATURE_STRIDE**2)

    def forward(
        self, features: torch.Tensor, frames: torch.Tensor, num_frames: int, size: tuple[int, int]
    ) -> torch.Tensor:
        """(B, D, T', H', W') features of `num_frames`-frame clips, (B,) frame positions (-1: none, read as 0) ->
        the logits (B, H, W) of each clip's frame at the clip's frame `size`."""
        num_slices = features.shape[2]
        slices = (frames.clamp(min=0).to(features.device) * num_slices) // num_frames  # (B,) the slice holding it
        cells = features[torch.arange(len(slices), device=features.device), :, slices]  # (B, D, H', W')
        logits = self.proj(self.norm(rearrange(cells, "b d h w -> b h w d")))  # (B, H', W', s * s)
        image = rearrange(logits, "b h w (p q) -> b (h p) (w q)", p=FEATURE_STRIDE, q=FEATURE_STRIDE)
        if tuple(image.shape[-2:]) != tuple(size):  # a frame size that is not a multiple of the stride
            image = F.interpolate(image[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        return image


class R2Plus1DForEF(nn.Module):
    """R(2+1)D (18 layers by default) with a one-output EF head, trained like `EchoAIForVideoClassification`."""

    def __init__(self, config: R2Plus1DConfig):
        super().__init__()
        self.config = config
        width = config.base_width
        # The stem: a 3 × 7 × 7 convolution's (2+1)D form, spatial stride 2 (torchvision's 45 middle channels).
        self.stem = nn.Sequential(
            nn.Conv3d(
                config.num_channels, config.stem_width, (1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False
            ),
            nn.BatchNorm3d(config.stem_width),
            nn.ReLU(inplace=True),
            nn.Conv3d(config.stem_width, width, (3, 1, 1), padding=(1, 0, 0), bias=False),
            nn.BatchNorm3d(width),
            nn.ReLU(inplace=True),
        )
        stages, in_channels = [], width
        for i in range(4):
            out_channels = width * 2**i
            blocks = [ResidualBlock(in_channels, out_channels, stride=1 if i == 0 else 2)]
            blocks += [ResidualBlock(out_channels, out_channels) for _ in range(config.blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            in_channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(in_channels, config.num_labels)
        # Only trained through `lv_masks`; predictions never read it.
        self.lv_head = R2Plus1DLVMaskHead(in_channels) if config.lv_segmentation_weight > 0 else None
        self.init_weights()

    def init_weights(self) -> None:
        """He initialisation for the convolutions (fan-out, as ResNets), unit BN, a small head around the mean."""
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm3d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)  # unit-scale target: 0 is the training mean EF

    def forward_feature_map(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, T, C, H, W) clips -> (B, D, T', H', W'), the last stage's feature map."""
        x = rearrange(pixel_values, "b t c h w -> b c t h w")  # Conv3d wants channels before time
        return self.stages(self.stem(x))

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, T, C, H, W) clips -> (B, D) pooled features."""
        return self.forward_feature_map(pixel_values).mean(dim=(2, 3, 4))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, 1) unit-scale EF."""
        return self.head(features)

    def regression_loss(self, head_output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        mean, std = self.config.regression_target_mean, self.config.regression_target_std
        target = (labels.to(head_output.dtype).view(head_output.shape) - mean) / std
        losses = {"mse": F.mse_loss, "l1": F.l1_loss, "huber": F.huber_loss}
        return losses[self.config.regression_loss](head_output.float(), target.float())

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        lv_masks: torch.Tensor | None = None,
        lv_mask_frames: torch.Tensor | None = None,
    ) -> EchoAIForVideoClassificationOutput:
        """`pixel_values` (B, T, C, H, W) normalised by the processor; `labels` EF in %, shape (B,) or (B, 1);
        `lv_masks` (B, H, W) and `lv_mask_frames` (B,) as `EchoAIForVideoClassification` takes them (training with
        `lv_segmentation_weight` > 0). Returns `logits` (B, 1) in EF % and, with labels, the loss on the unit-scale
        target, plus the weighted LV-mask loss and the loss's parts when masks are given."""
        feature_map = self.forward_feature_map(pixel_values)  # (B, D, T', H', W')
        head_output = self.forward_head(feature_map.mean(dim=(2, 3, 4)))  # (B, 1)
        logits = head_output * self.config.regression_target_std + self.config.regression_target_mean
        loss = self.regression_loss(head_output, labels) if labels is not None else None
        parts = {}
        if lv_masks is not None:
            num_frames, size = pixel_values.shape[1], tuple(pixel_values.shape[-2:])
            loss, parts = add_lv_segmentation_loss(
                loss, self.config.lv_segmentation_weight, lv_masks, lv_mask_frames,
                None if self.lv_head is None else lambda frames: self.lv_head(feature_map, frames, num_frames, size),
            )  # fmt: skip
        return EchoAIForVideoClassificationOutput(loss=loss, logits=logits, **parts)


BASELINES = {"r2plus1d_18": R2Plus1DForEF}


def build_baseline(name: str, **config_fields) -> R2Plus1DForEF:
    """A randomly initialised baseline by name (`BASELINES`), its config's defaults overridden by `config_fields`."""
    if name not in BASELINES:
        raise ValueError(f"Unknown baseline {name!r}; choose one of {sorted(BASELINES)}.")
    return BASELINES[name](R2Plus1DConfig.from_overrides(**config_fields))


def save_baseline(model: R2Plus1DForEF, output_dir: str | os.PathLike, state_dict: dict | None = None) -> None:
    """`baseline_config.json` and `model.safetensors` (the model's, or the given gathered `state_dict`)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / CONFIG_FILE).write_text(json.dumps(asdict(model.config), indent=2) + "\n")
    state = state_dict if state_dict is not None else model.state_dict()
    save_file({name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}, output_dir / WEIGHTS_FILE)


def load_baseline(folder: str | os.PathLike) -> R2Plus1DForEF:
    """The model `save_baseline` wrote into `folder`."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"{folder} holds no baseline ({CONFIG_FILE}); it is written by finetune.py --baseline."
        )
    model = R2Plus1DForEF(R2Plus1DConfig(**json.loads((folder / CONFIG_FILE).read_text())))
    model.load_state_dict(load_file(folder / WEIGHTS_FILE))
    return model


__all__ = [
    "BASELINES",
    "FEATURE_STRIDE",
    "R2Plus1DConfig",
    "R2Plus1DForEF",
    "R2Plus1DLVMaskHead",
    "build_baseline",
    "load_baseline",
    "mid_channels",
]
