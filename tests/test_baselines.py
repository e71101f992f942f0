"""The R(2+1)D-18 baseline (`baselines_echoai`): torchvision's parameter count written from the paper, EchoAI's
input and output conventions, a training step, config errors and the save / load round trip."""

from __future__ import annotations

import pytest
import torch

from baselines_echoai import R2Plus1DConfig, build_baseline, load_baseline, mid_channels, save_baseline


# A few thousand parameters on 32 x 32 frames, as the other tests' TINY_MODEL.
TINY = dict(base_width=2, stem_width=2, blocks_per_stage=1, image_size=32, num_frames=4)


def tiny_baseline(**fields) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_baseline("r2plus1d_18", **{**TINY, "regression_target_mean": 55.0, "regression_target_std": 12.0,
                                            **fields})  # fmt: skip


def test_r2plus1d_18_has_torchvisions_parameter_count_with_a_one_output_head():
    model = build_baseline("r2plus1d_18")
    # torchvision.models.video.r2plus1d_18() has 31,505,325 parameters with its 400-class Kinetics head (512 x 400
    # weights + 400 biases); EchoNet-Dynamic replaces it with one output (512 + 1).
    assert sum(p.numel() for p in model.parameters()) == 31_505_325 - 512 * 400 - 400 + 512 + 1
    # Tran et al.'s M for the first stage's 3 x 3 x 3, 64 -> 64 convolution: 27 * 64 * 64 / (9 * 64 + 3 * 64).
    assert mid_channels(64, 64) == 144 and mid_channels(64, 128) == 230
    assert model.stem[0].kernel_size == (1, 7, 7) and model.stem[0].out_channels == 45
    assert [stage[0].conv1[-1].out_channels for stage in model.stages] == [64, 128, 256, 512]


def test_the_baseline_maps_echoai_clips_to_ef_and_trains_a_step_on_the_unit_scale_loss():
    model = tiny_baseline()
    assert sum(p.numel() for p in model.parameters()) < 20_000  # 12,545
    pixel_values = torch.randn(3, 4, 3, 32, 32)  # (B, T, C, H, W), as EchoAI's processor makes them
    labels = torch.tensor([40.0, 55.0, 70.0])
    outputs = model(pixel_values=pixel_values, labels=labels)
    assert outputs.logits.shape == (3, 1)
    # A fresh head outputs ~0 on the unit scale: the training mean EF.
    assert (outputs.logits - 55.0).abs().max() < 12.0
    expected = torch.nn.functional.mse_loss(((outputs.logits - 55.0) / 12.0).view(-1), (labels - 55.0) / 12.0)
    torch.testing.assert_close(outputs.loss, expected)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    outputs.loss.backward()
    optimizer.step()
    assert torch.isfinite(outputs.loss)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "head.weight" in changed and "stem.0.weight" in changed  # gradients reach the first convolution
    # Any clip length and size: global pooling, no position tables.
    assert model(pixel_values=torch.randn(2, 16, 3, 48, 40)).logits.shape == (2, 1)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="no field.*patch_size"):
        build_baseline("r2plus1d_18", patch_size=8)
    with pytest.raises(ValueError, match="base_width must be a positive integer"):
        R2Plus1DConfig(base_width=0)
    with pytest.raises(ValueError, match="num_labels=1"):
        R2Plus1DConfig(num_labels=3)
    with pytest.raises(ValueError, match="Unknown baseline 'resnet'"):
        build_baseline("resnet")


def test_a_saved_baseline_loads_with_the_same_predictions(tmp_path):
    model = tiny_baseline(regression_loss="huber").eval()
    save_baseline(model, tmp_path)
    loaded = load_baseline(tmp_path).eval()
    assert loaded.config == model.config
    clips = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(clips).logits, model(clips).logits, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="finetune.py --baseline"):
        load_baseline(tmp_path / "missing")


def test_the_lv_head_gives_each_16_pixel_block_of_the_traced_frame_from_its_cell_of_the_last_stage():
    """With `lv_segmentation_weight`, the baseline predicts the traced frame's LV mask as EchoAI does: the last
    stage's cell (r, c) in the temporal slice holding the frame gives pixels 16r..16r+15 x 16c..16c+15, and the loss
    is the EF loss + weight x `modeling_echoai.lv_segmentation_loss`."""
    from modeling_echoai import lv_segmentation_loss

    model = tiny_baseline(num_frames=16, lv_segmentation_weight=0.5)
    pixel_values, labels = torch.randn(3, 16, 3, 32, 32), torch.tensor([40.0, 55.0, 70.0])
    masks = (torch.rand(3, 32, 32) > 0.5).float()
    frames = torch.tensor([3, 12, -1])  # 16 frames in 2 slices of the last stage: slices 0, 1 and (none) 0
    outputs = model(pixel_values=pixel_values, labels=labels, lv_masks=masks, lv_mask_frames=frames)

    features = model.forward_feature_map(pixel_values)
    assert features.shape[2:] == (2, 2, 2)  # (T', H', W'): time / 8, space / 16
    by_hand = torch.zeros(3, 32, 32)
    for b, slice_ in enumerate((0, 1, 0)):
        for r in range(2):
            for c in range(2):
                cell = model.lv_head.proj(model.lv_head.norm(features[b, :, slice_, r, c]))  # (256,)
                by_hand[b, 16 * r : 16 * r + 16, 16 * c : 16 * c + 16] = cell.view(16, 16)
    torch.testing.assert_close(outputs.lv_mask_logits, by_hand, rtol=1e-5, atol=1e-6)
    mask_loss = lv_segmentation_loss(by_hand, masks, frames)
    torch.testing.assert_close(outputs.lv_segmentation_loss, mask_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs.loss, outputs.head_loss + 0.5 * mask_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs.head_loss, model(pixel_values, labels=labels).loss, rtol=0, atol=0)

    model(pixel_values, lv_masks=masks, lv_mask_frames=frames).loss.backward()  # the mask loss alone
    assert model.head.weight.grad is None  # does not train the EF head
    assert model.stem[0].weight.grad.abs().sum() > 0  # but reaches the first convolution
    # A frame size that is not a multiple of the stride still gets a full-size mask.
    odd = model(torch.randn(2, 16, 3, 40, 36), lv_masks=torch.zeros(2, 40, 36), lv_mask_frames=torch.tensor([0, 9]))
    assert odd.lv_mask_logits.shape == (2, 40, 36)


def test_without_the_weight_there_is_no_lv_head_and_the_head_never_changes_predictions(tmp_path):
    off, on = tiny_baseline(), tiny_baseline(lv_segmentation_weight=1.0)
    assert off.lv_head is None and not any(k.startswith("lv_head") for k in off.state_dict())
    off.load_state_dict({k: v for k, v in on.state_dict().items() if not k.startswith("lv_head")})
    clips = torch.randn(2, 4, 3, 32, 32)
    assert torch.equal(on(clips).logits, off(clips).logits)
    with pytest.raises(ValueError, match="no LV segmentation head: build it with lv_segmentation_weight > 0"):
        off(clips, lv_masks=torch.zeros(2, 32, 32), lv_mask_frames=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="lv_masks need lv_mask_frames"):
        on(clips, lv_masks=torch.zeros(2, 32, 32))
    with pytest.raises(ValueError, match=r"lv_masks must be \(batch, height, width\) = \(2, 32, 32\)"):
        on(clips, lv_masks=torch.zeros(2, 16, 32), lv_mask_frames=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="lv_segmentation_weight must be a number >= 0"):
        R2Plus1DConfig(lv_segmentation_weight=-1.0)
    save_baseline(on, tmp_path)  # the head and its weight travel with the model
    loaded = load_baseline(tmp_path)
    assert loaded.config.lv_segmentation_weight == 1.0 and loaded.lv_head is not None
    assert torch.equal(loaded(clips).logits, on(clips).logits)
