"""The auxiliary LV segmentation loss of fine-tuning: clips placed on a traced frame, their masks, the head and its
loss, and that with the loss off nothing changes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassClassValidationError as StrictDataclassError
from transformers import AutoModelForVideoClassification

from configuration_echoai import EchoAIConfig
from data_echoai import rasterize_polygon, row_pixel_values, traced_clip_start
from modeling_echoai import EchoAIForVideoClassification
from training_echoai import clip_item, collate
from video_io_echoai import write_video
from video_processing_echoai import EchoAIVideoProcessor, clip_frame_indices


NUM_VIDEO_FRAMES, SIDE, NUM_FRAMES, PERIOD = 60, 32, 4, 3
ED_FRAME, ES_FRAME = 20, 41
ED_OUTLINE = [[4.5, 5.5], [4.5, 25.5], [20.5, 25.5], [20.5, 5.5]]  # 16 x 20 pixel centres
ES_OUTLINE = [[10.5, 8.5], [10.5, 18.5], [18.5, 18.5], [18.5, 8.5]]  # 8 x 10
TINY = dict(image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=64, problem_type="regression", num_labels=1,
            regression_target_mean=55.0, regression_target_std=10.0)  # fmt: skip


def grey_level(frame: int) -> int:
    return 10 + 3 * frame


@pytest.fixture(scope="module")
def counting_video(tmp_path_factory) -> str:
    """A lossless video whose frame i is uniformly grey at `grey_level(i)`: a clip's pixels name its frames."""
    path = tmp_path_factory.mktemp("lv") / "counting.avi"
    frames = np.stack([np.full((SIDE, SIDE), grey_level(i), dtype=np.uint8) for i in range(NUM_VIDEO_FRAMES)])
    write_video(path, frames, fps=50, codec="ffv1", pix_fmt="gray")
    return str(path)


def traced_row(path: str, **changes) -> dict:
    row = {"video_path": path, "EDFrame": ED_FRAME, "ESFrame": ES_FRAME, "EDTracing": ED_OUTLINE,
           "ESTracing": ES_OUTLINE}  # fmt: skip
    return {**row, **changes}


def plain_processor(**kwargs) -> EchoAIVideoProcessor:
    """No shift and no intensity jitter, normalisation that leaves x / 255: pixel_values * 255 are grey levels."""
    fields = dict(num_frames=NUM_FRAMES, period=PERIOD, image_size=SIDE, image_mean=0.0, image_std=1.0,
                  augment_padding=0, brightness_jitter=0, contrast_jitter=0, gamma_jitter=0)  # fmt: skip
    return EchoAIVideoProcessor(**{**fields, **kwargs})


def item(row: dict, processor: EchoAIVideoProcessor, seed: int, lv_masks: bool = True) -> dict:
    return clip_item(row, processor, torch.Generator().manual_seed(seed), 50.0, 0, lv_masks=lv_masks)


# ---- placing a traced frame in the clip ----------------------------------------------------------


@pytest.mark.parametrize("num_video_frames", [5, 9, 10, 30])
def test_traced_clip_start_samples_the_frame_at_the_position_it_names(num_video_frames):
    """Every frame some valid clip samples is placed, at each such position over many draws; the others give None."""
    num_frames, period = 4, 3
    for frame in range(num_video_frames + 1):
        clips = clip_frame_indices(num_video_frames, num_frames, period, "all")  # (starts, T), clamped to the end
        possible = {(int(clip[0]), k) for clip in clips for k in range(num_frames)
                    if clip[k] == frame and clip[0] + period * k == frame}  # sampled, not a repeat of the last frame  # fmt: skip
        generator = torch.Generator().manual_seed(frame)
        drawn = {traced_clip_start(num_video_frames, num_frames, period, frame, generator) for _ in range(60)}
        if not possible:
            assert drawn == {None}, frame
            continue
        assert drawn == possible, frame  # a uniform draw over 60 tries meets each of at most 4 positions
        for start, position in drawn:
            clip = clip_frame_indices(num_video_frames, num_frames, period, "start", clip_start=start)[0]
            assert clip[position] == frame and clip[0] == start  # a valid start, not one the sampler would clamp


def test_a_training_item_shows_its_traced_frame_at_the_stated_position_with_its_mask(counting_video):
    processor = plain_processor()
    seen = set()
    for seed in range(16):
        first = item(traced_row(counting_video), processor, seed)
        position, mask = first["lv_mask_frame"], first["lv_mask"]
        levels = (first["pixel_values"][:, 0].mean(dim=(1, 2)) * 255).round().tolist()  # (T,)
        frame = next(f for f, outline in ((ED_FRAME, ED_OUTLINE), (ES_FRAME, ES_OUTLINE))
                     if torch.equal(mask, torch.from_numpy(rasterize_polygon(outline, SIDE, SIDE)).float()))  # fmt: skip
        assert levels == [grey_level(frame + PERIOD * (k - position)) for k in range(NUM_FRAMES)]
        seen.add((frame, position))
        again = item(traced_row(counting_video), processor, seed)  # deterministic per seed
        assert torch.equal(again["pixel_values"], first["pixel_values"]) and torch.equal(again["lv_mask"], mask)
    assert {frame for frame, _ in seen} == {ED_FRAME, ES_FRAME} and len({p for _, p in seen}) > 2


def test_items_without_a_usable_tracing_carry_no_mask_and_collate_fills_zeros(counting_video):
    processor = plain_processor()
    traced = item(traced_row(counting_video), processor, 0)
    untraced = item(traced_row(counting_video, EDFrame=-1, ESFrame=-1, EDTracing=[], ESTracing=[]), processor, 0)
    beyond = item(traced_row(counting_video, EDFrame=NUM_VIDEO_FRAMES, ESFrame=NUM_VIDEO_FRAMES + 3), processor, 0)
    for other in (untraced, beyond):
        assert other["lv_mask"] is None and other["lv_mask_frame"] == -1
        assert other["pixel_values"].shape == traced["pixel_values"].shape
    # Traced frames no clip samples: the ordinary random clip, drawn after the choice of ED or ES.
    generator = torch.Generator().manual_seed(0)
    torch.randint(2, (1,), generator=generator)
    expected = row_pixel_values({"video_path": counting_video}, processor, generator)
    assert torch.equal(beyond["pixel_values"], expected)
    batch = collate([traced, untraced])
    assert batch["lv_masks"].shape == (2, SIDE, SIDE) and torch.equal(batch["lv_masks"][0], traced["lv_mask"])
    assert not batch["lv_masks"][1].any()
    assert batch["lv_mask_frames"].tolist() == [traced["lv_mask_frame"], -1]


def test_with_the_loss_off_items_and_batches_are_todays(counting_video):
    processor = plain_processor(augment_padding=4, brightness_jitter=0.02)
    plain = item(traced_row(counting_video), processor, 5, lv_masks=False)
    assert set(plain) == {"pixel_values", "labels", "index", "error"}
    expected = processor(counting_video, clip_sampling="random", do_augment=True,
                         generator=torch.Generator().manual_seed(5))["pixel_values"][0]  # fmt: skip
    assert torch.equal(plain["pixel_values"], expected)
    assert not {"lv_masks", "lv_mask_frames"} & set(collate([plain, plain]))


# ---- the head and its loss -----------------------------------------------------------------------


def tiny_model(weight: float, seed: int = 0) -> EchoAIForVideoClassification:
    torch.manual_seed(seed)
    return EchoAIForVideoClassification(EchoAIConfig(**TINY, lv_segmentation_weight=weight)).eval()


def inputs(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    masks = (torch.rand(3, 32, 32, generator=generator) > 0.7).float()
    masks[1] = 0.25  # a soft target
    return dict(pixel_values=torch.randn(3, 4, 3, 32, 32, generator=generator), labels=torch.tensor([40.0, 55, 70]),
                lv_masks=masks, lv_mask_frames=torch.tensor([3, 0, -1]))  # fmt: skip


def mask_loss_by_hand(model, pixel_values, masks, frames) -> torch.Tensor:
    """BCE + soft Dice, written out: frame 3 of a 4-frame clip is token slice 1 (tubelet 2), patch (r, c) of the
    4 x 4 grid covers rows 8r..8r+7 and columns 8c..8c+7, in row-major token order."""
    tokens = model.echoai(pixel_values).last_hidden_state.view(3, 2, 16, 32)  # (B, T', N, D)
    losses = []
    for b in (0, 1):  # item 2 has no mask
        patches = model.lv_head.proj(model.lv_head.norm(tokens[b, int(frames[b]) // 2]))  # (16, 64)
        image = torch.zeros(32, 32)
        for n in range(16):
            r, c = divmod(n, 4)
            image[8 * r : 8 * r + 8, 8 * c : 8 * c + 8] = patches[n].view(8, 8)
        p, m = torch.sigmoid(image), masks[b]
        bce = -(m * torch.log(p) + (1 - m) * torch.log(1 - p)).mean()
        dice = 1 - (2 * (p * m).sum() + 1) / (p.sum() + m.sum() + 1)
        losses.append(bce + dice)
    return sum(losses) / 2


def test_the_loss_is_the_ef_loss_plus_weight_times_bce_and_dice():
    model, batch = tiny_model(0.5), inputs()
    outputs = model(**batch)
    ef_loss = F.mse_loss(model(batch["pixel_values"]).logits.view(-1), batch["labels"]) / 10.0**2  # unit scale
    by_hand = mask_loss_by_hand(model, batch["pixel_values"], batch["lv_masks"], batch["lv_mask_frames"])
    torch.testing.assert_close(outputs.head_loss, ef_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs.lv_segmentation_loss, by_hand, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs.loss, ef_loss + 0.5 * by_hand, rtol=1e-5, atol=1e-6)
    assert outputs.lv_mask_logits.shape == (3, 32, 32)
    no_masks = model(**{**batch, "lv_mask_frames": torch.tensor([-1, -1, -1])})
    assert float(no_masks.lv_segmentation_loss.detach()) == 0.0 and torch.equal(no_masks.loss, no_masks.head_loss)


def test_the_mask_loss_alone_trains_the_encoder_and_the_head_but_not_the_ef_head():
    model, batch = tiny_model(1.0).train(), inputs()
    model(**{**batch, "labels": None}).loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert grads["classifier.weight"] is None
    for name in ("lv_head.proj.weight", "echoai.embeddings.patch_embeddings.projection.weight",
                 "echoai.encoder.layer.0.attention.qkv.weight"):  # fmt: skip
        assert grads[name] is not None and grads[name].abs().sum() > 0, name


def test_with_weight_zero_there_is_no_head_and_the_head_never_changes_predictions():
    off, on = tiny_model(0.0), tiny_model(1.0)
    assert off.lv_head is None and not any("lv_head" in k for k in off.state_dict())
    assert {k: v for k, v in on.state_dict().items() if not k.startswith("lv_head")}.keys() == off.state_dict().keys()
    off.load_state_dict({k: v for k, v in on.state_dict().items() if not k.startswith("lv_head")})
    pixel_values = inputs()["pixel_values"]
    assert torch.equal(on(pixel_values).logits, off(pixel_values).logits)
    assert len(off(pixel_values, labels=torch.tensor([40.0, 55, 70])).to_tuple()) == 2  # (loss, logits), as before
    with pytest.raises(ValueError, match="no LV segmentation head: build it with lv_segmentation_weight > 0"):
        off(**inputs())


def test_a_model_with_the_head_saves_reloads_and_predicts_through_the_auto_class(tmp_path):
    model, batch = tiny_model(1.0), inputs()
    model.save_pretrained(tmp_path)
    for loaded in (EchoAIForVideoClassification.from_pretrained(tmp_path),
                   AutoModelForVideoClassification.from_pretrained(tmp_path)):  # fmt: skip
        assert loaded.config.lv_segmentation_weight == 1.0
        for name, value in model.state_dict().items():
            assert torch.equal(value, loaded.state_dict()[name]), name
        torch.testing.assert_close(loaded(**batch).loss, model(**batch).loss, rtol=0, atol=0)
        assert torch.equal(loaded(batch["pixel_values"]).logits, model(batch["pixel_values"]).logits)
    without, info = EchoAIForVideoClassification.from_pretrained(
        tmp_path, lv_segmentation_weight=0.0, output_loading_info=True
    )
    assert without.lv_head is None and not info["unexpected_keys"]  # the head is left behind quietly
    assert torch.equal(without(batch["pixel_values"]).logits, model(batch["pixel_values"]).logits)


@pytest.mark.parametrize("weight", [-1.0, float("nan")])
def test_a_negative_weight_is_rejected_naming_the_field(weight):
    with pytest.raises(StrictDataclassError, match="lv_segmentation_weight must be >= 0"):
        EchoAIConfig(**TINY, lv_segmentation_weight=weight)


def test_masks_of_another_size_or_without_frames_are_rejected():
    model, batch = tiny_model(1.0), inputs()
    with pytest.raises(ValueError, match=r"lv_masks must be \(batch, height, width\) = \(3, 32, 32\)"):
        model(**{**batch, "lv_masks": batch["lv_masks"][:, :16]})
    with pytest.raises(ValueError, match="lv_masks need lv_mask_frames"):
        model(**{**batch, "lv_mask_frames": None})
