"""EchoAIVideoProcessor: decoding only what a clip needs, sampling modes, padding, normalisation, save/load."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch
from data_fixtures import file_list, tiny_corpus, truncate
from transformers.models.auto.video_processing_auto import AutoVideoProcessor

from video_io_echoai import VideoDecodingError, decode_video_frames, probe_video, write_video
from video_processing_echoai import EchoAIVideoProcessor, clip_frame_indices, compute_mean_std


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tiny_corpus(tmp_path_factory)


@pytest.fixture(scope="module")
def long_video(corpus):
    """The longest video of the tiny corpus, and its frame count."""
    table = file_list(corpus).sort_values("NumberOfFrames")
    row = table.iloc[-1]
    return corpus / "Videos" / f"{row.FileName}.avi", int(row.NumberOfFrames)


def ramp_video(num_frames: int, size: int = 112) -> np.ndarray:
    """Frame i is filled with the grey value i, so sampled frame numbers can be read back from pixels."""
    return np.broadcast_to(np.arange(num_frames, dtype=np.uint8)[:, None, None], (num_frames, size, size)).copy()


def identity_processor(**kwargs) -> EchoAIVideoProcessor:
    """Normalisation that leaves x / 255, so pixel_values * 255 are the grey values."""
    return EchoAIVideoProcessor(image_mean=0.0, image_std=1.0, **kwargs)


def test_pixel_values_shape_dtype_and_channels(long_video):
    path, _ = long_video
    batch = EchoAIVideoProcessor()([path, path])
    assert list(batch.keys()) == ["pixel_values"]
    assert batch["pixel_values"].shape == (2, 16, 3, 112, 112)
    assert batch["pixel_values"].dtype == torch.float32
    grey = EchoAIVideoProcessor(num_channels=1, num_frames=8, image_size=64)(path)["pixel_values"]
    assert grey.shape == (1, 8, 1, 64, 64)


def test_frames_follow_the_period():
    video = ramp_video(100)
    pixel_values = identity_processor(period=3, num_frames=5)(video, clip_sampling="start", clip_start=10)[
        "pixel_values"
    ]
    frame_numbers = (pixel_values[0, :, 0, 0, 0] * 255).round().tolist()
    assert frame_numbers == [10, 13, 16, 19, 22]


def test_all_clips_count_matches_echonet_protocol(long_video):
    path, num_frames = long_video
    processor = EchoAIVideoProcessor(num_frames=16, period=2)
    batch = processor(path, clip_sampling="all")
    # EchoNet: starts 0 .. n - (num_frames - 1) * period - 1.
    assert len(batch["pixel_values"]) == num_frames - 15 * 2
    assert batch["video_index"].tolist() == [0] * (num_frames - 30)
    indices = clip_frame_indices(100, num_frames=16, period=2, clip_sampling="all")
    assert indices.shape == (70, 16) and indices[-1, -1] == 99


def test_uniform_clips_span_the_video_and_index_their_video():
    processor = identity_processor(num_frames=4, period=2)
    batch = processor([ramp_video(50), ramp_video(30)], clip_sampling="uniform", num_clips=3)
    starts = (batch["pixel_values"][:, 0, 0, 0, 0] * 255).round().tolist()
    assert starts == [0, 22, 43, 0, 12, 23]  # first and last valid start (n - 3 * 2 - 1) included
    assert batch["video_index"].tolist() == [0, 0, 0, 1, 1, 1]


def test_short_video_is_padded_by_repeating_its_last_frame():
    pixel_values = identity_processor(num_frames=8, period=2)(ramp_video(10), clip_sampling="all")["pixel_values"]
    assert pixel_values.shape[0] == 1
    assert (pixel_values[0, :, 0, 0, 0] * 255).round().tolist() == [0, 2, 4, 6, 8, 9, 9, 9]


def test_random_clips_stay_in_range_and_follow_the_generator():
    indices = [
        clip_frame_indices(40, 8, 2, "random", generator=torch.Generator().manual_seed(seed)) for seed in range(30)
    ]
    starts = {int(i[0, 0]) for i in indices}
    assert len(starts) > 5 and min(starts) >= 0 and max(starts) <= 40 - 14 - 1
    again = clip_frame_indices(40, 8, 2, "random", generator=torch.Generator().manual_seed(0))
    assert np.array_equal(again, indices[0])


def test_normalisation_uses_stored_mean_and_std(long_video):
    path, num_frames = long_video
    mean, std = compute_mean_std([path], num_videos=1, num_channels=3)
    frames = decode_video_frames(path, range(num_frames)).frames / 255.0
    assert mean == pytest.approx([frames.mean()] * 3, rel=1e-6)
    assert std == pytest.approx([frames.std()] * 3, rel=1e-6)
    processor = EchoAIVideoProcessor(num_frames=num_frames, period=1, image_mean=mean, image_std=std)
    pixel_values = processor(path)["pixel_values"]  # every frame of the video
    assert pixel_values.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert pixel_values.std().item() == pytest.approx(1.0, abs=1e-3)


def test_partial_decoding_decodes_only_the_needed_frames(long_video):
    path, num_frames = long_video
    # A period-2 clip late in an MJPEG video (intra-only: every frame stands alone): seek, then decode only
    # the 16 frames it uses, skipping the packets in between.
    wanted = np.arange(num_frames - 31, num_frames, 2)
    decoded = decode_video_frames(path, wanted)
    assert decoded.num_decoded == 16 < num_frames
    # An early clip stops after its last frame.
    assert decode_video_frames(path, np.arange(0, 31, 2)).num_decoded == 16
    everything = decode_video_frames(path, np.arange(num_frames))
    assert everything.num_decoded == num_frames
    assert np.array_equal(decoded.frames, everything.frames[wanted])
    repeated = decode_video_frames(path, [9, 3, 9, 5])  # any order, repeats allowed
    assert repeated.num_decoded == 3
    assert np.array_equal(repeated.frames, everything.frames[[9, 3, 9, 5]])


def test_partial_decoding_with_inter_frames_matches_full_decode(tmp_path):
    # MP4 with a key frame every 12 frames: the seek lands on an earlier key frame and decodes forward.
    rng = np.random.default_rng(0)
    frames = (np.arange(90)[:, None, None] * 2 + rng.integers(0, 20, (90, 64, 64))).astype(np.uint8)
    path = tmp_path / "gop.mp4"
    write_video(path, frames, gop_size=12)
    with av.open(str(path)) as container:
        assert sum(p.is_keyframe for p in container.demux(container.streams.video[0])) < 90
    wanted = [50, 52, 60]
    decoded = decode_video_frames(path, wanted)
    full = decode_video_frames(path, np.arange(90)).frames
    assert np.array_equal(decoded.frames, full[wanted])
    assert 11 <= decoded.num_decoded <= 11 + 12  # at most one GOP before the first wanted frame


def test_save_and_reload_through_auto_video_processor(tmp_path, long_video):
    import configuration_echoai  # noqa: F401  (the model type the processor is registered for)

    path, _ = long_video
    processor = EchoAIVideoProcessor(
        num_frames=8, period=3, num_channels=1, image_mean=[0.13], image_std=[0.19], augment_padding=6
    )
    processor.save_pretrained(tmp_path)
    reloaded = AutoVideoProcessor.from_pretrained(tmp_path)
    assert type(reloaded) is EchoAIVideoProcessor
    assert reloaded.to_dict() == processor.to_dict()
    assert torch.equal(reloaded(path)["pixel_values"], processor(path)["pixel_values"])
    assert AutoVideoProcessor.from_pretrained(tmp_path, num_frames=4).num_frames == 4


def test_augmentation_only_when_asked(long_video):
    path, _ = long_video
    processor = EchoAIVideoProcessor()
    assert torch.equal(processor(path)["pixel_values"], processor(path)["pixel_values"])  # inference is deterministic
    generator = torch.Generator().manual_seed(0)
    augmented = processor(path, do_augment=True, generator=generator)["pixel_values"]
    assert augmented.shape == (1, 16, 3, 112, 112)
    assert not torch.equal(augmented, processor(path)["pixel_values"])
    assert processor.horizontal_flip_probability == 0.0  # left and right heart are never swapped by default


def test_augmentation_shift_is_a_translation_with_zero_fill():
    processor = identity_processor(num_frames=2, brightness_jitter=0, contrast_jitter=0, gamma_jitter=0)
    clips = torch.ones(50, 2, 112, 112)
    shifted = processor.augment(clips, torch.Generator().manual_seed(0))
    # Each clip is the all-ones image shifted by up to 12 px: ones in the middle, zero borders somewhere.
    assert torch.all(shifted[:, :, 12:-12, 12:-12] == 1)
    assert (shifted == 0).any()
    assert torch.all((shifted == 0) | (shifted == 1))


@pytest.mark.parametrize("seed", range(6))
def test_a_mask_is_resized_shifted_and_flipped_with_its_clip(seed):
    """A clip whose every frame is the mask itself comes out of resizing and augmentation (the intensity jitter
    off) equal to the mask as returned: the mask meets the same resize, crop offset and flip as the frames."""
    processor = identity_processor(num_frames=2, image_size=32, augment_padding=6, horizontal_flip_probability=0.5,
                                   brightness_jitter=0, contrast_jitter=0, gamma_jitter=0)  # fmt: skip
    mask = np.zeros((48, 40), dtype=bool)
    mask[5:30, 8:20] = True  # off-centre, so a flip or a shift changes it
    frames = np.repeat(mask[None, None] * np.uint8(255), 2, axis=1)  # (K, T, H, W)
    generator = torch.Generator().manual_seed(seed)
    pixel_values, masks = processor.frames_to_pixel_values(
        frames, do_augment=True, generator=generator, masks=mask[None]
    )
    assert masks.shape == (1, 32, 32) and masks.dtype == torch.float32
    torch.testing.assert_close(pixel_values[:, 0, 0], masks, atol=1e-6, rtol=0)
    torch.testing.assert_close(pixel_values[:, 1, 0], masks, atol=1e-6, rtol=0)
    # The same generator draws the same augmentation with or without a mask.
    plain = processor.frames_to_pixel_values(frames, do_augment=True, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(plain, pixel_values)


def test_masks_of_different_seeds_differ_by_flip_or_shift():
    processor = identity_processor(num_frames=2, image_size=32, augment_padding=6, horizontal_flip_probability=0.5)
    mask = np.zeros((1, 32, 32), dtype=bool)
    mask[0, 5:30, 8:20] = True
    frames = np.zeros((1, 2, 32, 32), dtype=np.uint8)
    draws = [processor.frames_to_pixel_values(frames, True, torch.Generator().manual_seed(s), masks=mask)[1]
             for s in range(6)]  # fmt: skip
    assert len({tuple(m.flatten().tolist()) for m in draws}) > 1
    unaugmented = processor.frames_to_pixel_values(frames, masks=mask)[1]
    assert torch.equal(unaugmented, torch.from_numpy(mask).float())


@pytest.mark.parametrize(
    "damage, reason",
    [("missing", "file not found"), ("empty", "empty file"), ("text", "cannot open"), ("truncated", "truncated")],
)
def test_unreadable_videos_raise_errors_naming_file_and_fix(tmp_path, long_video, damage, reason):
    source, num_frames = long_video
    path = tmp_path / "video.avi"
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "text":
        path.write_text("not a video\n")
    elif damage == "truncated":
        path.write_bytes(source.read_bytes())
        truncate(path, 0.5)
    with pytest.raises(VideoDecodingError, match=reason) as error:
        if damage == "truncated":
            EchoAIVideoProcessor(num_frames=16, period=1)(path, clip_sampling="start", clip_start=num_frames)
        else:
            probe_video(path)
    assert str(path) in str(error.value) and "Fix:" in str(error.value)


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="num_channels"):
        EchoAIVideoProcessor(num_channels=2)
    with pytest.raises(ValueError, match="image_mean"):
        EchoAIVideoProcessor(num_channels=3, image_mean=[0.1, 0.2])
    with pytest.raises(ValueError, match="clip_sampling"):
        clip_frame_indices(50, 4, 2, "middle")
