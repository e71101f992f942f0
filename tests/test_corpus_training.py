"""Pretraining on a prepared corpus: map-style, streamed, a streamed run resumed from its checkpoint, and two
processes each streaming their own part."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from data_fixtures import tiny_corpus
from safetensors.torch import load_file
from test_training import TINY_MODEL, load_script
from transformers import AutoModelForPreTraining

import corpus_echoai
import training_echoai
from modeling_echoai import EchoAIForPreTraining
from video_processing_echoai import EchoAIVideoProcessor


BATCH = 2


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The tiny synthetic corpus's 8 videos prepared into 8 one-row shards (32 x 32)."""
    output_dir = tmp_path_factory.mktemp("prepared") / "corpus"
    videos = tiny_corpus(tmp_path_factory) / "Videos"
    corpus_echoai.prepare_corpus([videos], output_dir, salt="test", image_size=32, shard_size_mb=0.02, progress=False)
    assert len(list((output_dir / "data").glob("*.parquet"))) == 8
    return output_dir


@pytest.fixture(autouse=True)
def no_stream_shutdown_sleep(monkeypatch):
    # `datasets` sleeps 5 s whenever a parquet stream's reader threads stop (end of a pass, or abandoned).
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


def record_rows(monkeypatch) -> list[str]:
    """The `video_id` of every row the next loaded pretraining script turns into a clip, in order."""
    read, rows = training_echoai.row_pixel_values, []

    def recording(row, *args, **kwargs):
        rows.append(row["video_id"])
        return read(row, *args, **kwargs)

    monkeypatch.setattr(training_echoai, "row_pixel_values", recording)
    return rows


def argv(corpus: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--dataset_path", str(corpus), "--cache_dir", str(corpus.parent / "hf_cache"), "--output_dir", str(output_dir),
        "--config_overrides", TINY_MODEL, "--per_device_train_batch_size", str(BATCH), "--reconstruction_steps", "0",
        "--logging_steps", "1", *extra,
    ]  # fmt: skip


def all_video_ids(corpus: Path) -> set[str]:
    return set(corpus_echoai.load_corpus(corpus, streaming=True)["video_id"])


def test_map_style_pretraining_reads_every_row_once_an_epoch(prepared, tmp_path, monkeypatch):
    rows = record_rows(monkeypatch)
    result = load_script("pretrain").main(argv(prepared, tmp_path / "run", "--max_train_steps", "4"))
    assert result.state.global_step == 4 and sorted(result.seen) == list(range(8))  # 8 rows, 4 batches of 2
    assert set(rows) == all_video_ids(prepared) and len(rows) == 8
    model = AutoModelForPreTraining.from_pretrained(tmp_path / "run")
    assert isinstance(model, EchoAIForPreTraining)
    processor = EchoAIVideoProcessor.from_pretrained(tmp_path / "run")
    assert 0.0 < processor.image_mean[0] < 1.0 and processor.image_std[0] > 0.0  # from the corpus's rows


def test_streaming_pretraining_passes_over_the_stream_in_epochs(prepared, tmp_path, monkeypatch):
    rows = record_rows(monkeypatch)
    result = load_script("pretrain").main(
        argv(prepared, tmp_path / "run", "--streaming", "--shuffle_buffer_size", "4", "--max_train_steps", "6")
    )
    # 8 rows = 4 batches a pass: 6 steps are one pass and half of the next, reshuffled.
    assert (result.state.global_step, result.state.epoch, result.state.batches_in_epoch) == (6, 1, 2)
    assert result.seen == [*range(8), *range(4)]
    assert set(rows[:8]) == all_video_ids(prepared)
    assert (tmp_path / "run" / "model.safetensors").is_file()


def resume_from(checkpoint: Path, output_dir: Path, corpus: Path, *extra: str):
    """Copy a checkpoint into a fresh output folder and resume from it there."""
    shutil.copytree(checkpoint, output_dir / "checkpoints" / checkpoint.name)
    return load_script("pretrain").main(argv(corpus, output_dir, *extra, "--resume_from_checkpoint", "latest"))


def test_streaming_resume_continues_the_stream_bit_identically(prepared, tmp_path, monkeypatch):
    """Without a shuffle buffer a resumed stream continues exactly: same rows, clips, masks, weights."""
    flags = ("--streaming", "--shuffle_buffer_size", "0", "--max_train_steps", "6")
    rows = record_rows(monkeypatch)
    straight = load_script("pretrain").main(
        argv(prepared, tmp_path / "straight", *flags, "--checkpointing_steps", "3")
    )
    checkpoint = tmp_path / "straight" / "checkpoints" / "step_0000003"
    assert (checkpoint / "data_state_0.json").is_file()
    rows_straight = list(rows)
    rows.clear()

    resumed = resume_from(checkpoint, tmp_path / "resumed", prepared, *flags)  # crosses into the second pass
    assert resumed.state.global_step == 6 and resumed.seen == straight.seen[3 * BATCH :]
    assert rows == rows_straight[3 * BATCH :], "the resumed run must read on from the saved position"
    expected, actual = (
        load_file(tmp_path / "straight" / "model.safetensors"),
        load_file(tmp_path / "resumed" / "model.safetensors"),
    )
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)


def test_streaming_resume_with_a_shuffle_buffer_goes_on_from_the_read_position(prepared, tmp_path, monkeypatch):
    """The shuffle buffer's content is not saved (`datasets` restores the shards' read position only), so a
    resumed pass is not exact: around the checkpoint up to a buffer of rows may be skipped or seen again. It
    still goes on from where it stopped rather than replaying the pass from its start."""
    buffer = 4
    flags = ("--streaming", "--shuffle_buffer_size", str(buffer), "--max_train_steps", "4")
    rows = record_rows(monkeypatch)
    load_script("pretrain").main(argv(prepared, tmp_path / "first", *flags, "--checkpointing_steps", "2"))
    before = set(rows[: 2 * BATCH])
    rows.clear()
    resumed = resume_from(tmp_path / "first" / "checkpoints" / "step_0000002", tmp_path / "resumed", prepared, *flags)
    assert resumed.seen[0] == 2 * BATCH, "positions go on from the checkpoint"
    rest_of_pass = resumed.seen.index(0) if 0 in resumed.seen else len(resumed.seen)  # until the next pass
    assert 0 < rest_of_pass <= 8 - 2 * BATCH, "the pass was replayed from its start"
    assert len(before & set(rows[:rest_of_pass])) <= buffer


def test_streaming_checkpoints_refuse_dataloader_workers(prepared, tmp_path):
    with pytest.raises(ValueError, match="need --num_workers 0"):
        load_script("pretrain").main(
            argv(
                prepared,
                tmp_path / "run",
                "--streaming",
                "--max_train_steps",
                "2",
                "--num_workers",
                "1",
                "--checkpointing_steps",
                "1",
            )  # fmt: skip
        )
    with pytest.raises(SystemExit):  # a stream has no length to count epochs by
        load_script("pretrain").parse_args(argv(prepared, tmp_path / "run", "--streaming"))


def _two_process_streaming_run(corpus: str, output_dir: str) -> None:
    import pytest
    import torch.distributed as dist

    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0
    rows = record_rows(pytest.MonkeyPatch())
    args = argv(Path(corpus), Path(output_dir), "--streaming", "--shuffle_buffer_size", "0", "--max_train_steps", "2")
    result = load_script("pretrain").main(args)
    seen = [None, None]
    dist.all_gather_object(seen, rows)
    assert not set(seen[0]) & set(seen[1]), f"processes streamed the same rows: {seen}"
    assert set(seen[0]) | set(seen[1]) == all_video_ids(Path(corpus)), "2 processes x 2 steps x 2 rows: all 8"
    flat = torch.cat([p.detach().reshape(-1) for p in result.model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1]), "gradients were not synchronised"


def test_two_processes_stream_disjoint_parts_and_stay_in_sync(prepared, tmp_path):
    """Two real CPU processes (gloo), each streaming its own shards (`split_corpus_by_node`), none split again
    by accelerate. A fresh interpreter, as in test_training's two-process test."""
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        "from accelerate import debug_launcher; from test_corpus_training import _two_process_streaming_run; "
        f"debug_launcher(_two_process_streaming_run, args=({str(prepared)!r}, {str(tmp_path / 'run')!r}), "
        "num_processes=2)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "model.safetensors").is_file()
