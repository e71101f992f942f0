"""Occlusion saliency: one value per group, nothing left out changes nothing, and the map finds where EF is read."""

import shutil

import numpy as np
import pytest
import test_evaluation
import torch
from data_fixtures import tiny_corpus
from einops import rearrange
from test_evaluation import load_script
from test_modeling import tiny_config

from modeling_echoai import EchoAIForVideoClassification
from saliency_echoai import default_group_shape, occlusion_groups, occlusion_saliency, save_saliency
from video_io_echoai import decode_all_frames


model_dir = test_evaluation.model_dir  # the fixture: a tiny saved EF model (4 frames of 32²)


def regression_model(**overrides) -> EchoAIForVideoClassification:
    config = tiny_config(num_labels=1, problem_type="regression", regression_target_mean=50.0,
                         regression_target_std=10.0, **overrides)  # fmt: skip
    return EchoAIForVideoClassification(config).eval()


def test_default_groups_stay_within_the_pass_budget():
    assert default_group_shape((8, 7, 7)) == (8, 1, 1)  # 49 spatial cells: one pass each
    assert default_group_shape((8, 14, 14)) == (8, 2, 2)  # 196 cells -> 2x2 blocks: 49 passes
    assert default_group_shape((8, 14, 14), max_groups=16) == (8, 4, 4)
    ids = occlusion_groups((2, 4, 4), (1, 3, 3))  # edge blocks are smaller
    assert ids.shape == (32,) and ids.max() == 2 * 2 * 2 - 1
    assert ids.reshape(2, 4, 4)[1, 3, 3] == 7 and ids.reshape(2, 4, 4)[0, 0, 2] == 0


def test_one_value_per_group_and_an_empty_occlusion_changes_nothing():
    torch.manual_seed(0)
    model = regression_model()
    clip = torch.randn(1, 4, 3, 32, 32)
    result = occlusion_saliency(model, clip, group_shape=(2, 2, 2))
    assert result.saliency.shape == (2, 4, 4)  # (T', h, w): 4 frames / tubelet 2, 32 px / patch 8
    assert result.num_forward_passes == 4
    blocks = rearrange(result.saliency, "t (Y y) (X x) -> (Y X) (t y x)", y=2, x=2)  # one row per group
    assert np.all(blocks == blocks[:, :1])  # every tubelet of a group carries the group's value
    assert np.abs(result.saliency).max() > 0
    with torch.no_grad():
        plain = model(pixel_values=clip).logits[0, 0].item()
    assert result.ef == pytest.approx(plain, abs=1e-4)  # the masked path with nothing hidden is the model

    nothing = occlusion_saliency(model, clip, group_shape=(2, 2, 2), groups=[])
    assert nothing.num_forward_passes == 0 and np.all(nothing.saliency == 0)
    one = occlusion_saliency(model, clip, group_shape=(2, 2, 2), groups=[3])
    assert np.all(one.saliency[:, :2, :2] == 0) and one.saliency[0, 3, 3] == result.saliency[0, 3, 3]


def test_time_resolved_groups_need_mean_pooling():
    model = regression_model(pooling="mean_max_min")
    with pytest.raises(ValueError, match="pooling='mean'"):
        occlusion_saliency(model, torch.randn(1, 4, 3, 32, 32), group_shape=(1, 1, 1))
    assert occlusion_saliency(model, torch.randn(1, 4, 3, 32, 32)).saliency.shape == (2, 4, 4)
    with pytest.raises(ValueError, match="regression"):
        occlusion_saliency(
            EchoAIForVideoClassification(tiny_config(num_labels=2)).eval(), torch.randn(1, 4, 3, 32, 32)
        )


def region_clips(generator: torch.Generator, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise clips whose EF is carried only by the brightness of the top-left 8 x 8 patch (tubelet column 0, 0)."""
    clips = torch.rand(count, 4, 1, 32, 32, generator=generator) * 2 - 1
    brightness = torch.rand(count, generator=generator)
    clips[:, :, :, :8, :8] = (brightness * 2 - 1).view(-1, 1, 1, 1, 1)
    return clips.expand(-1, -1, 3, -1, -1), 30 + 40 * brightness


def test_saliency_peaks_where_the_model_reads_ef():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = regression_model(num_hidden_layers=1).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        clips, labels = region_clips(generator, 32)
        model(pixel_values=clips, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    clips, labels = region_clips(generator, 16)
    with torch.no_grad():
        error = (model(pixel_values=clips).logits[:, 0] - labels).abs().mean().item()
    assert error < 4.0, "the model did not learn to read the region; the map below would mean nothing"
    # Leaving the region out sends the estimate towards the mean EF the model falls back on, so the change is
    # large only for clips whose EF is far from it; those are the ones a map must get right.
    far = (labels - 50).abs() > 8
    assert far.sum() >= 4
    for clip in clips[far][:4]:
        magnitude = np.abs(occlusion_saliency(model, clip).saliency[0])  # (4, 4) spatial map
        assert np.unravel_index(magnitude.argmax(), magnitude.shape) == (0, 0)


def test_saved_pictures(tmp_path):
    model = regression_model()
    frames = np.random.default_rng(0).integers(0, 255, (4, 32, 32), dtype=np.uint8)
    result = occlusion_saliency(model, torch.randn(1, 4, 3, 32, 32))
    paths = save_saliency(tmp_path, "video", result, frames, [10, 12, 14, 16], fps=25.0)
    assert np.array_equal(np.load(paths["npy"]), result.saliency)
    overlay = decode_all_frames(paths["mp4"])
    assert overlay.shape[0] == 4 and overlay.shape[1:] == (32, 32)
    assert paths["png"].stat().st_size > 1000


def test_predict_writes_saliency_for_each_readable_video(model_dir, tmp_path, tmp_path_factory, capsys):
    corpus = tiny_corpus(tmp_path_factory)
    folder = tmp_path / "videos"
    folder.mkdir()
    source = sorted((corpus / "Videos").glob("*.avi"))[0]
    shutil.copy(source, folder / source.name)
    (folder / "empty.avi").write_bytes(b"")
    out = tmp_path / "saliency"

    argv = [str(folder), "--model_name_or_path", str(model_dir), "--saliency_dir", str(out)]
    assert load_script("predict").main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == [f"{source.stem}_saliency.{x}" for x in ("mp4", "npy", "png")]
    saliency = np.load(out / f"{source.stem}_saliency.npy")
    assert saliency.shape == (2, 4, 4) and np.abs(saliency).max() > 0
    assert "centred on the first beat" in capsys.readouterr().out  # the phantom beats: a cycle is found
