"""Training plumbing shared by `scripts/pretrain.py` and `scripts/finetune.py`.

The two scripts differ only in their model, data and loss; everything else lives here, once:

* `add_common_args` -- the flags of transformers' `examples/pytorch/*_no_trainer.py` scripts.
* `build_accelerator` -- `Accelerator` with mixed precision, accumulation, trackers and torch.compile from the
  flags (or from `accelerate launch` / its config, which set the same through the environment); threads for the
  process. (Speed settings, such as `keep_freed_memory`, live in `perf_echoai`; the scripts call them.)
* `TrainingClips` + `collate` -- a map-style dataset whose every random choice (epoch order, clip start,
  augmentation) is drawn from a generator seeded by (seed, epoch, video), so a resumed run sees exactly
  the batches a straight run would, with or without DataLoader workers and across processes.
* `build_processor` -- the processor that ships with the model: the starting checkpoint's, so preprocessing
  matches, else one normalised with the training videos' mean and std.
* `param_groups`, `build_optimizer` -- AdamW groups with no weight decay on norms, biases, position tables and
  the mask token (MAE), optional layer-wise learning-rate decay (BEiT / MAE fine-tuning); warm-up + cosine, over
  the steps or, with `--max_train_seconds`, over whichever of steps and seconds is further spent; optionally the
  encoder held still while the heads learn, then warmed up (`delayed_start`: linear probing, then fine-tuning).
* `Checkpoints` -- `accelerator.save_state` written to a temporary folder, sealed by a manifest and renamed into
  place (a killed save never leaves a half checkpoint), rotated, and found again by `latest` (the newest that
  verifies).
* `RunError` and its kinds (`CheckpointError`, `DiskFullError`, `BadDataError`, `HubError`) -- the faults a long
  run meets, each one line for the user (`exit_on_run_error`); `disk_full_guard`, `create_hub_repo`
  (docs/RELIABILITY.md).
* `train` -- the loop (`TrainingLoop`: setup, epoch, step, checkpointing): accumulation, clipping, skipping of
  non-finite losses, SIGTERM/SIGINT handling, checkpoints, a time budget (`TrainingClock`), progress bar and
  tracker logging. Its data comes through one small interface with two implementations, `MapSource` (a
  map-style dataset behind a prepared loader) and `StreamSource` (a stream split per process).
* `predict_split`, `BestModel` -- validation through `inference_echoai.predict_videos` (the predictor that
  `scripts/evaluate.py` reports with), shared out over the processes and gathered; the best weights by a
  validation score, kept through checkpoints.
* `save_model`, `render_model_card`, `push_to_hub` -- the end of a run.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import itertools
import json
import logging
import math
import os
import pickle
import re
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedType,
    ProjectConfiguration,
    TorchDynamoPlugin,
    broadcast,
    gather_object,
    is_compiled_module,
    send_to_device,
    set_seed,
)
from datasets import Dataset, IterableDataset
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, try_to_load_from_cache
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from configuration_echoai import PRESETS, EchoAIConfig
from data_echoai import EchoAIDataCollator, row_pixel_values, row_traced_clip
from inference_echoai import make_figure, predict_videos
from modeling_echoai import unpatchify
from perf_echoai import warn_if_half_precision_is_emulated
from video_io_echoai import VideoDecodingError, decode_all_frames
from video_processing_echoai import EchoAIVideoProcessor, compute_mean_std


logger = logging.getLogger(__name__)

HUB_IGNORE_PATTERNS = ("checkpoints/*", "logs/*", "reconstructions/*", ".partial-*")  # what a Hub upload leaves out
CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
STATE_FILE = "training_state.json"
DATA_STATE_FILE = "data_state_{rank}.json"  # a stream's position, one per process
MANIFEST_FILE = "manifest.json"  # written last: a checkpoint without a verifying one is not whole
CHECKSUM_SPAN = 2**20  # bytes hashed at each end of a checkpoint file (`file_checksum`)


# --------------------------------------------------------------------------------------------------
# Arguments and accelerator
# --------------------------------------------------------------------------------------------------


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags both scripts share, named as in transformers' `*_no_trainer.py` examples."""
    add_data_args(parser.add_argument)
    add_optimization_args(parser.add_argument)
    add_run_args(parser.add_argument)
    return parser


def add_data_args(add: Callable) -> None:
    """Where the videos, the starting model and the outputs are, and how clips are taken."""
    add(
        "--data_dir",
        type=str,
        default=None,
        help="EchoNet-Dynamic folder (FileList.csv, VolumeTracings.csv, Videos/). Default: the built-in synthetic corpus.",
    )
    add(
        "--synthetic_num_videos",
        type=int,
        default=200,
        help="Size of the synthetic corpus used when --data_dir is not given.",
    )
    add("--model_name_or_path", type=str, default=None, help="Checkpoint folder or Hub id to start from.")
    add("--config_name", choices=sorted(PRESETS), default="tiny", help="Preset to build from scratch.")
    add(
        "--config_overrides", default=None,
        help="Config fields to override, e.g. 'mask_ratio=0.95,num_frames=8'; lists with '/': 'stem_channels=24/48/96', "
        "'stem_channels=none' for the plain linear tubelet projection.",
    )  # fmt: skip
    add(
        "--period",
        type=int,
        default=4,
        help="Take every N-th frame; ignored when the processor is loaded. 16 frames x 4 span the 64 frames EchoNet-"
        "Dynamic's 32 x 2 clips do (about 1.3 s at 50 fps: a whole beat above ~47 bpm), so a clip holds both the "
        "largest and the smallest ventricle EF compares.",
    )
    add(
        "--processor_overrides", default=None,
        help="Video-processor fields to override, e.g. 'brightness_jitter=0.1,augment_padding=12' for stronger "
        "augmentation (also over a processor loaded with --model_name_or_path); saved with the model.",
    )  # fmt: skip
    add("--output_dir", type=str, default=None, help="Where checkpoints, the final model and logs go.")


def add_optimization_args(add: Callable) -> None:
    """Batch, optimizer, schedule and training length."""
    add("--per_device_train_batch_size", type=int, default=8)
    add("--per_device_eval_batch_size", type=int, default=8)
    add(
        "--learning_rate",
        type=float,
        default=None,
        help="Peak learning rate (default: the recipe's, see --help of the script).",
    )
    add("--weight_decay", type=float, default=0.05)
    add("--adam_beta2", type=float, default=0.95)
    add("--max_grad_norm", type=float, default=1.0, help="Gradient clipping (0 disables).")
    add("--num_train_epochs", type=int, default=1)
    add("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides --num_train_epochs.")
    add(
        "--max_train_seconds", type=float, default=None,
        help="Stop cleanly after this many seconds of training (evaluation and checkpoint saving not counted), or "
        "at --max_train_steps / --num_train_epochs if sooner. The warm-up and cosine decay then follow whichever "
        "budget is further spent, so the learning rate reaches 0 as time runs out. The step count becomes "
        "machine-dependent (and load-dependent): compare models by it only on one machine at one time. "
        "Unset or 0: no time limit.",
    )  # fmt: skip
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--num_warmup_steps", type=int, default=None, help="Linear warm-up steps (default: 5%% of training).")


def add_run_args(add: Callable) -> None:
    """Precision, data loading, checkpoints, logging, seeds, threads, compilation and the Hub."""
    add(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="Default: what `accelerate launch` / its config says.",
    )
    add("--num_workers", type=int, default=0, help="DataLoader worker processes.")
    add(
        "--checkpointing_steps",
        type=str,
        default=None,
        help="Save a resumable checkpoint every N optimizer steps, or 'epoch'.",
    )
    add("--checkpoints_total_limit", type=int, default=3, help="Keep only the newest N checkpoints.")
    add("--resume_from_checkpoint", type=str, default=None, help="'latest' or a checkpoint folder.")
    add("--max_consecutive_nonfinite", type=int, default=5, help="Stop after this many non-finite losses in a row.")
    add(
        "--max_bad_fraction", type=float, default=0.01,
        help="Stop when more than this share of the training videos (or of a corpus's shards) cannot be read; "
        "fewer are skipped, counted and logged (docs/RELIABILITY.md).",
    )  # fmt: skip
    add("--with_tracking", action="store_true", help="Log to the trackers named by --report_to.")
    add("--report_to", type=str, default="tensorboard", help="'tensorboard', 'wandb', 'all', ...")
    add("--logging_steps", type=int, default=10)
    add("--seed", type=int, default=0)
    add(
        "--num_threads", type=int, default=None,
        help="torch CPU threads per process (default: torch's choice). 1 avoids oversubscription when other "
        "processes share the cores: threads waiting on each other for a core stall every step.",
    )  # fmt: skip
    add(
        "--torch_compile", action="store_true",
        help="Compile the model with torch.compile (through accelerate). The first steps pay the compilation, so "
        "it pays off over long runs only (docs/BENCHMARKS.md).",
    )  # fmt: skip
    add("--torch_compile_backend", default="inductor", help="torch.compile backend with --torch_compile.")
    add("--push_to_hub", action="store_true")
    add("--hub_model_id", type=str, default=None)
    add("--hub_token", type=str, default=None)


def build_accelerator(args: argparse.Namespace) -> Accelerator:
    project = ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "logs"))
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to if args.with_tracking else None,
        project_config=project,
        dynamo_plugin=TorchDynamoPlugin(backend=args.torch_compile_backend) if args.torch_compile else None,
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    set_seed(args.seed)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    warn_if_half_precision_is_emulated(
        accelerator.device, accelerator.mixed_precision, "Train in fp32: --mixed_precision no."
    )
    if args.torch_compile:
        logger.info("torch.compile (%s backend): the first steps include the compilation", args.torch_compile_backend)
    return accelerator


def parse_config_overrides(text: str | None) -> dict:
    """'mask_ratio=0.95,num_frames=8' -> {"mask_ratio": 0.95, "num_frames": 8} (as transformers' run_mlm.py).

    Commas separate fields, so a list field takes slashes: 'stem_channels=24/48/96' -> [24, 48, 96];
    'stem_channels=none' -> None."""
    overrides = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--config_overrides: {item!r} is not key=value (e.g. 'mask_ratio=0.95,num_frames=8')")
        value = value.strip()
        if "/" in value:
            try:
                overrides[key.strip()] = [int(v) for v in value.split("/")]
            except ValueError:
                raise ValueError(f"--config_overrides: {item!r}: a list takes integers separated by '/'") from None
            continue
        if value.lower() == "none":
            overrides[key.strip()] = None
            continue
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                continue
        else:
            value = {"true": True, "false": False}.get(value.lower(), value)
        overrides[key.strip()] = value
    return overrides


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from a tuple of integers, well mixed (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def clip_item(
    row: dict,
    processor: EchoAIVideoProcessor,
    generator: torch.Generator,
    label: float,
    index: int,
    lv_masks: bool = False,
) -> dict:
    """One row's training item for `collate`: an augmented clip `pixel_values` (`data_echoai.row_pixel_values`),
    `labels`, `index`, and `error` (the message, with `pixel_values` None) when the video cannot be decoded.

    With `lv_masks` the clip shows one of the row's traced frames (`data_echoai.row_traced_clip`), and the item
    also holds that frame's LV mask `lv_mask` (image_size, image_size) and its position in the clip
    `lv_mask_frame`, or None and -1 for a row without tracings."""
    mask, position = None, -1
    try:
        if lv_masks:
            pixel_values, mask, position = row_traced_clip(row, processor, generator)
        else:
            pixel_values = row_pixel_values(row, processor, generator, training=True)
        error = None
    except VideoDecodingError as exception:
        pixel_values, error = None, str(exception)
    item = {"pixel_values": pixel_values, "labels": float(label), "index": index, "error": error}
    return {**item, "lv_mask": mask, "lv_mask_frame": position} if lv_masks else item


class TrainingClips(torch.utils.data.Dataset):
    """Rows of a video dataset -> one clip each (`pixel_values` (T, C, H, W), `labels`, `index`).

    `rows` is any sized, indexable table of rows (a `datasets.Dataset`) whose videos are files (`video_path`) or,
    in a prepared corpus, the rows' own bytes (`video`); `data_echoai.row_pixel_values` reads either. Rows
    are read one at a time when an item is asked for, so a corpus far larger than memory is never loaded whole.

    In training the order is a fresh permutation every epoch and each clip's start and augmentation come
    from a generator seeded by (seed, epoch, video index): the data a step sees depends only on the step,
    never on worker count, process count or where a run was resumed. Call `set_epoch` before iterating.
    An unreadable video gives `pixel_values=None` and its error, which `collate` drops and counts. (Evaluation
    reads whole videos through `inference_echoai.predict_videos`, not through this dataset.) With `lv_masks`
    each clip shows a traced frame of its video and carries its LV mask (`clip_item`), for the auxiliary
    segmentation loss (`EchoAIConfig.lv_segmentation_weight`).
    """

    def __init__(
        self,
        rows: Dataset,
        processor: EchoAIVideoProcessor,
        seed: int = 0,
        label_column: str | None = None,
        lv_masks: bool = False,
    ):
        self.rows, self.label_column, self.processor, self.seed = rows, label_column, processor, seed
        self.lv_masks = lv_masks
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.order = np.random.default_rng(derive_seed(self.seed, epoch)).permutation(len(self.rows))
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        index = int(self.order[i])
        row = self.rows[index]
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, index))
        label = row[self.label_column] if self.label_column else math.nan
        return clip_item(row, self.processor, generator, label, index, self.lv_masks)


class StreamingClips(torch.utils.data.IterableDataset):
    """A stream of rows -> training clips, `TrainingClips`' items, for corpora too large to index or copy.

    `rows` is this process's part of a shuffled `datasets.IterableDataset` (`corpus_echoai.shuffle_corpus`, then
    `split_corpus_by_node`): the stream is neither shuffled nor split here, and must not be split again by
    `accelerate` (keep its DataLoader out of `accelerator.prepare`). An epoch is one pass over the stream;
    `set_epoch` reshuffles it. Each clip's start and augmentation come from a generator seeded by (seed, epoch,
    rank, position), position being the row's place in this process's stream this epoch (also its `index`).

    `state_dict` / `load_state_dict` save and restore the position (the stream's own `state_dict` plus the
    position count), so a resumed run continues the pass instead of replaying it. Exact only when this
    process iterates the stream itself (DataLoader `num_workers=0`: workers hold the position out of reach),
    and without a shuffle buffer (its content is not saved: see `corpus_echoai.shuffle_corpus`).
    """

    def __init__(
        self,
        rows: IterableDataset,
        processor: EchoAIVideoProcessor,
        seed: int = 0,
        rank: int = 0,
        label_column: str | None = None,
    ):
        self.rows, self.processor, self.seed, self.rank = rows, processor, seed, rank
        self.label_column = label_column
        self.epoch, self.position = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.rows.set_epoch(epoch)
        self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "rows": self.rows.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state["epoch"] != self.epoch:
            raise ValueError(
                f"stream state of epoch {state['epoch']} loaded in epoch {self.epoch}: call set_epoch first"
            )
        self.rows.load_state_dict(state["rows"])
        self.position = state["position"]

    def __iter__(self):
        for row in self.rows:  # from the loaded position, if any
            seed = derive_seed(self.seed, self.epoch, self.rank, self.position)
            label = row[self.label_column] if self.label_column else math.nan
            item = clip_item(row, self.processor, torch.Generator().manual_seed(seed), label, self.position)
            self.position += 1  # before yielding: `state_dict` is then right between two items
            yield item


def collate(features: list[dict]) -> dict[str, torch.Tensor]:
    """`EchoAIDataCollator` (drops and counts unreadable videos) plus the dataset index of each kept row and the
    errors of the dropped ones (`skipped`), which name their videos for `--max_bad_fraction`'s error. Items with
    LV masks (`clip_item(..., lv_masks=True)`) also give `lv_masks` (B, H, W), zeros where an item has none,
    and `lv_mask_frames` (B,) int64, the traced frame's position in each clip or -1 for none."""
    batch = EchoAIDataCollator()(features)
    kept = [f for f in features if f["pixel_values"] is not None]
    batch["index"] = torch.tensor([f["index"] for f in kept], dtype=torch.int64)
    batch["skipped"] = [f["error"] for f in features if f["pixel_values"] is None]
    if kept and "lv_mask_frame" in kept[0]:
        size = kept[0]["pixel_values"].shape[-2:]
        batch["lv_masks"] = torch.stack([torch.zeros(size) if f["lv_mask"] is None else f["lv_mask"] for f in kept])
        batch["lv_mask_frames"] = torch.tensor([f["lv_mask_frame"] for f in kept], dtype=torch.int64)
    return batch


def make_dataloader(
    dataset: TrainingClips | StreamingClips, batch_size: int, num_workers: int
) -> torch.utils.data.DataLoader:
    # The dataset shuffles itself (see TrainingClips), so the loader reads in order; `accelerate` then
    # hands consecutive batches to consecutive processes. A stream is already this process's part.
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate,
        persistent_workers=False, drop_last=True,  # training batches only: a short last batch would be noisier
    )  # fmt: skip


def from_pretrained_with_geometry(model_class: type, path: str, overrides: dict):
    """`model_class.from_pretrained(path, **overrides)`, where a new `num_frames` or `image_size` resamples the
    checkpoint's position tables (`resize_position_embeddings`) instead of failing on their shapes."""
    overrides = dict(overrides)
    geometry = {key: overrides.pop(key) for key in ("num_frames", "image_size") if key in overrides}
    model = model_class.from_pretrained(path, **overrides)
    if geometry:
        model.resize_position_embeddings(**geometry)
    return model


def describe_start(model_name_or_path: str | None) -> dict | None:
    """Which weights a fine-tuning run started from, for `all_results.json` and the model card: the folder or Hub
    id, and the sha256 of its weights (`*.safetensors`, read in name order: for a single-file checkpoint,
    `sha256sum model.safetensors`), which tells two starts apart when a name does not (two builds of one
    pretraining command saved under one name, a Hub repo pushed to again). A Hub id's files are read from the cache
    `from_pretrained` just filled, and the commit it resolved is kept as `revision`. None for a random
    initialisation. Runs that share a fingerprint share their pretraining draw: `scripts/compare_runs.py` groups
    by it."""
    if not model_name_or_path:
        return None
    start = {"model_name_or_path": str(model_name_or_path), "sha256": None, "revision": None}
    if Path(model_name_or_path).is_dir():
        files = sorted(Path(model_name_or_path).glob("*.safetensors"))
    else:
        files = cached_hub_weights(str(model_name_or_path))
        if files:
            start["revision"] = files[0].parent.name  # the cache keeps a commit's files under snapshots/<commit>/
    if files:
        digest = hashlib.sha256()
        for file in files:
            with open(file, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        start["sha256"] = digest.hexdigest()
    return start


def cached_hub_weights(repo_id: str) -> list[Path]:
    """The cached `*.safetensors` files of the Hub model `repo_id` (one file, or the shards its index names), in
    name order; [] when the cache does not hold them all."""
    single = try_to_load_from_cache(repo_id, "model.safetensors")
    if isinstance(single, str):
        return [Path(single)]
    index = try_to_load_from_cache(repo_id, "model.safetensors.index.json")
    if not isinstance(index, str):
        return []
    shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
    files = [try_to_load_from_cache(repo_id, shard) for shard in shards]
    return [Path(file) for file in files] if all(isinstance(file, str) for file in files) else []


def start_fingerprint(start: dict | None) -> str:
    """`describe_start`'s record in a few words: the folder or Hub id and the first 12 digits of its fingerprint."""
    if not start or not start.get("model_name_or_path"):
        return "a random initialisation"
    if start.get("sha256"):
        return f"{start['model_name_or_path']} (weights sha256 {start['sha256'][:12]}…)"
    if start.get("revision"):
        return f"{start['model_name_or_path']} (revision {start['revision'][:12]})"
    return start["model_name_or_path"]


def reinitialize_top_layers(model: torch.nn.Module, num_layers: int) -> list[str]:
    """Draw an EchoAI model's top `num_layers` encoder layers and the encoder's final LayerNorm afresh, as a new
    model of its config initialises them (from torch's global generator: seed it first), and keep every other
    weight. A checkpoint's top layers can be specialised to its pretraining task and make a worse start for few
    labels than a random initialisation (Zhang et al. 2021 for BERT; docs/EXPERIMENTS.md, items 55-57). Returns the
    names of the tensors replaced."""
    depth = model.config.num_hidden_layers
    if not 0 < num_layers <= depth:
        raise ValueError(f"can re-initialise 1 to {depth} top layers of this {depth}-layer encoder, not {num_layers}")
    base = model.base_model_prefix
    prefixes = (*(f"{base}.encoder.layer.{i}." for i in range(depth - num_layers, depth)), f"{base}.layernorm.")
    fresh = type(model)(model.config).state_dict()
    replaced = [name for name in model.state_dict() if name.startswith(prefixes)]
    model.load_state_dict({name: fresh[name] for name in replaced}, strict=False)
    return replaced


def build_processor(
    args: argparse.Namespace,
    config: EchoAIConfig,
    videos: Dataset | IterableDataset,
    read_frames: Callable[[dict], np.ndarray] | None = None,
) -> EchoAIVideoProcessor:
    """The processor saved with the model. From `--model_name_or_path` when it has one (a pretraining output:
    fine-tuning then preprocesses exactly as pretraining did), else normalised with the mean/std of the
    training videos (as EchoNet-Dynamic's loader).

    `videos` is a table of video files (`video_path`) by default; with `read_frames(row) -> frames` it is a
    table or a stream of rows (a prepared corpus: `data_echoai.row_frames`). A table is sampled at
    random; a stream gives its first rows, so pass it shuffled, with the same seed on every process.
    """
    overrides = parse_config_overrides(getattr(args, "processor_overrides", None))
    unknown = sorted(set(overrides) - set(EchoAIVideoProcessor._argument_names()))
    if unknown:
        raise ValueError(
            f"--processor_overrides: {unknown} are not EchoAIVideoProcessor fields; choose from "
            f"{EchoAIVideoProcessor._argument_names()}"
        )
    if args.model_name_or_path:
        try:
            return EchoAIVideoProcessor.from_pretrained(
                args.model_name_or_path, num_frames=config.num_frames, image_size=config.image_size, **overrides
            )
        except OSError:
            logger.info("%s has no video processor; computing one from the training videos", args.model_name_or_path)
    if read_frames is None:
        videos, read_frames = videos["video_path"], decode_all_frames
    mean, std = compute_mean_std(
        videos, num_videos=128, seed=args.seed, num_channels=config.num_channels, read_frames=read_frames
    )
    fields = dict(
        num_frames=config.num_frames, period=args.period, image_size=config.image_size,
        num_channels=config.num_channels, image_mean=mean, image_std=std,
    )  # fmt: skip
    return EchoAIVideoProcessor(**{**fields, **overrides})


# --------------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------------


def no_weight_decay(name: str, parameter: torch.nn.Parameter) -> bool:
    """Norm weights, biases, position tables and the mask token are not decayed (MAE, timm)."""
    return parameter.ndim <= 1 or "position_embeddings" in name or name.endswith("mask_token")


def layer_id(name: str, num_layers: int) -> int:
    """0 for the embeddings, i + 1 for encoder layer i, num_layers + 1 for everything after (head, norms)."""
    if ".embeddings." in f".{name}":
        return 0
    match = re.search(r"encoder\.layer\.(\d+)\.", name)
    return int(match.group(1)) + 1 if match else num_layers + 1


def param_groups(
    model: torch.nn.Module,
    weight_decay: float,
    learning_rate: float,
    layer_decay: float | None = None,
    encoder_apart: bool = False,
) -> list[dict]:
    """AdamW parameter groups: decay / no decay, each scaled by layer-wise learning-rate decay if given
    (layer l of L gets learning_rate * layer_decay ** (L + 1 - l), so the head learns fastest). Without layer decay
    any module will do (the R(2+1)D baseline has no transformer layers). With `encoder_apart`, the base model's
    parameters (`model.base_model_prefix`: the encoder) never share a group with the heads', and every group says
    which it holds (`"encoder"`), so that a schedule can treat them apart (`build_optimizer`'s `encoder_delay`)."""
    num_layers = model.config.num_hidden_layers if layer_decay is not None else 0
    prefix = f"{model.base_model_prefix}." if encoder_apart else None
    groups: dict[tuple[bool, int, bool], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        decay = not no_weight_decay(name, parameter)
        depth = layer_id(name, num_layers) if layer_decay is not None else num_layers + 1
        scale = layer_decay ** (num_layers + 1 - depth) if layer_decay is not None else 1.0
        encoder = prefix is not None and name.startswith(prefix)
        group = groups.get((decay, depth, encoder))
        if group is None:
            group = {"params": [], "weight_decay": weight_decay if decay else 0.0, "lr": learning_rate * scale}
            if encoder_apart:
                group["encoder"] = encoder
            groups[decay, depth, encoder] = group
        group["params"].append(parameter)
    return list(groups.values())


def delayed_start(schedule: Callable[[int], float], delay: int, warmup: int) -> Callable[[int], float]:
    """The learning-rate factor of a parameter group that joins training late: 0 for the first `delay` scheduler
    steps, then a linear ramp to 1 over the next `warmup` steps, times the run's own schedule (`schedule`, a
    `LambdaLR` factor). At factor 0 AdamW leaves a parameter exactly as it was (its decoupled weight decay is
    scaled by the learning rate too) while its moments still follow the gradients, so the group joins with moment
    estimates of the current loss rather than fresh ones; the ramp keeps its first updates small all the same.

    A plain function, not a callable object: `LambdaLR.state_dict` then stores nothing of it, and a checkpoint
    stays loadable with `weights_only` (the factor depends on the step alone, which the scheduler's state holds)."""
    warmup = max(1, warmup)

    def factor(step: int) -> float:
        return schedule(step) * min(1.0, max(0.0, (step - delay) / warmup))

    return factor


def build_optimizer(
    model: torch.nn.Module,
    args: argparse.Namespace,
    accelerator: Accelerator,
    dataloader: torch.utils.data.DataLoader,
    layer_decay: float | None = None,
    encoder_delay: int = 0,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW (0.9, `--adam_beta2`) over `param_groups`, linear warm-up then cosine decay (MAE's pretraining and
    fine-tuning recipes); settles `args.max_train_steps` etc. from the unprepared loader (see `schedule_steps`).

    `encoder_delay` N > 0: only the heads learn for the first N optimizer steps; then the encoder joins, its
    learning rate warming up again over `--num_warmup_steps` (`delayed_start`): linear probing, then fine-tuning
    (LP-FT, Kumar et al. 2022), within the same number of steps."""
    if encoder_delay and getattr(args, "max_train_seconds", None):
        raise ValueError(
            "a delayed encoder start counts optimizer steps, and --max_train_seconds stretches the schedule by "
            "time; give one of the two"
        )
    optimizer = torch.optim.AdamW(
        param_groups(model, args.weight_decay, args.learning_rate, layer_decay, encoder_apart=encoder_delay > 0),
        lr=args.learning_rate,
        betas=(0.9, args.adam_beta2),
        # One kernel over all tensors (CPU and CUDA), the same update to float rounding (docs/BENCHMARKS.md,
        # "Where the speed comes from"); transformers' Trainer uses it by default too.
        fused=True,
    )
    streamed = isinstance(dataloader.dataset, torch.utils.data.IterableDataset)  # no length: --max_train_steps
    schedule_steps(args, None if streamed else math.ceil(len(dataloader) / accelerator.num_processes))
    if encoder_delay and encoder_delay >= args.max_train_steps:
        raise ValueError(
            f"the encoder would join after step {encoder_delay} of a {args.max_train_steps}-step run and never "
            "train; give fewer heads-only steps or more --max_train_steps"
        )
    # A prepared scheduler steps once per process per optimizer step, hence the factor.
    num_warmup_steps = args.num_warmup_steps * accelerator.num_processes
    num_training_steps = args.max_train_steps * accelerator.num_processes
    if getattr(args, "max_train_seconds", None):
        scheduler = TimeBudgetSchedule(optimizer, num_warmup_steps, num_training_steps, args.max_train_seconds)
    else:
        scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps, num_training_steps)
    if encoder_delay:
        delay = encoder_delay * accelerator.num_processes
        scheduler.lr_lambdas = [
            delayed_start(factor, delay, num_warmup_steps) if group["encoder"] else factor
            for factor, group in zip(scheduler.lr_lambdas, optimizer.param_groups, strict=True)
        ]
        # The first step's rates were set before the lambdas were replaced.
        for group, base_lr, factor in zip(
            optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
        ):
            group["lr"] = base_lr * factor(scheduler.last_epoch)
    return optimizer, scheduler


class TimeBudgetSchedule(torch.optim.lr_scheduler.LRScheduler):
    """Linear warm-up then cosine decay over a run's progress p = max(steps / max steps, seconds / max seconds).

    When the steps run out first this is exactly transformers' `get_cosine_schedule_with_warmup`; when the time
    budget (`--max_train_seconds`) runs out first the learning rate still reaches 0 as the run stops, instead of
    being cut at its peak. The warm-up takes the first `num_warmup_steps / num_training_steps` of the progress.
    The loop calls `spend(seconds)` (seconds of training so far, the same on every process) before each `step()`
    and stops once it returns True.
    """

    def __init__(self, optimizer, num_warmup_steps: int, num_training_steps: int, max_seconds: float):
        if not max_seconds > 0:
            raise ValueError(f"--max_train_seconds must be positive, got {max_seconds!r}")
        self.warmup_fraction = num_warmup_steps / max(1, num_training_steps)
        self.num_training_steps, self.max_seconds, self.seconds = num_training_steps, float(max_seconds), 0.0
        super().__init__(optimizer)

    def spend(self, seconds: float) -> bool:
        """Training has run `seconds` so far: the next `step()` follows them. True once the budget is spent."""
        self.seconds = seconds
        return seconds >= self.max_seconds

    def progress(self) -> float:
        return min(1.0, max(self.last_epoch / max(1, self.num_training_steps), self.seconds / self.max_seconds))

    def factor(self) -> float:
        progress, warmup = self.progress(), self.warmup_fraction
        if progress < warmup:
            return progress / warmup
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (progress - warmup) / max(1e-12, 1.0 - warmup))))

    def get_lr(self) -> list[float]:
        return [base_lr * self.factor() for base_lr in self.base_lrs]


# --------------------------------------------------------------------------------------------------
# Checkpoints and signals
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainingState:
    """What `save_state` does not know: where the loop stood."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # batches of this epoch already consumed, per process
    nonfinite_skipped: int = 0
    videos_skipped: int = 0  # training items whose video could not be read
    videos_seen: int = 0  # training items drawn, read or not: the denominator of --max_bad_fraction
    best_metric: float | None = None
    train_seconds: float = 0.0  # seconds of training so far (evaluation and checkpoints not counted): the time budget
    # This process's position in a stream (`StreamingClips.state_dict`), None for a map-style dataset. Each
    # process has its own, so it is saved apart from the rest: one `data_state_<rank>.json` per process.
    data_state: dict | None = None
    # The run's record since step 1, kept through checkpoints so that a resumed run is summarised (first and last
    # loss, what `on_step` records) over the same steps as a straight one: "loss" at every optimizer step, and each
    # value `on_step` returns under its name. Process 0's record is the one saved.
    history: dict[str, list[float]] = field(default_factory=dict)


class RunError(RuntimeError):
    """A fault a user meets and can act on (a damaged checkpoint, a full disk, bad data, an unreachable Hub): the
    scripts print its one-line message and exit non-zero (`exit_on_run_error`), with no traceback."""


class CheckpointError(RunError):
    pass


def human_bytes(count: int) -> str:
    """1536 -> '1.5 KiB'."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count / 2**10:.1f} KiB"


class DiskFullError(RunError):
    def __init__(self, path: str | os.PathLike, needed: int, free: int):
        super().__init__(
            f"No space left for {path}: it needs about {needed} bytes ({human_bytes(needed)}) and {free} bytes "
            f"({human_bytes(free)}) are free. Free some space or pass another --output_dir; what was saved "
            "before is kept."
        )
        self.path, self.needed, self.free = Path(path), needed, free


@contextlib.contextmanager
def exit_on_run_error():
    """Around a script's `main`: a `RunError`, or a config value `EchoAIConfig` rejects (a `--config_overrides`
    item, a checkpoint's config.json), ends the process with its one line (`error: ...`) and status 1."""
    try:
        yield
    except RunError as error:
        sys.exit(f"error: {error}")
    except StrictDataclassError as error:  # a bad type, choice or value: the cause names the field and the value
        reason = " ".join(str(error.__cause__ or error).split()).rstrip(".")
        sys.exit(f"error: {reason}. Change it in --config_overrides or the model's config.json.")


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the filesystem that holds `path` (or would, for a path not yet created)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def ensure_free_space(path: str | os.PathLike, needed: int) -> None:
    """Raise `DiskFullError` before a save of about `needed` bytes that the disk cannot hold."""
    free = free_bytes(path)
    if free < needed:
        raise DiskFullError(path, needed, free)


def is_disk_full(error: BaseException) -> bool:
    """A write failed for want of space: ENOSPC / EDQUOT, or a writer that reports it without the errno --
    safetensors' `SafetensorError` ("I/O error: No space left on device (os error 28)"), torch's zip writer's
    RuntimeError ("unexpected pos ..." / "file write failed")."""
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(error)
    return any(
        words in text
        for words in (
            "No space left on device",
            "os error 28",
            "Disk quota exceeded",
            "unexpected pos",
            "file write failed",
        )
    )


@contextlib.contextmanager
def disk_full_guard(path: str | os.PathLike, needed: int, cleanup: Callable[[], None] | None = None):
    """Turn a full disk met while writing `path` into `DiskFullError` (after `cleanup`, which removes what was
    half written); other errors pass unchanged."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as error:
        if not is_disk_full(error):
            raise
        free = free_bytes(path)  # before the cleanup gives space back: what the write met
        if cleanup is not None:
            cleanup()
        raise DiskFullError(path, needed, free) from None


def nbytes(*state_dicts: dict) -> int:
    """Bytes of the tensors in (nested) state dicts: the size of a save, known without writing it."""
    total = 0
    for value in state_dicts:
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif isinstance(value, dict):
            total += nbytes(*value.values())
        elif isinstance(value, (list, tuple)):
            total += nbytes(*value)
    return total


def file_checksum(path: Path, size: int) -> str:
    """blake2b of a file's size and its first and last MiB.

    Not a hash of the whole file: `latest` checks each checkpoint it considers and rotation checks the newest at
    every save, and reading multi-GB optimizer states whole each time would cost minutes on network storage. The
    damage checkpoints meet -- a truncated or interrupted copy, a write cut short by a full disk, a file missing
    or replaced -- changes the size or the ends; a flipped bit in the middle is the storage's own checksums' job.
    """
    digest = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as f:
        digest.update(f.read(CHECKSUM_SPAN))
        if size > CHECKSUM_SPAN:
            f.seek(max(CHECKSUM_SPAN, size - CHECKSUM_SPAN))
            digest.update(f.read(CHECKSUM_SPAN))
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """`manifest.json`: every file of `folder` with its size and `file_checksum`, written last (a checkpoint is
    whole only when its manifest is there and verifies)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE):
        size = path.stat().st_size
        files[path.relative_to(folder).as_posix()] = {"size": size, "checksum": file_checksum(path, size)}
    manifest = {"version": 1, "checksum": "blake2b of the size, first and last MiB", "files": files}
    with open(folder / MANIFEST_FILE, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def manifest_problem(folder: Path) -> str | None:
    """None when `folder`'s manifest verifies, else what is wrong, naming the file."""
    try:
        files = json.loads((folder / MANIFEST_FILE).read_text())["files"]
    except FileNotFoundError:
        return f"{folder / MANIFEST_FILE} is missing"
    except (ValueError, KeyError, TypeError):
        return f"{folder / MANIFEST_FILE} is unreadable"
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{path} has {size} bytes where its manifest says {entry['size']}"
        if file_checksum(path, size) != entry["checksum"]:
            return f"{path} does not match its manifest's checksum"
    return None


class Checkpoints:
    """Resumable checkpoints `<output_dir>/checkpoints/step_<N>`, written to a `.partial-step_<N>` folder, sealed
    by a manifest (`write_manifest`) and renamed into place, rotated, and found again by `latest`.

    A checkpoint without a manifest was written before manifests existed: it is accepted, with a warning, since
    the rename already kept half-written ones out; it counts as unverified when rotating."""

    def __init__(self, output_dir: str | os.PathLike, total_limit: int | None = None):
        self.root = Path(output_dir) / "checkpoints"
        self.total_limit = total_limit

    def all(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)]
        return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))

    @staticmethod
    def problem(path: Path) -> str | None:
        """What makes `path` unusable (None: usable); warns once about a checkpoint from before manifests."""
        if not (path / MANIFEST_FILE).is_file() and (path / STATE_FILE).is_file():
            logger.warning("%s has no %s (written before checkpoint manifests): resuming unverified.", path,
                           MANIFEST_FILE)  # fmt: skip
            return None
        return manifest_problem(path)

    def latest(self) -> Path | None:
        """The newest usable checkpoint; each damaged one after it is skipped with one warning naming what is wrong."""
        for path in reversed(self.all()):
            problem = self.problem(path)
            if problem is None:
                return path
            logger.warning("Skipping damaged checkpoint %s: %s; trying the one before.", path.name, problem)
        return None

    def resolve(self, value: str) -> Path:
        """`latest` or a folder -> a usable checkpoint folder, with an error naming what was looked for or is damaged."""
        if value == "latest":
            path = self.latest()
            if path is None:
                raise CheckpointError(f"--resume_from_checkpoint latest: no usable checkpoint under {self.root}")
            return path
        path = Path(value)
        if not (path / STATE_FILE).is_file():
            raise CheckpointError(f"{path} is not an EchoAI checkpoint (no {STATE_FILE}); pass a step_<N> folder.")
        problem = self.problem(path)
        if problem:
            raise CheckpointError(f"checkpoint {path} is damaged: {problem}. Resume from an earlier one or 'latest'.")
        return path

    def save(self, accelerator: Accelerator, state: TrainingState, needed: int) -> Path:
        """Write a checkpoint of about `needed` bytes; a full disk is a `DiskFullError` that leaves no partial
        folder and the earlier checkpoints as they were."""
        final = self.root / f"step_{state.global_step:07d}"
        partial = self.root / f".partial-{final.name}"
        ensure_free_space(self.root, needed)
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        accelerator.wait_for_everyone()
        with disk_full_guard(partial, needed, cleanup=lambda: shutil.rmtree(partial, ignore_errors=True)):
            accelerator.save_state(str(partial))  # every process writes its RNG state
            if state.data_state is not None:
                data_state = partial / DATA_STATE_FILE.format(rank=accelerator.process_index)
                data_state.write_text(json.dumps(state.data_state))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                (partial / STATE_FILE).write_text(json.dumps({**asdict(state), "data_state": None}, indent=2))
                write_manifest(partial)
        if accelerator.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            self.rotate()
        accelerator.wait_for_everyone()
        return final

    def rotate(self) -> None:
        """Keep the newest `total_limit` checkpoints, and always the newest verified one: an older checkpoint is
        never deleted to make room for one that does not verify. A checkpoint is renamed out of `all`'s sight
        before it is deleted, so a process killed part-way leaves no half-deleted `step_<N>` (a leftover
        `.removing-*` folder is deleted at the next rotation)."""
        if not self.total_limit:
            return
        found = self.all()
        keep = next((path for path in reversed(found) if manifest_problem(path) is None), None)
        for old in found[: -self.total_limit]:
            if old != keep:
                old.rename(old.with_name(f".removing-{old.name}"))
        for removing in self.root.glob(".removing-*"):
            shutil.rmtree(removing, ignore_errors=True)

    @staticmethod
    def load(accelerator: Accelerator, path: Path) -> TrainingState:
        try:
            accelerator.load_state(str(path))
        except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError) as error:
            raise CheckpointError(
                f"checkpoint {path} cannot be loaded ({type(error).__name__}: {str(error).splitlines()[0]}). "
                "Resume from an earlier one."
            ) from None
        state = TrainingState(**json.loads((path / STATE_FILE).read_text()))
        data_state = path / DATA_STATE_FILE.format(rank=accelerator.process_index)
        state.data_state = json.loads(data_state.read_text()) if data_state.is_file() else None
        return state


class StopRequest:
    """SIGTERM / SIGINT set a flag instead of killing the process: the loop finishes its step, saves a
    checkpoint and exits cleanly (preemptible clusters send SIGTERM before they kill)."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self.handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def handle(self, signum, frame) -> None:
        if self.requested:  # a second signal means "now"
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("Received %s: finishing this step, then saving a checkpoint.", signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    state: TrainingState
    resumed_losses: int = 0  # losses `state.history` held when this call began: those of the steps resumed past
    seen: list[int] = field(default_factory=list)  # dataset indices this process trained on
    stopped_by_signal: bool = False
    stopped_by_time: bool = False  # --max_train_seconds ran out before the steps did
    checkpoint: Path | None = None
    seconds: float = 0.0
    model: torch.nn.Module | None = None  # the unwrapped model, set by the scripts

    @property
    def losses(self) -> list[float]:
        """This call's loss at every optimizer step, this process (the whole run's: `state.history["loss"]`)."""
        return self.state.history.get("loss", [])[self.resumed_losses :]


class NonFiniteLossError(RuntimeError):
    pass


class BadDataError(RunError):
    pass


def bad_share_error(what: str, bad: int, total: int, limit: float, names: Sequence[str]) -> BadDataError:
    shown = "; ".join(names[:3]) + (f"; and {len(names) - 3} more" if len(names) > 3 else "")
    return BadDataError(
        f"{bad} of {total} {what} ({bad / total:.1%}) cannot be read, more than --max_bad_fraction {limit:g}: "
        f"{shown}. Re-copy or re-prepare them (scripts/prepare_corpus.py), or raise --max_bad_fraction."
    )


def skip_damaged_shards(damaged: dict[str, str], num_shards: int, max_bad_fraction: float) -> None:
    """Log each damaged corpus shard (`corpus_echoai.check_shards`) as skipped; stop with `BadDataError` naming
    them when they are more than `max_bad_fraction` of the shards."""
    for shard, reason in damaged.items():
        logger.warning("Skipping damaged corpus shard %s: %s", shard, reason)
    if len(damaged) > max_bad_fraction * num_shards:
        raise bad_share_error("corpus shards", len(damaged), num_shards, max_bad_fraction, list(damaged))


def min_items_for_share(max_bad_fraction: float) -> int:
    """Items to see before a share of unreadable ones is judged against `max_bad_fraction` mid-epoch: enough for
    the limit to mean five bad items, so that one unlucky early batch does not stop a run (a whole pass is
    judged whatever its size)."""
    return math.ceil(5 / max_bad_fraction) if max_bad_fraction > 0 else 1


class MapSource:
    """Training data from a map-style dataset (`TrainingClips`) behind a loader prepared by `accelerate`.

    An epoch is one pass over the loader, which has a length; a resumed epoch skips the batches already seen
    (`accelerate.skip_first_batches`): the dataset draws every random choice from (seed, epoch, video), so the
    batches after the skip are those a straight run would see. Nothing beyond `TrainingState` is saved.
    """

    def __init__(self, accelerator: Accelerator, loader: torch.utils.data.DataLoader):
        self.accelerator, self.loader = accelerator, loader

    def check(self, args: argparse.Namespace, state: TrainingState, checkpoint: Path | None) -> None:
        pass  # any checkpoint of a map-style run resumes it

    def epochs(self, first: int, args: argparse.Namespace) -> range:
        return range(first, math.ceil(args.max_train_steps / steps_per_epoch(len(self.loader), args)))

    def set_epoch(self, epoch: int) -> None:
        # Through the loader: accelerate's loaders call `dataset.set_epoch(loader.iteration)` when iterated,
        # and `skip_first_batches` copies `iteration`, so the loader must carry the epoch too.
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(epoch)
        else:
            self.loader.dataset.set_epoch(epoch)

    def batches(self, state: TrainingState) -> Iterable[dict]:
        if state.batches_in_epoch:
            return self.accelerator.skip_first_batches(self.loader, state.batches_in_epoch)
        return self.loader

    def epoch_ended(self, state: TrainingState, exhausted: bool) -> bool:
        return exhausted or state.batches_in_epoch >= len(self.loader)

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, state: dict | None) -> None:
        pass  # the position is `TrainingState.batches_in_epoch`


class StreamSource:
    """Training data from a stream already split per process (`StreamingClips`), its loader left unprepared.

    The stream has no length: an epoch runs until it ends, and the run until `--max_train_steps`. A checkpoint
    saves this process's position in the stream (`state_dict`), and a resumed epoch restores it instead of
    replaying the pass -- only without DataLoader workers, which hold the position out of this process's reach.
    """

    def __init__(self, accelerator: Accelerator, loader: torch.utils.data.DataLoader):
        self.accelerator, self.loader, self.dataset = accelerator, loader, loader.dataset

    def check(self, args: argparse.Namespace, state: TrainingState, checkpoint: Path | None) -> None:
        if (args.resume_from_checkpoint or args.checkpointing_steps) and self.loader.num_workers:
            raise ValueError(
                "Checkpoints of a streamed corpus need --num_workers 0: DataLoader workers hold the stream's "
                "position where the main process cannot save it."
            )
        if state.batches_in_epoch and state.data_state is None:
            raise ValueError(
                f"{checkpoint} has no saved stream position (data_state_<rank>.json) for process "
                f"{self.accelerator.process_index}: it was written by a run with --num_workers > 0 or fewer processes."
            )

    def epochs(self, first: int, args: argparse.Namespace) -> Iterable[int]:
        return itertools.count(first)  # passes over the stream until --max_train_steps

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def batches(self, state: TrainingState) -> Iterable[dict]:
        if state.batches_in_epoch:
            self.load_state_dict(state.data_state)
        return self.loader

    def epoch_ended(self, state: TrainingState, exhausted: bool) -> bool:
        if exhausted and state.batches_in_epoch == 0:  # a whole pass gave nothing
            raise ValueError(
                f"The stream gave no full batch of {self.loader.batch_size} in epoch {state.epoch} on process "
                f"{self.accelerator.process_index}: use a larger corpus or a smaller batch."
            )
        return exhausted

    def state_dict(self) -> dict | None:
        # With workers the position lives in them: saving the main process's would silently replay the pass.
        return None if self.loader.num_workers else self.dataset.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        self.dataset.load_state_dict(state)


def data_source(accelerator: Accelerator, loader: torch.utils.data.DataLoader) -> MapSource | StreamSource:
    """The loop's view of a training loader: `StreamSource` for an iterable dataset, else `MapSource`."""
    streamed = isinstance(loader.dataset, torch.utils.data.IterableDataset)
    return (StreamSource if streamed else MapSource)(accelerator, loader)


class TrainingClock:
    """Seconds of training so far, without evaluation, pictures and checkpoints (`paused`), continued from a
    checkpoint's `train_seconds`. With `shared`, process 0's clock is every process's, so a time budget stops
    them all at the same step."""

    def __init__(self, accelerator: Accelerator, resumed_seconds: float, shared: bool):
        self.accelerator, self.resumed_seconds, self.shared = accelerator, resumed_seconds, shared
        self.start, self.paused_seconds = time.perf_counter(), 0.0

    @contextlib.contextmanager
    def paused(self):
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.paused_seconds += time.perf_counter() - begin

    def elapsed(self) -> float:
        """Wall seconds since the loop started, pauses included."""
        return time.perf_counter() - self.start

    def seconds(self) -> float:
        seconds = self.resumed_seconds + self.elapsed() - self.paused_seconds
        if self.shared and self.accelerator.num_processes > 1:
            seconds = float(broadcast(torch.tensor([seconds], device=self.accelerator.device), from_process=0)[0])
        return seconds


def never_spent(seconds: float) -> bool:
    """The time budget of a schedule without one (`TimeBudgetSchedule.spend` for one with)."""
    return False


def train(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    dataloader: torch.utils.data.DataLoader,
    args: argparse.Namespace,
    compute_loss: Callable[[torch.nn.Module, dict, int], tuple[torch.Tensor, object]],
    on_step: Callable[[int, dict, object], dict[str, float] | None] | None = None,
    on_epoch_end: Callable[[int, TrainingState], None] | None = None,
    ema: ExponentialMovingAverage | None = None,
) -> TrainResult:
    """Run the optimisation loop shared by pretraining and fine-tuning (`TrainingLoop`).

    `compute_loss(model, batch, global_step) -> (loss, outputs)`; `on_step(global_step, batch, outputs)`
    runs after each optimizer step (e.g. to save a reconstruction picture) and may return a dict of values to
    append to `state.history` (the whole run's record, kept through checkpoints); `on_epoch_end(epoch, state)`
    after each epoch (e.g. to evaluate). Both prepared objects and `args.max_train_steps` must be set. `ema`, a
    weight average, is updated after every optimizer step, within the training time.

    `args.max_train_seconds` (optional) stops the loop after the step that spends it: seconds of training, counted
    in `state.train_seconds` (kept through checkpoints) without the callbacks and checkpoint saving, so models that
    evaluate differently get the same training time. Process 0's clock decides for every process. The schedule
    says when the budget is spent (`TimeBudgetSchedule.spend`), so its learning rate reaches 0 with it.

    The loader is either prepared by `accelerate` over a map-style dataset (`TrainingClips`, `MapSource`) or, for
    a stream already split per process (`StreamingClips`, `StreamSource`), left unprepared.
    """
    loop = TrainingLoop(accelerator, model, optimizer, scheduler, data_source(accelerator, dataloader), args, ema)
    return loop.run(compute_loss, on_step, on_epoch_end)


class TrainingLoop:
    """Setup (resume), `run` (epochs), `run_epoch`, `train_step` (one batch), `after_update` (logging, callbacks,
    checkpoints), as MAE's `engine_pretrain.train_one_epoch` and accelerate's examples split a loop."""

    def __init__(self, accelerator, model, optimizer, scheduler, source: MapSource | StreamSource, args, ema=None):
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.source, self.args, self.ema = source, args, ema
        self.checkpoints = Checkpoints(args.output_dir, args.checkpoints_total_limit)
        self.state, path = TrainingState(), None
        if args.resume_from_checkpoint:
            path = self.checkpoints.resolve(args.resume_from_checkpoint)
            self.state = Checkpoints.load(accelerator, path)
            logger.info("Resumed from %s at step %d (epoch %d, batch %d)", path, self.state.global_step,
                        self.state.epoch, self.state.batches_in_epoch)  # fmt: skip
        source.check(args, self.state, path)
        self.checkpoint_every = int(args.checkpointing_steps) if (args.checkpointing_steps or "").isdigit() else None
        self.result = TrainResult(state=self.state, resumed_losses=len(self.state.history.get("loss", [])))
        self.consecutive_nonfinite, self.window_videos = 0, 0
        self.unreadable: list[str] = []  # this process's skipped videos' errors, for `check_bad_share`
        schedule = getattr(scheduler, "scheduler", scheduler)  # accelerate wraps a prepared scheduler
        self.spend = getattr(schedule, "spend", never_spent)
        self.budget_spent = self.spend(self.state.train_seconds)
        self.progress = tqdm(
            total=args.max_train_steps, initial=self.state.global_step, desc="Training", unit="step",
            disable=not accelerator.is_local_main_process,
        )  # fmt: skip
        shared_clock = bool(getattr(args, "max_train_seconds", None))
        self.clock = TrainingClock(accelerator, self.state.train_seconds, shared=shared_clock)
        self.window_start = time.perf_counter()

    def run(self, compute_loss, on_step=None, on_epoch_end=None) -> TrainResult:
        self.compute_loss, self.on_step, self.on_epoch_end = compute_loss, on_step, on_epoch_end
        self.model.train()
        with StopRequest() as self.stop, contextlib.closing(self.progress):  # closed: an error starts its own line
            # Resumed from the checkpoint of its last step, a run has nothing left to train (the limit is otherwise
            # checked after each step, which would train one more).
            epochs = self.source.epochs(self.state.epoch, self.args) if not self.finished() else ()
            for epoch in epochs:
                self.run_epoch(epoch)
                if self.result.stopped_by_signal or self.finished():
                    break
        self.result.seconds = self.clock.elapsed()
        self.log_end()
        return self.result

    def finished(self) -> bool:
        return self.state.global_step >= self.args.max_train_steps or self.result.stopped_by_time

    def run_epoch(self, epoch: int) -> None:
        state, result = self.state, self.result
        state.epoch = epoch
        self.source.set_epoch(epoch)
        exhausted = False
        for batch in self.source.batches(state):
            stop_now = self.train_step(batch)
            if stop_now:
                result.checkpoint = self.save_checkpoint()
                result.stopped_by_signal = True
                self.accelerator.print(
                    f"Stopped by signal at step {state.global_step}. Saved {result.checkpoint}; "
                    f"continue with --resume_from_checkpoint {result.checkpoint}"
                )
                return
            if state.global_step >= self.args.max_train_steps:
                break
            if self.budget_spent:
                result.stopped_by_time = True
                break
        else:
            exhausted = True
        if self.source.epoch_ended(state, exhausted):
            self.check_bad_share(whole_pass=True)
            if self.on_epoch_end is not None:
                with self.clock.paused():
                    self.on_epoch_end(epoch, state)
            state.epoch, state.batches_in_epoch = epoch + 1, 0
            if self.args.checkpointing_steps == "epoch":
                result.checkpoint = self.save_checkpoint()

    def train_step(self, batch: dict) -> bool:
        """One batch: forward, and an update unless some process's batch was empty or its loss non-finite (every
        process takes the same branch, or the gradient all-reduce would wait forever). Returns whether a stop
        was requested (SIGTERM / SIGINT on any process)."""
        accelerator, state, model = self.accelerator, self.state, self.model
        batch = send_to_device(batch, accelerator.device)  # a prepared loader's already are
        state.batches_in_epoch += 1
        indices = batch.pop("index")
        self.unreadable = (self.unreadable + batch.pop("skipped"))[:10]  # a few to name; the count is the state's
        skipped, kept = self.sum_over_processes(torch.stack([batch.pop("num_skipped"), torch.tensor(len(indices))]))
        state.videos_skipped, state.videos_seen = state.videos_skipped + skipped, state.videos_seen + skipped + kept
        self.check_bad_share(whole_pass=False)
        empty = batch["pixel_values"].numel() == 0
        with accelerator.accumulate(model):
            loss, outputs = (None, None) if empty else self.compute_loss(model, batch, state.global_step)
            nonfinite = not empty and not bool(torch.isfinite(loss.detach()))
            flags = torch.tensor([empty, nonfinite, self.stop.requested], dtype=torch.float32)
            if accelerator.num_processes > 1:
                flags = accelerator.reduce(flags.to(accelerator.device), "sum").cpu()
            any_empty, any_nonfinite, stop_now = (bool(f > 0) for f in flags)
            update = not (any_empty or any_nonfinite)
            if update:
                self.update(loss)
            self.optimizer.zero_grad(set_to_none=True)
        if any_nonfinite:
            self.count_nonfinite()
        if update:
            self.consecutive_nonfinite = 0
            self.result.seen += indices.tolist()
            self.window_videos += len(indices) * accelerator.num_processes
        if update and accelerator.sync_gradients:
            self.after_update(float(loss.detach()), batch, outputs)
        return stop_now

    def sum_over_processes(self, counts: torch.Tensor) -> list[int]:
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts.to(self.accelerator.device), "sum")
        return [int(count) for count in counts]

    def check_bad_share(self, whole_pass: bool) -> None:
        """Stop with `BadDataError`, naming this process's unreadable videos, once more than `--max_bad_fraction`
        of the items seen could not be read -- judged after a whole pass or `min_items_for_share` items."""
        state, limit = self.state, self.args.max_bad_fraction
        if not state.videos_skipped or not (whole_pass or state.videos_seen >= min_items_for_share(limit)):
            return
        if state.videos_skipped > limit * state.videos_seen:
            names = [error.splitlines()[0] for error in self.unreadable]
            raise bad_share_error("training videos", state.videos_skipped, state.videos_seen, limit, names)

    def update(self, loss: torch.Tensor) -> None:
        """Backward, clipping and the optimizer and schedule steps (accumulated until `sync_gradients`)."""
        accelerator = self.accelerator
        accelerator.backward(loss)
        if accelerator.sync_gradients and self.args.max_grad_norm:
            accelerator.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
        self.optimizer.step()
        if accelerator.sync_gradients:
            if self.ema is not None:
                self.ema.update()
            self.state.train_seconds = self.clock.seconds()
            self.budget_spent = self.spend(self.state.train_seconds)
        self.scheduler.step()

    def count_nonfinite(self) -> None:
        state = self.state
        self.consecutive_nonfinite += 1
        state.nonfinite_skipped += 1
        logger.warning("Non-finite loss at step %d: update skipped (%d in a row, %d in total).", state.global_step,
                       self.consecutive_nonfinite, state.nonfinite_skipped)  # fmt: skip
        if self.consecutive_nonfinite >= self.args.max_consecutive_nonfinite:
            raise NonFiniteLossError(
                f"{self.consecutive_nonfinite} non-finite losses in a row, the last at step {state.global_step}. "
                f"Last good checkpoint: {self.checkpoints.latest() or 'none saved'}. Lower --learning_rate, "
                "check the data, or use --mixed_precision bf16 instead of fp16."
            )

    def after_update(self, loss: float, batch: dict, outputs) -> None:
        """An optimizer step was taken: count it, log, call `on_step`, checkpoint every `--checkpointing_steps`."""
        state, args = self.state, self.args
        state.global_step += 1
        self.record({"loss": loss})
        self.progress.update(1)
        if state.global_step % args.logging_steps == 0 or state.global_step == args.max_train_steps:
            self.log_window(loss)
        if self.on_step is not None:
            with self.clock.paused():
                self.record(self.on_step(state.global_step, batch, outputs))
        if self.checkpoint_every and state.global_step % self.checkpoint_every == 0:
            self.result.checkpoint = self.save_checkpoint()

    def record(self, values: dict[str, float] | None) -> None:
        """Append each value to the run's history (`TrainingState.history`) under its name."""
        for name, value in (values or {}).items():
            self.state.history.setdefault(name, []).append(value)

    def log_window(self, loss: float) -> None:
        """Loss, learning rate and videos per second since the last log, to the progress bar and the trackers."""
        elapsed = time.perf_counter() - self.window_start
        logs = {"loss": loss, "lr": self.scheduler.get_last_lr()[0], "videos_per_s": self.window_videos / elapsed}
        self.progress.set_postfix(
            loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}", videos_s=f"{logs['videos_per_s']:.1f}"
        )
        self.accelerator.log(logs, step=self.state.global_step)
        self.window_start, self.window_videos = time.perf_counter(), 0

    def save_checkpoint(self) -> Path:
        self.state.data_state = self.source.state_dict()
        with self.clock.paused():
            averages = [self.ema.average] if self.ema is not None else []
            needed = nbytes(self.model.state_dict(), self.optimizer.state_dict(), *averages)
            return self.checkpoints.save(self.accelerator, self.state, needed)

    def log_end(self) -> None:
        state = self.state
        if self.result.stopped_by_time:
            logger.info(
                "Stopped by --max_train_seconds %g after %.1f s of training, at step %d of at most %d (the step count "
                "depends on the machine and its load).", self.args.max_train_seconds, state.train_seconds,
                state.global_step, self.args.max_train_steps,
            )  # fmt: skip
        if state.videos_skipped:
            logger.warning(
                "%d of %d training videos could not be read and were skipped (see the warnings above).",
                state.videos_skipped, state.videos_seen,
            )  # fmt: skip


def steps_per_epoch(num_batches: int, args: argparse.Namespace) -> int:
    """Optimizer steps in an epoch of `num_batches` batches per process: an accumulation cut short by the epoch's
    end still steps (accelerate syncs gradients at the end of a loader)."""
    return math.ceil(num_batches / args.gradient_accumulation_steps)


def schedule_steps(args: argparse.Namespace, dataloader_len: int | None) -> None:
    """Settle `max_train_steps`, `num_train_epochs` and `num_warmup_steps` from the flags and data size
    (`dataloader_len` None: a stream of unknown length, trained for `--max_train_steps`)."""
    if dataloader_len is None:
        if args.max_train_steps is None:
            raise ValueError("A streamed corpus has no length: give --max_train_steps.")
        args.num_warmup_steps = (
            max(1, round(0.05 * args.max_train_steps)) if args.num_warmup_steps is None else args.num_warmup_steps
        )
        return
    epoch_steps = steps_per_epoch(dataloader_len, args)
    if epoch_steps == 0:
        raise ValueError(
            f"The training set gives no full batch of {args.per_device_train_batch_size} per process; "
            "use more videos or a smaller --per_device_train_batch_size."
        )
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * epoch_steps
    args.num_train_epochs = math.ceil(args.max_train_steps / epoch_steps)
    if args.num_warmup_steps is None:
        args.num_warmup_steps = max(1, round(0.05 * args.max_train_steps))


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def predict_split(
    accelerator: Accelerator,
    model: torch.nn.Module,
    processor: EchoAIVideoProcessor,
    video_paths: Sequence[str],
    num_clips: int,
    clips_per_batch: int,
    num_workers: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-video logits of a split by `inference_echoai.predict_videos`, the predictor `scripts/evaluate.py` reports
    with, so the checkpoint chosen on validation is measured as the reported number is: `num_clips` evenly spaced
    clips per video, no augmentation ("one_clip" / "k_clips"), logits averaged per video.

    Each process predicts a contiguous share of the videos, padded with the last video to one length so every
    process runs as many forward passes (FSDP needs that), and the shares are gathered. Returns `(indices,
    logits)`: the readable videos' positions in `video_paths`, sorted, and their logits (N, num_labels) -- EF
    (%) for regression, class logits for classification. Unreadable videos are logged and left out.
    """
    share = math.ceil(len(video_paths) / accelerator.num_processes)
    first = accelerator.process_index * share
    mine = [min(i, len(video_paths) - 1) for i in range(first, first + share)]
    was_training = model.training
    model.eval()
    protocol = "k_clips" if num_clips > 1 else "one_clip"
    results = predict_videos(model, processor, [video_paths[i] for i in mine], protocol=protocol,
                             num_clips=num_clips, batch_size=clips_per_batch, num_workers=num_workers, progress=False)  # fmt: skip
    model.train(was_training)
    for result in results:
        if result.error is not None:
            logger.warning("Could not read %s: %s", result.path, result.error)
    readable = [(i, r.logits) for i, r in zip(mine, results, strict=True) if r.error is None]
    by_index = dict(gather_object(readable) if accelerator.num_processes > 1 else readable)
    indices = np.array(sorted(by_index), dtype=np.int64)
    num_labels = unwrap(accelerator, model).config.num_labels
    logits = np.stack([by_index[i] for i in indices]) if len(indices) else np.empty((0, num_labels))
    return indices, logits


class BestModel:
    """The best weights by a validation score (lower is better), kept on the CPU.

    Register it with `accelerator.register_for_checkpointing` so every checkpoint carries the best weights so
    far and a resumed run keeps comparing against (and can restore) the same best model.
    """

    def __init__(self):
        self.score: float | None = None
        self.step: int | None = None
        self.epoch: int | None = None
        self.metrics: dict[str, float] = {}
        self.weights: dict[str, torch.Tensor] | None = None

    def improves(self, score: float) -> bool:
        return self.score is None or score < self.score

    def update(self, score: float, metrics: dict, state_dict: dict[str, torch.Tensor], step: int, epoch: int) -> None:
        self.score, self.step, self.epoch, self.metrics = float(score), step, epoch, dict(metrics)
        self.weights = {name: value.detach().to("cpu", copy=True) for name, value in state_dict.items()}

    def state_dict(self) -> dict:
        return {"score": self.score, "step": self.step, "epoch": self.epoch, "metrics": self.metrics,
                "weights": self.weights}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.score, self.step, self.epoch = state["score"], state["step"], state["epoch"]
        self.metrics, self.weights = state["metrics"], state["weights"]


class ExponentialMovingAverage:
    """An exponential moving average of a model's weights over training (Polyak averaging, as timm's `ModelEma`
    and TensorFlow's `ExponentialMovingAverage`): after each optimizer step `update` moves every average towards the
    live value by `1 - d`, with `d = min(decay, (1 + t) / (10 + t))` after `t` updates, so the first steps are not
    held at the starting weights. Floating-point buffers (batch-norm statistics) are averaged too, others copied.
    The average is kept in fp32 on the model's device; `swapped_in` puts it into the model for evaluation and
    restores the live weights after. Register it with `accelerator.register_for_checkpointing` so that a resumed
    run continues the same average.

    Under FSDP each process holds a shard of the weights, which this average does not follow: an error.
    """

    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the weight average's decay must lie in (0, 1), got {decay:g}")
        if accelerator.distributed_type == DistributedType.FSDP:
            raise ValueError(
                "an exponential moving average of the weights needs each process to hold the whole model; under FSDP "
                "the weights are sharded: train without it (drop --ema_decay) or with DDP"
            )
        self.decay, self.num_updates = float(decay), 0
        bare = unwrap(accelerator, model)
        self.tensors = dict(itertools.chain(bare.named_parameters(), bare.named_buffers()))
        self.averaged = [name for name, t in self.tensors.items() if t.is_floating_point()]
        self.copied = [name for name in self.tensors if name not in self.averaged]
        self.average = {  # fp32 averages; integer buffers (batch norm's step count) keep their dtype
            name: (t.detach().float() if name in self.averaged else t.detach()).clone()
            for name, t in self.tensors.items()
        }

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self) -> None:
        weight = 1.0 - self.current_decay()
        live = [self.tensors[name].detach().float() for name in self.averaged]
        torch._foreach_lerp_([self.average[name] for name in self.averaged], live, weight)
        for name in self.copied:
            self.average[name].copy_(self.tensors[name])
        self.num_updates += 1

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self):
        """The model holds the averaged weights inside the block and its live ones again after it."""
        live = {name: t.detach().clone() for name, t in self.tensors.items()}
        try:
            for name, t in self.tensors.items():
                t.copy_(self.average[name])
            yield
        finally:
            for name, t in self.tensors.items():
                t.copy_(live[name])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "average": self.average}

    def load_state_dict(self, state: dict) -> None:
        if state["average"].keys() != self.average.keys():
            raise ValueError("the checkpoint's weight average is of another model: its tensors' names differ")
        if state["decay"] != self.decay:
            raise ValueError(
                f"the checkpoint averages the weights with decay {state['decay']:g}, this run with {self.decay:g}: "
                f"resume with --ema_decay {state['decay']:g}"
            )
        self.num_updates = state["num_updates"]
        for name, value in state["average"].items():
            self.average[name].copy_(value)


# --------------------------------------------------------------------------------------------------
# Saving, model card, Hub
# --------------------------------------------------------------------------------------------------


def unwrap(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The bare model, without accelerate's wrappers (DDP, ...) nor torch.compile's (whose parameter names carry
    an `_orig_mod.` prefix)."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def model_state_dict(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict under the bare model's names (gathered from every process under FSDP)."""
    return accelerator.get_state_dict(model._orig_mod if is_compiled_module(model) else model)


def save_model(
    accelerator: Accelerator, model: torch.nn.Module, processor: EchoAIVideoProcessor, output_dir: str | os.PathLike
) -> None:
    """`save_pretrained` of model (safetensors, with remote code) and processor, from the main process. A disk too
    full for the weights is a `DiskFullError`, before writing when the free space is short, else with the
    half-written weight files removed (a truncated `model.safetensors` would look like a finished run)."""
    accelerator.wait_for_everyone()
    state_dict = model_state_dict(accelerator, model)
    needed = nbytes(state_dict)
    ensure_free_space(output_dir, needed)

    def remove_weights() -> None:
        for path in Path(output_dir).glob("model*.safetensors*"):
            path.unlink(missing_ok=True)

    with disk_full_guard(output_dir, needed, cleanup=remove_weights):
        unwrap(accelerator, model).save_pretrained(
            output_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save,
            state_dict=state_dict,
        )  # fmt: skip
        if accelerator.is_main_process:
            processor.save_pretrained(output_dir)
    accelerator.wait_for_everyone()


def save_text(path: str | os.PathLike, text: str) -> None:
    """Write a run's small outputs (results json, model card); a full disk is a `DiskFullError` naming `path`."""
    needed = len(text.encode())
    ensure_free_space(path, needed)
    with disk_full_guard(path, needed, cleanup=lambda: Path(path).unlink(missing_ok=True)):
        Path(path).write_text(text, encoding="utf-8")


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_card_template() -> Path:
    """`model_card.md`: beside this module in a checkout or editable install, else in `<prefix>/share/echoai`."""
    for candidate in (
        Path(__file__).with_name("model_card.md"),
        Path(sys.prefix) / "share" / "echoai" / "model_card.md",
    ):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("model_card.md not found beside training_echoai.py or in <prefix>/share/echoai")


def render_model_card(
    model: torch.nn.Module,
    args: argparse.Namespace,
    task: str,
    dataset_dir: Path | str | None,
    num_videos: int | None,
    train_result: TrainResult,
    metrics: dict[str, dict[str, float]] | None = None,
    eval_protocol: str = "",
    dataset_name: str | None = None,
    failure: str | None = None,
    start: dict | None = None,
) -> ModelCard:
    """Fill `model_card.md` from the run: architecture, size, data, hyper-parameters and, for a fine-tuned
    model, the metrics (also written as the card's `model-index`, task regression, metrics MAE/RMSE/R²).

    `task` is "pretraining", "regression" or "classification"; `num_videos` None: a streamed corpus; `metrics` maps
    a split ("validation", "test") to {"mae": ..., "rmse": ..., "r2": ...} (or {"accuracy": ...}), with the mean
    predictor's figures on the same videos under "mean_predictor" (`metrics_echoai.check_against_mean_predictor`),
    shown beside the model's. `failure`: why the model did not learn EF (the same check), stated at the top of the
    card. `start`: the checkpoint fine-tuning started from (`describe_start`), named with its weights' sha256 in the
    hyper-parameters and, when it is a Hub model, as the card's `base_model`.
    """
    config = model.config
    synthetic = dataset_dir is not None and "synthetic_echonet" in str(dataset_dir)
    dataset_name = dataset_name or card_dataset_name(dataset_dir, synthetic)
    repo_id = args.hub_model_id or Path(args.output_dir).name
    eval_results, eval_rows, mean_predictor_ef = card_eval_results(metrics or {}, task, dataset_name)
    card_data = ModelCardData(
        library_name="transformers",
        license="apache-2.0",
        tags=["echocardiography", "video", "masked-autoencoder", "echoai", "medical-imaging", "research-only"],
        pipeline_tag="video-classification",
        model_name=repo_id,
        eval_results=eval_results or None,
        base_model=start["model_name_or_path"] if start and not Path(start["model_name_or_path"]).is_dir() else None,
    )
    training_data = (
        f"{num_videos} videos of {dataset_name}" if num_videos is not None else f"{dataset_name}, streamed"
    ) + ("" if synthetic else f" ({dataset_dir})" if dataset_dir else "")
    return ModelCard.from_template(
        card_data,
        template_path=str(model_card_template()),
        model_name=repo_id,
        repo_id=repo_id,
        task=task,
        from_scratch=bool(getattr(args, "from_scratch", False)),
        **card_architecture(model),
        period=getattr(args, "period", 4),
        mask_percent=round(100 * config.mask_ratio),
        synthetic=synthetic,
        training_data_short=dataset_name,
        training_data=training_data,
        procedure=card_procedure(args, config, task),
        hyperparameters=card_hyperparameters(args, config, train_result, start),
        eval_rows=eval_rows,
        eval_protocol=eval_protocol,
        mean_predictor_ef=f"{mean_predictor_ef:.1f}" if mean_predictor_ef is not None else None,
        failure=failure,
    )


def card_dataset_name(dataset_dir: Path | str | None, synthetic: bool) -> str:
    if synthetic:
        return "EchoAI synthetic echo phantom"
    if dataset_dir and (Path(dataset_dir) / "FileList.csv").is_file():
        return "EchoNet-Dynamic"
    return "echo videos"


def card_eval_results(
    metrics: dict[str, dict[str, float]], task: str, dataset_name: str
) -> tuple[list[EvalResult], list[dict], float | None]:
    """The card's `model-index` entries, its table rows (each beside the mean predictor's figure) and the mean
    predictor's EF, from `render_model_card`'s `metrics`."""
    eval_results, eval_rows, mean_predictor_ef = [], [], None
    names = {"mae": "MAE", "rmse": "RMSE", "r2": "R²", "accuracy": "accuracy"}
    task_type = "video-classification" if task == "classification" else "regression"
    for split, values in metrics.items():
        mean_predictor = values.get("mean_predictor") or {}
        mean_predictor_ef = mean_predictor.get("ef", mean_predictor_ef)
        for key, label in names.items():
            if values.get(key) is None:  # None: undefined on this split
                continue
            baseline = mean_predictor.get(key)
            eval_rows.append(
                {"split": split, "metric": label, "value": f"{values[key]:.3f}",
                 "mean_predictor": f"{baseline:.3f}" if baseline is not None else "n/a"}
            )  # fmt: skip
            eval_results.append(
                EvalResult(
                    task_type=task_type, dataset_type=dataset_name.lower().replace(" ", "-"),
                    dataset_name=dataset_name, dataset_split=split, metric_type=key,
                    metric_name=f"{label} (EF %)" if key in ("mae", "rmse") else label,
                    metric_value=float(values[key]),
                )
            )  # fmt: skip
    return eval_results, eval_rows, mean_predictor_ef


def card_hyperparameters(
    args: argparse.Namespace, config: EchoAIConfig, train_result: TrainResult, start: dict | None = None
) -> dict:
    # A fine-tuned model names the checkpoint it started from (`--config_name` is then unused); the rest their preset.
    where = {"start": start_fingerprint(start)} if start else {"preset": args.config_name}
    hyperparameters = {
        **where,
        "optimizer": f"AdamW (0.9, {args.adam_beta2}), weight decay {args.weight_decay}",
        "learning rate": f"{args.learning_rate:g}, {args.num_warmup_steps} warm-up steps, cosine decay",
        "steps": train_result.state.global_step,
        "batch per device": args.per_device_train_batch_size,
        "gradient accumulation": args.gradient_accumulation_steps,
        "mixed precision": args.mixed_precision or "from accelerate config",
        "mask ratio": config.mask_ratio,
        "seed": args.seed,
    }
    for name in ("layer_decay", "drop_path_rate"):
        if getattr(args, name, None) is not None:
            hyperparameters[name.replace("_", " ")] = getattr(args, name)
    if getattr(args, "lv_segmentation_weight", 0):
        hyperparameters["LV segmentation loss weight (ED/ES tracings)"] = args.lv_segmentation_weight
    if getattr(args, "ema_decay", 0):
        hyperparameters["weight average (EMA) decay"] = args.ema_decay
    return hyperparameters


def card_procedure(args: argparse.Namespace, config: EchoAIConfig, task: str) -> str:
    start = "a randomly initialised encoder" if getattr(args, "from_scratch", False) else "a pretrained encoder"
    if getattr(args, "reinit_top_layers", 0):
        n = args.reinit_top_layers
        start += f" with its top {n} layer{'s' if n > 1 else ''} re-initialised"
    if getattr(args, "linear_probe_steps", 0):
        start += f", the heads alone trained for the first {args.linear_probe_steps} steps (LP-FT)"
    pooling = {
        "mean": "mean-pooled tokens",
        "mean_max_min": "each token slice's mean, pooled by mean, maximum and minimum over time",
    }[config.pooling]
    target = describe_reconstruction_target(config)
    return {
        "pretraining": f"masked-autoencoder pretraining: {config.mask_strategy} masking, MSE on {target}",
        "regression": f"EF regression from {start} ({pooling}, linear head)",
        "classification": f"classification from {start} ({pooling}, linear head)",
    }[task]


def describe_reconstruction_target(config: EchoAIConfig) -> str:
    """What the decoder of `config` predicts of each hidden tubelet, in words (`modeling_echoai.target_patches`)."""
    k = config.reconstruction_target_pool
    if config.reconstruction_target == "hog":
        return f"the hidden tubelets' histograms of oriented gradients in {k} x {k} cells, normalised per frame"
    what = {"pixels": "pixels", "motion": "motion (each frame minus the clip's mean frame)"}[
        config.reconstruction_target
    ]
    blocks = f" in {k} x {k} block averages" if k > 1 else ""
    norm = ", normalised per tubelet" if config.norm_pix_loss else ""
    return f"the hidden tubelets' {what}{blocks}{norm}"


def share_of_target_predicted(loss: float, target_variance: float) -> float:
    """1 - loss / the reconstruction target's variance: the share of what the decoder must predict that it does
    predict. 0 for a decoder that outputs the target's mean whatever it sees, which the loss alone cannot tell apart
    from learning (a target's variance differs between targets and corpora; docs/EXPERIMENTS.md, section 3, item
    22)."""
    return 1.0 - loss / max(target_variance, 1e-12)


def card_architecture(model: torch.nn.Module) -> dict:
    config = model.config
    stem = (
        f"{len(config.stem_channels)} strided 3-D convolutions ({'/'.join(map(str, config.stem_channels))} "
        "channels) before the tubelet projection"
        if config.stem_channels
        else None
    )
    return dict(
        architecture=type(model).__name__, num_parameters_m=f"{count_parameters(model) / 1e6:.2f}",
        hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_frames=config.num_frames, image_size=config.image_size,
        num_channels=config.num_channels, tubelet_size=config.tubelet_size, patch_size=config.patch_size, stem=stem,
    )  # fmt: skip


class HubError(RunError):
    pass


def hub_failure(error: Exception) -> str:
    """An exception of the Hub client, in a few words. The client raises from several libraries -- its own
    `HfHubHTTPError` (a bad token, a name taken), `OfflineModeIsEnabled`, the HTTP library's connection errors,
    `ValueError` for a malformed name -- so callers catch `Exception` around the one call and describe it here."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def create_hub_repo(args: argparse.Namespace, accelerator: Accelerator, api: HfApi | None = None) -> None:
    """With `--push_to_hub`, check the token, the Hub and the repository before the first step by creating the
    repository (`exist_ok`, as transformers' examples do): a failure costs seconds, not the run (`HubError`)."""
    if not args.push_to_hub:
        return
    if not args.hub_model_id:
        raise HubError("--push_to_hub needs --hub_model_id (e.g. my-org/echoai-small-ef)")
    if not accelerator.is_main_process:
        return
    try:
        (api or HfApi(token=args.hub_token)).create_repo(args.hub_model_id, exist_ok=True, repo_type="model")
    except Exception as error:  # whichever library raised it (`hub_failure`), the run could not publish
        raise HubError(
            f"--push_to_hub: cannot create {args.hub_model_id} on the Hub ({hub_failure(error)}); nothing was "
            "trained. Check the network, the token (--hub_token or `hf auth login`) and the name, or drop "
            "--push_to_hub."
        ) from None


def upload_command(folder: str | os.PathLike, repo_id: str) -> str:
    """The `hf` command (huggingface_hub's CLI) that uploads a saved run as `push_to_hub` does."""
    excludes = " ".join(f"--exclude '{pattern}'" for pattern in HUB_IGNORE_PATTERNS)
    return f"hf upload {repo_id} {shlex.quote(str(folder))} . {excludes}"


def push_to_hub(
    folder: str | os.PathLike, repo_id: str | None, token: str | None = None, api: HfApi | None = None
) -> str:
    """Create the repository if needed and upload `folder` (weights, processor, code, README.md card). A failed
    upload is a `HubError` whose line gives the command that uploads the folder later; the folder is kept."""
    if not repo_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. my-org/echoai-small-ef)")
    if not (Path(folder) / "README.md").is_file() or not (Path(folder) / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no saved model and card to upload")
    api = api or HfApi(token=token)
    try:
        url = api.create_repo(repo_id, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), commit_message="Upload EchoAI model",
            ignore_patterns=list(HUB_IGNORE_PATTERNS),
        )  # fmt: skip
    except Exception as error:  # as in `create_hub_repo`
        raise HubError(
            f"Upload to {repo_id} failed ({hub_failure(error)}); the model is saved in {folder}. Upload it later "
            f"with: {upload_command(folder, repo_id)}"
        ) from None
    return str(url)


def hog_energy(
    config: EchoAIConfig, histograms: torch.Tensor, bool_masked_pos: torch.BoolTensor, shape: torch.Size
) -> torch.Tensor:
    """(1, M, t (p / k)² 9) gradient histograms of the hidden tubelets (a `"hog"` target or its prediction) -> a
    (T, C, H, W) picture of each k x k cell's summed histogram, zero at the visible tubelets."""
    k = config.reconstruction_target_pool
    grid = (shape[1] // config.tubelet_size, shape[3] // config.patch_size, shape[4] // config.patch_size)
    full = histograms.new_zeros(1, bool_masked_pos.shape[1], histograms.shape[-1])
    full[bool_masked_pos] = histograms[0].to(full.dtype)
    cells = unpatchify(full, config.tubelet_size, config.patch_size // k, grid)  # (1, T, bins, H / k, W / k)
    energy = cells[0].clamp_min(0).sum(dim=1, keepdim=True)  # (T, 1, H / k, W / k)
    energy = energy.repeat_interleave(k, dim=2).repeat_interleave(k, dim=3)
    return energy.expand(-1, shape[2], -1, -1)


def save_reconstruction(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    outputs,
    processor: EchoAIVideoProcessor,
    path: Path,
    num_frames_shown: int = 4,
) -> Path:
    """PNG of the first clip of a batch: original / masked input / reconstruction, a few frames each. After a
    decoder-masked step (`outputs.decoder_mask`) the clip's hidden tubelets are predicted again by the full
    decoder, so the picture shows every one of them reconstructed.

    With a `"motion"` target the reconstruction row has the clip's true mean frame added back, which carries most
    of the picture whatever the decoder learned; two more rows show what it did learn: the true motion (each frame
    minus the clip's mean frame, in the target's block averages) and the decoder's prediction of it, on the hidden
    tubelets (visible ones left at 0) and on one signed scale. A `"hog"` target has no pixels to reconstruct: its
    rows show each cell's gradient energy (`hog_energy`), true and predicted, on the hidden tubelets."""
    clip, mask, logits = pixel_values[:1].float(), outputs.mask[:1].bool(), outputs.logits[:1].detach().float()
    if getattr(outputs, "decoder_mask", None) is not None:
        with torch.no_grad():
            logits = model(clip, bool_masked_pos=mask, decoder_bool_masked_pos=torch.zeros_like(mask)).logits.float()
    mean = torch.tensor(processor.image_mean).view(1, -1, 1, 1)
    std = torch.tensor(processor.image_std).view(1, -1, 1, 1)
    visible = model.echoai.embeddings.patch_embeddings.visible_pixels(mask, clip.transpose(1, 2).shape)
    hidden = ~visible[0].transpose(0, 1)  # (T, 1, H, W): pixels of hidden tubelets
    rows = {"original": clip[0], "masked input": torch.where(hidden, 0.0, clip[0])}
    if model.config.reconstruction_target == "hog":  # no pixels to draw: each cell's gradient energy instead
        with torch.no_grad():
            true_hog = model.reconstruction_target(clip, mask)
        rows["edges"] = torch.where(hidden, hog_energy(model.config, true_hog, mask, clip.shape), 0.0)
        rows["predicted edges"] = torch.where(hidden, hog_energy(model.config, logits, mask, clip.shape), 0.0)
    else:
        rows["reconstruction"] = model.reconstruct(clip, logits, mask)[1][0]
    if model.config.reconstruction_target == "motion":  # both as the decoder sees them: hidden tubelets, its blocks
        with torch.no_grad():
            _, motion = model.reconstruct(clip, model.reconstruction_target(clip, mask), mask, add_static=False)
        _, predicted = model.reconstruct(clip, logits, mask, add_static=False)
        rows["motion"] = torch.where(hidden, motion[0], 0.0)
        rows["predicted motion"] = torch.where(hidden, predicted[0], 0.0)
    frames = torch.linspace(0, clip.shape[1] - 1, num_frames_shown).round().long().tolist()
    figure = make_figure((2 * len(frames), 2.1 * len(rows)), dpi=80)
    axes = figure.subplots(len(rows), len(frames), squeeze=False)
    scale = float(rows["motion"][frames].mean(dim=1).abs().max().clamp_min(1e-6)) if "motion" in rows else 1.0
    for r, (title, video) in enumerate(rows.items()):
        if "motion" in title:  # signed, in the processor's normalised units, on the true motion's scale
            images, shown = video[frames].cpu().mean(dim=1), {"cmap": "RdBu_r", "vmin": -scale, "vmax": scale}
        elif "edges" in title:  # a cell's summed histogram, on the true target's scale
            edges = float(rows["edges"].max().clamp_min(1e-6))
            images, shown = video[frames].cpu().mean(dim=1), {"cmap": "magma", "vmin": 0, "vmax": edges}
        else:
            grey = (video[frames].cpu() * std + mean).clamp(0, 1).mean(dim=1)  # (F, H, W) in [0, 1]
            images, shown = grey, {"cmap": "gray", "vmin": 0, "vmax": 1}
        if title == "masked input":
            images = torch.where(hidden[frames, 0], torch.full_like(images, 0.5), images)
        for c, frame in enumerate(frames):
            axes[r][c].imshow(images[c].numpy(), **shown)
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
            if r == 0:
                axes[r][c].set_title(f"frame {frame}")
        axes[r][0].set_ylabel(title)
    loss = float(outputs.loss.detach()) if getattr(outputs, "loss", None) is not None else float("nan")
    figure.suptitle(f"EchoAI masked reconstruction (batch loss {loss:.3f})")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
