#!/usr/bin/env python
"""Masked-autoencoder pretraining of EchoAI on echo videos.

    accelerate launch scripts/pretrain.py                      # tiny preset, built-in synthetic corpus
    accelerate launch scripts/pretrain.py --data_dir EchoNet-Dynamic --config_name small --mixed_precision bf16
    accelerate launch --config_file configs/accelerate/4gpu_bf16.yaml scripts/pretrain.py --data_dir ... --config_name base

A prepared corpus (`scripts/prepare_corpus.py`: parquet shards, local or `hf://` / `s3://`) replaces `--data_dir`:

    accelerate launch scripts/pretrain.py --dataset_path /data/corpus              # map-style, as a folder
    accelerate launch --config_file configs/accelerate/multinode.yaml scripts/pretrain.py \
        --dataset_path hf://datasets/org/echo-corpus --streaming --max_train_steps 100000 --checkpointing_steps 1000

Map-style (default) indexes the corpus (an Arrow copy cached once per node) and reads each clip's row when
it is needed; the data order, sharding across processes and exact resume are those of `--data_dir`.
`--streaming` reads the parquet shards in place, never copying the corpus: shard order and a
`--shuffle_buffer_size` buffer are reshuffled each pass, each process reads its own part (whole shards
when their count is a multiple of the process count), and a resumed run continues every process's stream
where its checkpoint left it (`--num_workers 0`; exact with `--shuffle_buffer_size 0`; with a buffer, whose
content is not saved, up to a buffer of rows around the checkpoint may be skipped or seen twice). Epochs are passes over the stream, which may
end at different steps on different processes, hence `--max_train_steps` and no `--checkpointing_steps epoch`.

Reads top to bottom: arguments -> accelerator -> data -> model, optimizer, schedule -> prepare -> loop
-> save. The loop, checkpoints, resume and signal handling are shared with fine-tuning
(`training_echoai.py`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch
from datasets import Dataset

from configuration_echoai import EchoAIConfig
from corpus_echoai import check_shards, load_corpus, shuffle_corpus, split_corpus_by_node
from data_echoai import load_echonet_dynamic, load_video_folder, row_frames, synthetic_echonet_dir
from modeling_echoai import EchoAIForPreTraining
from perf_echoai import keep_freed_memory, use_fastest_attention
from training_echoai import (
    StreamingClips,
    TrainingClips,
    add_common_args,
    build_accelerator,
    build_optimizer,
    build_processor,
    count_parameters,
    create_hub_repo,
    derive_seed,
    describe_start,
    exit_on_run_error,
    from_pretrained_with_geometry,
    make_dataloader,
    parse_config_overrides,
    push_to_hub,
    render_model_card,
    save_model,
    save_reconstruction,
    save_text,
    share_of_target_predicted,
    skip_damaged_shards,
    train,
    unwrap,
)


logger = logging.getLogger("pretrain")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument(
        "--splits", default="train,validation,test", help="EchoNet splits whose videos are used, unlabeled."
    )
    parser.add_argument(
        "--reconstruction_steps", type=int, default=100, help="Save a reconstruction PNG every N steps."
    )
    parser.add_argument(
        "--dataset_path",
        default=None,
        help="A prepared corpus (scripts/prepare_corpus.py): local folder, hf://datasets/org/name, s3://... "
        "Replaces --data_dir.",
    )
    parser.add_argument("--streaming", action="store_true", help="Stream --dataset_path instead of indexing it.")
    parser.add_argument(
        "--shuffle_buffer_size",
        type=int,
        default=1000,
        help="Rows in the streaming shuffle buffer (0: shard order only; resumes exactly).",
    )
    parser.add_argument(
        "--cache_dir", default=None, help="Where a map-style corpus's Arrow copy is cached (default: datasets')."
    )
    # damaged_shards: a corpus's shards left out as damaged ({file: reason}, `load_videos`), for all_results.json
    parser.set_defaults(output_dir="outputs/pretrain", learning_rate=1e-3, num_train_epochs=16, damaged_shards={})
    args = parser.parse_args(argv)
    if args.dataset_path and args.data_dir:
        parser.error("give --data_dir or --dataset_path, not both")
    if args.streaming and not args.dataset_path:
        parser.error("--streaming needs --dataset_path (a prepared corpus)")
    if args.streaming and args.max_train_steps is None:
        parser.error("--streaming needs --max_train_steps: a stream has no length to count epochs by")
    if args.streaming and args.checkpointing_steps == "epoch":
        parser.error("--streaming: epochs end at different steps on different processes; use --checkpointing_steps N")
    return args


def load_videos(args: argparse.Namespace, accelerator):
    """The unlabeled videos: a prepared corpus (a table or a stream of rows), an EchoNet-layout folder, any
    folder of videos, or the synthetic corpus. A corpus's damaged shards are left out and recorded in
    `args.damaged_shards` (an error when they are more than --max_bad_fraction of the shards)."""
    with accelerator.main_process_first():  # one process generates / checks, the others reuse its cache
        if args.dataset_path:
            num_shards, args.damaged_shards = check_shards(args.dataset_path)
            skip_damaged_shards(args.damaged_shards, num_shards, args.max_bad_fraction)
            return args.dataset_path, load_corpus(
                args.dataset_path, streaming=args.streaming, cache_dir=args.cache_dir, exclude=args.damaged_shards
            )
        data_dir = Path(args.data_dir) if args.data_dir else synthetic_echonet_dir(args.synthetic_num_videos)
        if (data_dir / "FileList.csv").is_file():
            splits = load_echonet_dynamic(data_dir)
            wanted = [s.strip() for s in args.splits.split(",") if s.strip()]
            unknown = set(wanted) - set(splits)
            if unknown:
                raise ValueError(f"--splits names {sorted(unknown)}; {data_dir} has {sorted(splits)}")
            paths = [p for name in wanted for p in splits[name]["video_path"]]
            return data_dir, Dataset.from_dict({"video_path": paths})
        return data_dir, load_video_folder(data_dir)


def build_model(args: argparse.Namespace) -> EchoAIForPreTraining:
    overrides = parse_config_overrides(args.config_overrides)
    if args.model_name_or_path:
        return from_pretrained_with_geometry(EchoAIForPreTraining, args.model_name_or_path, overrides)
    return EchoAIForPreTraining(EchoAIConfig.from_preset(args.config_name, **overrides))


def build_data(args: argparse.Namespace, accelerator, config: EchoAIConfig, videos):
    """The processor (from the starting checkpoint, else the videos' statistics) and the training clips: a stream
    of this process's part of the corpus with `--streaming`, else a map-style table."""
    if args.streaming:  # the same seed on every process: one shard order, then each process takes its part
        videos = shuffle_corpus(videos, seed=args.seed, buffer_size=args.shuffle_buffer_size)
    with accelerator.main_process_first():
        processor = build_processor(args, config, videos, read_frames=row_frames if args.dataset_path else None)
    if args.streaming:
        rows = split_corpus_by_node(videos, rank=accelerator.process_index, world_size=accelerator.num_processes)
        dataset = StreamingClips(rows, processor, seed=args.seed, rank=accelerator.process_index)
    else:
        dataset = TrainingClips(videos, processor, seed=args.seed)
    return processor, dataset


# Below this share of its target's variance predicted at the end of a run, the decoder has collapsed to predicting
# the target's mean: its loss is the target's variance, and the encoder learns (almost) nothing from it. Collapsed
# runs measured within 0.002 of 0, learning ones 0.2-0.5 (docs/EXPERIMENTS.md, section 3, item 22).
COLLAPSED_SHARE = 0.02
SHARE = "target_share_predicted"  # the name of the share in the run's history (`TrainingState.history`)


def mean_of_last(values: list[float]) -> tuple[float | None, int]:
    """The mean of the last quarter of `values` (at most 20 of them, at least 1) and how many that is: one step's
    value depends on its batch and mask."""
    window = max(1, min(20, len(values) // 4))
    return (sum(values[-window:]) / window if values else None), window


def share_predicted(model, batch: dict, outputs) -> float:
    """The share of the batch's reconstruction target the decoder predicts (`share_of_target_predicted`)."""
    with torch.no_grad():
        target = model.reconstruction_target(batch["pixel_values"], outputs.mask.bool())
        return share_of_target_predicted(float(outputs.loss.detach()), float(target.float().var()))


def percent(share: float) -> str:
    """A share as a percentage with one decimal, "0.0" rather than "-0.0" for a hair below zero."""
    return f"{round(100 * share, 1) + 0.0:.1f}"


def collapse_warning(share: float | None) -> str | None:
    """Why the run's checkpoint is not pretrained, in words (the log, the results and the model card), or None."""
    if share is None or share >= COLLAPSED_SHARE:
        return None
    return (
        f"At the end of pretraining the decoder predicts {percent(share)} % of its target's variance: it outputs "
        "about the target's mean whatever it sees"
    )


def print_loss_trend(accelerator, result, share: float | None) -> None:
    """The reconstruction loss at the start and the end of the run, each a mean over a window of steps, and the share
    of the target's variance the decoder predicts at the end; a warning if that share says it collapsed."""
    losses = result.state.history.get("loss", [])  # the whole run's, also when it was resumed
    if not losses:
        return
    last, window = mean_of_last(losses)
    first = sum(losses[:window]) / window
    predicted = f"; the decoder predicts {percent(share)} % of its target's variance" if share is not None else ""
    accelerator.print(
        f"Reconstruction loss (mean of {window} steps): first {first:.4f}, last {last:.4f}{predicted} "
        f"({result.state.global_step} steps, {result.seconds:.0f} s)"
    )
    if warning := collapse_warning(share):
        logger.warning(
            "%s. Its encoder was trained through a decoder that predicts nothing (docs/EXPERIMENTS.md, section 3, "
            "item 22: such an encoder stayed near its initialisation).",
            warning,
        )


def log_run(args: argparse.Namespace, accelerator, model, num_videos: int | None, data_dir) -> None:
    effective_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        "Pretraining %s (%.2f M parameters) on %s videos from %s: %d steps, effective batch %d "
        "(%d per device x %d processes x %d accumulation), mask ratio %.2f, precision %s",
        args.model_name_or_path or args.config_name, count_parameters(model) / 1e6, num_videos or "streamed", data_dir,
        args.max_train_steps, effective_batch, args.per_device_train_batch_size, accelerator.num_processes,
        args.gradient_accumulation_steps, unwrap(accelerator, model).config.mask_ratio, accelerator.mixed_precision,
    )  # fmt: skip
    if args.with_tracking:
        accelerator.init_trackers(
            "echoai-pretrain", {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        )


def masked_reconstruction_step(args: argparse.Namespace, accelerator, model, processor):
    """`train`'s `compute_loss` and `on_step` for pretraining: hide tubelets, reconstruct them, and save a picture
    of it every `--reconstruction_steps`; at every logging step `on_step` records in the run's history, under
    `SHARE`, the share of the target's variance the decoder predicts (`share_predicted`).

    Masks (and, with `decoder_mask_ratio`, the decoder's) are drawn from a generator seeded by (seed, step,
    process), so a resumed run hides the same tubelets.
    """

    def compute_loss(model, batch, step):
        generator = torch.Generator().manual_seed(derive_seed(args.seed, step, accelerator.process_index))
        mask = unwrap(accelerator, model).make_mask(batch["pixel_values"], generator=generator)
        decoder_mask = unwrap(accelerator, model).make_decoder_mask(mask, generator=generator)  # None: full decoder
        outputs = model(pixel_values=batch["pixel_values"], bool_masked_pos=mask, decoder_bool_masked_pos=decoder_mask)
        return outputs.loss, outputs

    def on_step(step, batch, outputs):
        if accelerator.is_main_process and args.reconstruction_steps and step % args.reconstruction_steps == 0:
            save_reconstruction(unwrap(accelerator, model), batch["pixel_values"], outputs, processor,
                                Path(args.output_dir) / "reconstructions" / f"step_{step:07d}.png")  # fmt: skip
        if step % args.logging_steps == 0 or step == args.max_train_steps:
            return {SHARE: share_predicted(unwrap(accelerator, model), batch, outputs)}
        return None

    return compute_loss, on_step


def collect_results(args: argparse.Namespace, result, share: float | None, start: dict | None) -> dict:
    """`all_results.json`: the checkpoint pretraining continued (`describe_start`; None from a random
    initialisation), the run's length, its losses, the share of its target the decoder predicts at the end (and
    whether that says it collapsed), and the data it could not read."""
    state = result.state
    losses = state.history.get("loss", [])  # the whole run's, also when it was resumed
    return {
        "start": start,
        "steps": state.global_step, "epochs": state.epoch, "seconds": round(result.seconds, 2),
        "train_seconds": round(state.train_seconds, 2), "stopped_by_time": result.stopped_by_time,
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "target_share_predicted": share, "decoder_collapsed": None if share is None else share < COLLAPSED_SHARE,
        "videos_seen": state.videos_seen, "videos_skipped": state.videos_skipped,
        "damaged_shards": sorted(args.damaged_shards), "nonfinite_skipped": state.nonfinite_skipped,
    }  # fmt: skip


def save_outputs(
    args: argparse.Namespace, accelerator, model, processor, result, share: float | None, data_dir, num_videos, start
) -> None:
    """The model (safetensors + remote code), its processor, `all_results.json`, the model card (with a warning at
    its top when the decoder collapsed) and the Hub upload."""
    save_model(accelerator, model, processor, args.output_dir)
    if not accelerator.is_main_process:
        return
    save_text(
        Path(args.output_dir) / "all_results.json", json.dumps(collect_results(args, result, share, start), indent=2)
    )
    card = render_model_card(unwrap(accelerator, model), args, task="pretraining", dataset_dir=data_dir,
                             num_videos=num_videos, train_result=result,
                             dataset_name="prepared echo corpus" if args.dataset_path else None,
                             failure=collapse_warning(share), start=start)  # fmt: skip
    save_text(Path(args.output_dir) / "README.md", str(card))
    if args.push_to_hub:
        push_to_hub(args.output_dir, args.hub_model_id, token=args.hub_token)


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    accelerator = build_accelerator(args)
    create_hub_repo(args, accelerator)  # before anything costly: a bad token or no network fails in seconds
    keep_freed_memory()
    os.makedirs(args.output_dir, exist_ok=True)

    # Data
    data_dir, videos = load_videos(args, accelerator)
    model = build_model(args)
    start = describe_start(args.model_name_or_path)  # before --output_dir is written
    use_fastest_attention(model, accelerator.device, accelerator.mixed_precision, training=True)
    processor, dataset = build_data(args, accelerator, model.config, videos)
    dataloader = make_dataloader(dataset, args.per_device_train_batch_size, args.num_workers)

    # Optimizer and schedule: AdamW (0.9, 0.95) with linear warm-up and cosine decay, as MAE.
    optimizer, scheduler = build_optimizer(model, args, accelerator, dataloader)
    if args.streaming:  # already split per process: accelerate must not shard or dispatch it again
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    else:
        model, optimizer, dataloader, scheduler = accelerator.prepare(model, optimizer, dataloader, scheduler)
    num_videos = None if args.streaming else len(videos)
    log_run(args, accelerator, model, num_videos, data_dir)

    # The loop
    compute_loss, on_step = masked_reconstruction_step(args, accelerator, model, processor)
    result = train(accelerator, model, optimizer, scheduler, dataloader, args, compute_loss, on_step=on_step)
    result.model = unwrap(accelerator, model)
    if result.stopped_by_signal:
        accelerator.end_training()
        return result
    share, _ = mean_of_last(result.state.history.get(SHARE, []))  # what the decoder predicts at the run's end
    print_loss_trend(accelerator, result, share)

    save_outputs(args, accelerator, model, processor, result, share, data_dir, num_videos, start)
    accelerator.end_training()
    return result


if __name__ == "__main__":
    with exit_on_run_error():
        main(sys.argv[1:])
