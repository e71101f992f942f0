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
  the steps or, with `--max_train_seconds`, over whichever of steps and seconds is further spent.
* `Checkpoints` -- `accelerator.save_state` written to a temporary folder and renamed into place (a
  killed save never leaves a half checkpoint), rotated, and found again by `latest`.
* `train` -- the loop: accumulation, clipping, skipping of non-finite losses, SIGTERM/SIGINT handling,
  checkpoints, a time budget, progress bar and tracker logging.
* `predict_ef`, `BestModel` -- batched, gathered evaluation (one or several clips per video) and the best
  weights by a validation score, kept through checkpoints.
* `save_model`, `render_model_card`, `push_to_hub` -- the end of a run.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import (
    ProjectConfiguration,
    TorchDynamoPlugin,
    broadcast,
    is_compiled_module,
    send_to_device,
    set_seed,
)
from datasets import Dataset, IterableDataset
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from configuration_echoai import PRESETS, EchoAIConfig
from data_echoai import EchoAIDataCollator, read_video_file
from perf_echoai import keep_freed_memory  # noqa: F401  (re-exported: scripts/evaluate.py and predict.py import it here)
from video_processing_echoai import EchoAIVideoProcessor, VideoDecodingError, compute_mean_std, read_video_frames


logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
STATE_FILE = "training_state.json"
DATA_STATE_FILE = "data_state_{rank}.json"  # a stream's position, one per process


# --------------------------------------------------------------------------------------------------
# Arguments and accelerator
# --------------------------------------------------------------------------------------------------


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags both scripts share, named as in transformers' `*_no_trainer.py` examples."""
    add = parser.add_argument
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
    add("--with_tracking", action="store_true", help="Log to the trackers named by --report_to.")
    add("--report_to", type=str, default="tensorboard", help="'tensorboard', 'wandb', 'all', ...")
    add("--logging_steps", type=int, default=10)
    add("--seed", type=int, default=0)
    add(
        "--num_threads", type=int, default=None,
        help="torch CPU threads per process (default: torch's choice). 1 avoids oversubscription when other "
        "processes share the cores: two threads next to a busy process ran a step up to 25x slower.",
    )  # fmt: skip
    add(
        "--torch_compile", action="store_true",
        help="Compile the model with torch.compile (through accelerate). The first steps pay the compilation (half "
        "a minute to a minute for the small preset on CPU); then a bf16 CPU step of the small preset ran 1.06x faster.",
    )  # fmt: skip
    add("--torch_compile_backend", default="inductor", help="torch.compile backend with --torch_compile.")
    add("--push_to_hub", action="store_true")
    add("--hub_model_id", type=str, default=None)
    add("--hub_token", type=str, default=None)
    return parser


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


ReadClips = Callable[[dict, EchoAIVideoProcessor, "torch.Generator | None", bool, int], torch.Tensor]


def read_item(
    read_clips: ReadClips,
    row: dict,
    processor: EchoAIVideoProcessor,
    generator: torch.Generator | None,
    training: bool,
    num_clips: int,
    label: float,
    index: int,
) -> dict:
    """One item for `collate`: `pixel_values`, `labels`, `index`, and `error` (the message, with `pixel_values`
    None) when the video cannot be decoded."""
    try:
        pixel_values, error = read_clips(row, processor, generator, training, num_clips), None
    except VideoDecodingError as exception:
        pixel_values, error = None, str(exception)
    return {"pixel_values": pixel_values, "labels": float(label), "index": index, "error": error}


class TrainingClips(torch.utils.data.Dataset):
    """Rows of a video dataset -> one clip each (`pixel_values` (T, C, H, W), `labels`, `index`).

    `rows` is any sized, indexable table of rows (a `datasets.Dataset`); `read_clips(row, processor, generator,
    training, num_clips)` turns a row into `pixel_values`: by default `read_video_file` (the file at
    `row["video_path"]`), for a prepared corpus `corpus_echoai.row_to_pixel_values` (the row's own bytes). Rows
    are read one at a time when an item is asked for, so a corpus far larger than memory is never loaded whole.

    In training the order is a fresh permutation every epoch and each clip's start and augmentation come
    from a generator seeded by (seed, epoch, video index): the data a step sees depends only on the step,
    never on worker count, process count or where a run was resumed. Call `set_epoch` before iterating.
    In evaluation (`training=False`) the order is fixed and each video gives `num_clips` evenly spaced
    clips without augmentation. An unreadable video gives `pixel_values=None` and its error, which
    `collate` drops and counts.
    """

    def __init__(
        self,
        rows: Dataset,
        processor: EchoAIVideoProcessor,
        training: bool,
        seed: int = 0,
        label_column: str | None = None,
        num_clips: int = 1,
        read_clips: ReadClips = read_video_file,
    ):
        self.rows, self.label_column, self.read_clips = rows, label_column, read_clips
        self.processor, self.training, self.seed, self.num_clips = processor, training, seed, num_clips
        self.order = np.arange(len(rows))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        if self.training:
            self.order = np.random.default_rng(derive_seed(self.seed, epoch)).permutation(len(self.rows))
            self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        index = int(self.order[i])
        row = self.rows[index]
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, index)) if self.training else None
        label = row[self.label_column] if self.label_column else math.nan
        return read_item(self.read_clips, row, self.processor, generator, self.training, self.num_clips, label, index)


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

    training = True

    def __init__(
        self,
        rows: IterableDataset,
        processor: EchoAIVideoProcessor,
        seed: int = 0,
        rank: int = 0,
        label_column: str | None = None,
        read_clips: ReadClips = read_video_file,
    ):
        self.rows, self.processor, self.seed, self.rank = rows, processor, seed, rank
        self.label_column, self.read_clips = label_column, read_clips
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
            item = read_item(self.read_clips, row, self.processor, torch.Generator().manual_seed(seed), True, 1,
                             label, self.position)  # fmt: skip
            self.position += 1  # before yielding: `state_dict` is then right between two items
            yield item


def collate(features: list[dict]) -> dict[str, torch.Tensor]:
    """`EchoAIDataCollator` (drops and counts unreadable videos) plus the dataset index of each kept row."""
    batch = EchoAIDataCollator()(features)
    batch["index"] = torch.tensor([f["index"] for f in features if f["pixel_values"] is not None], dtype=torch.int64)
    return batch


def make_dataloader(
    dataset: TrainingClips | StreamingClips, batch_size: int, num_workers: int
) -> torch.utils.data.DataLoader:
    # The dataset shuffles itself (see TrainingClips), so the loader reads in order; `accelerate` then
    # hands consecutive batches to consecutive processes. A stream is already this process's part.
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate,
        persistent_workers=False, drop_last=dataset.training,
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
    table or a stream of rows (a prepared corpus: `corpus_echoai.read_row_frames`). A table is sampled at
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
        videos, read_frames = videos["video_path"], read_video_frames
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
    model: torch.nn.Module, weight_decay: float, learning_rate: float, layer_decay: float | None = None
) -> list[dict]:
    """AdamW parameter groups: decay / no decay, each scaled by layer-wise learning-rate decay if given
    (layer l of L gets learning_rate * layer_decay ** (L + 1 - l), so the head learns fastest). Without layer decay
    any module will do (the R(2+1)D baseline has no transformer layers)."""
    num_layers = model.config.num_hidden_layers if layer_decay is not None else 0
    groups: dict[tuple[bool, int], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        decay = not no_weight_decay(name, parameter)
        depth = layer_id(name, num_layers) if layer_decay is not None else num_layers + 1
        scale = layer_decay ** (num_layers + 1 - depth) if layer_decay is not None else 1.0
        group = groups.setdefault(
            (decay, depth), {"params": [], "weight_decay": weight_decay if decay else 0.0, "lr": learning_rate * scale}
        )
        group["params"].append(parameter)
    return list(groups.values())


def build_optimizer(
    model: torch.nn.Module,
    args: argparse.Namespace,
    accelerator: Accelerator,
    dataloader: torch.utils.data.DataLoader,
    layer_decay: float | None = None,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW (0.9, `--adam_beta2`) over `param_groups`, linear warm-up then cosine decay (MAE's pretraining and
    fine-tuning recipes); settles `args.max_train_steps` etc. from the unprepared loader (see `schedule_steps`)."""
    optimizer = torch.optim.AdamW(
        param_groups(model, args.weight_decay, args.learning_rate, layer_decay),
        lr=args.learning_rate,
        betas=(0.9, args.adam_beta2),
        # One kernel over all tensors (CPU and CUDA): a third of the foreach update's time for the small preset
        # on CPU, the same update to float rounding; transformers' Trainer uses it by default too.
        fused=True,
    )
    streamed = isinstance(dataloader.dataset, torch.utils.data.IterableDataset)  # no length: --max_train_steps
    schedule_steps(args, None if streamed else math.ceil(len(dataloader) / accelerator.num_processes))
    # A prepared scheduler steps once per process per optimizer step, hence the factor.
    num_warmup_steps = args.num_warmup_steps * accelerator.num_processes
    num_training_steps = args.max_train_steps * accelerator.num_processes
    if getattr(args, "max_train_seconds", None):
        scheduler = TimeBudgetSchedule(optimizer, num_warmup_steps, num_training_steps, args.max_train_seconds)
    else:
        scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps, num_training_steps)
    return optimizer, scheduler


class TimeBudgetSchedule(torch.optim.lr_scheduler.LRScheduler):
    """Linear warm-up then cosine decay over a run's progress p = max(steps / max steps, seconds / max seconds).

    When the steps run out first this is exactly transformers' `get_cosine_schedule_with_warmup`; when the time
    budget (`--max_train_seconds`) runs out first the learning rate still reaches 0 as the run stops, instead of
    being cut at its peak. The warm-up takes the first `num_warmup_steps / num_training_steps` of the progress.
    `train` sets `seconds` (seconds of training so far, the same on every process) before each `step()`.
    """

    def __init__(self, optimizer, num_warmup_steps: int, num_training_steps: int, max_seconds: float):
        if not max_seconds > 0:
            raise ValueError(f"--max_train_seconds must be positive, got {max_seconds!r}")
        self.warmup_fraction = num_warmup_steps / max(1, num_training_steps)
        self.num_training_steps, self.max_seconds, self.seconds = num_training_steps, float(max_seconds), 0.0
        super().__init__(optimizer)

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
    videos_skipped: int = 0
    best_metric: float | None = None
    train_seconds: float = 0.0  # seconds of training so far (evaluation and checkpoints not counted): the time budget
    # This process's position in a stream (`StreamingClips.state_dict`), None for a map-style dataset. Each
    # process has its own, so it is saved apart from the rest: one `data_state_<rank>.json` per process.
    data_state: dict | None = None


class Checkpoints:
    """Resumable checkpoints `<output_dir>/checkpoints/step_<N>`, written atomically and rotated."""

    def __init__(self, output_dir: str | os.PathLike, total_limit: int | None = None):
        self.root = Path(output_dir) / "checkpoints"
        self.total_limit = total_limit

    def all(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)]
        return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def resolve(self, value: str) -> Path:
        """`latest` or a folder -> a checkpoint folder, with an error naming what was looked for."""
        path = self.latest() if value == "latest" else Path(value)
        if path is None:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no checkpoint under {self.root}")
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"{path} is not an EchoAI checkpoint (no {STATE_FILE}); pass a step_<N> folder.")
        return path

    def save(self, accelerator: Accelerator, state: TrainingState) -> Path:
        final = self.root / f"step_{state.global_step:07d}"
        partial = self.root / f".partial-{final.name}"
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))  # every process writes its RNG state
        if state.data_state is not None:
            (partial / DATA_STATE_FILE.format(rank=accelerator.process_index)).write_text(json.dumps(state.data_state))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (partial / STATE_FILE).write_text(json.dumps({**asdict(state), "data_state": None}, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            if self.total_limit:
                for old in self.all()[: -self.total_limit]:
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    @staticmethod
    def load(accelerator: Accelerator, path: Path) -> TrainingState:
        accelerator.load_state(str(path))
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
    losses: list[float] = field(default_factory=list)  # per optimizer step, this process
    seen: list[int] = field(default_factory=list)  # dataset indices this process trained on
    stopped_by_signal: bool = False
    stopped_by_time: bool = False  # --max_train_seconds ran out before the steps did
    checkpoint: Path | None = None
    seconds: float = 0.0
    model: torch.nn.Module | None = None  # the unwrapped model, set by the scripts


class NonFiniteLossError(RuntimeError):
    pass


def train(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    dataloader: torch.utils.data.DataLoader,
    args: argparse.Namespace,
    compute_loss: Callable[[torch.nn.Module, dict, int], tuple[torch.Tensor, object]],
    on_step: Callable[[int, dict, object], None] | None = None,
    on_epoch_end: Callable[[int, TrainingState], None] | None = None,
) -> TrainResult:
    """Run the optimisation loop shared by pretraining and fine-tuning.

    `compute_loss(model, batch, global_step) -> (loss, outputs)`; `on_step(global_step, batch, outputs)`
    runs after each optimizer step (e.g. to save a reconstruction picture); `on_epoch_end(epoch, state)`
    after each epoch (e.g. to evaluate). Both prepared objects and `args.max_train_steps` must be set.

    `args.max_train_seconds` (optional) stops the loop after the step that spends it: seconds of training, counted
    in `state.train_seconds` (kept through checkpoints) without the callbacks and checkpoint saving, so models that
    evaluate differently get the same training time. Process 0's clock decides for every process. A
    `TimeBudgetSchedule` is told the seconds before each step, so its learning rate reaches 0 with the budget.

    The loader is either prepared by `accelerate` over a map-style dataset (`TrainingClips`: a resumed epoch
    skips the batches already seen) or, for a stream already split per process (`StreamingClips`), left
    unprepared: it has no length, so epochs run until the stream ends, its batches are moved to the device here,
    and a resumed epoch restores the stream's saved position (`num_workers=0` only) instead of replaying it.
    """
    checkpoints = Checkpoints(args.output_dir, args.checkpoints_total_limit)
    state = TrainingState()
    if args.resume_from_checkpoint:
        path = checkpoints.resolve(args.resume_from_checkpoint)
        state = Checkpoints.load(accelerator, path)
        logger.info(
            "Resumed from %s at step %d (epoch %d, batch %d)",
            path,
            state.global_step,
            state.epoch,
            state.batches_in_epoch,
        )
    dataset: TrainingClips | StreamingClips = dataloader.dataset
    streamed = isinstance(dataset, torch.utils.data.IterableDataset)
    if streamed and (args.resume_from_checkpoint or args.checkpointing_steps) and dataloader.num_workers:
        raise ValueError(
            "Checkpoints of a streamed corpus need --num_workers 0: DataLoader workers hold the stream's position "
            "where the main process cannot save it."
        )
    if streamed and state.batches_in_epoch and state.data_state is None:
        raise ValueError(
            f"{path} has no saved stream position (data_state_<rank>.json) for process {accelerator.process_index}: "
            "it was written by a run with --num_workers > 0 or fewer processes."
        )
    if streamed:
        epochs = itertools.count(state.epoch)  # passes over the stream until --max_train_steps
    else:
        steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
        epochs = range(state.epoch, math.ceil(args.max_train_steps / steps_per_epoch))
    checkpoint_every = int(args.checkpointing_steps) if (args.checkpointing_steps or "").isdigit() else None
    result = TrainResult(state=state)
    progress = tqdm(
        total=args.max_train_steps, initial=state.global_step, desc="Training", unit="step",
        disable=not accelerator.is_local_main_process,
    )  # fmt: skip
    consecutive_nonfinite, window_start, window_videos = 0, time.perf_counter(), 0
    max_seconds = getattr(args, "max_train_seconds", None)
    schedule = getattr(scheduler, "scheduler", scheduler)  # accelerate wraps a prepared scheduler
    resumed_seconds, paused = state.train_seconds, 0.0

    @contextlib.contextmanager
    def not_training():
        # Evaluation, pictures and checkpoints do not count as training time (nor against --max_train_seconds).
        nonlocal paused
        begin = time.perf_counter()
        try:
            yield
        finally:
            paused += time.perf_counter() - begin

    def training_seconds() -> float:
        seconds = resumed_seconds + time.perf_counter() - start - paused
        if max_seconds and accelerator.num_processes > 1:  # one clock, so every process stops at the same step
            seconds = float(broadcast(torch.tensor([seconds], device=accelerator.device), from_process=0)[0])
        return seconds

    def save_checkpoint() -> Path:
        # With workers the position lives in them: saving the main process's would silently replay the pass.
        state.data_state = dataset.state_dict() if streamed and not dataloader.num_workers else None
        with not_training():
            return checkpoints.save(accelerator, state)

    start = time.perf_counter()
    model.train()
    with StopRequest() as stop:
        for epoch in epochs:
            state.epoch = epoch
            # Through the loader: accelerate's loaders call `dataset.set_epoch(loader.iteration)` when iterated,
            # and `skip_first_batches` copies `iteration`, so the loader must carry the epoch too.
            dataloader.set_epoch(epoch) if hasattr(dataloader, "set_epoch") else dataset.set_epoch(epoch)
            loader = dataloader
            if state.batches_in_epoch and streamed:
                dataset.load_state_dict(state.data_state)
            elif state.batches_in_epoch:
                loader = accelerator.skip_first_batches(dataloader, state.batches_in_epoch)
            exhausted = False
            for batch in loader:
                batch = send_to_device(batch, accelerator.device)  # a prepared loader's already are
                state.batches_in_epoch += 1
                skipped = batch.pop("num_skipped")
                state.videos_skipped += (
                    int(accelerator.reduce(skipped.to(accelerator.device), "sum"))
                    if accelerator.num_processes > 1
                    else int(skipped)
                )
                indices = batch.pop("index")
                empty = batch["pixel_values"].numel() == 0
                with accelerator.accumulate(model):
                    loss, outputs = (None, None) if empty else compute_loss(model, batch, state.global_step)
                    nonfinite = not empty and not bool(torch.isfinite(loss.detach()))
                    # Every process must take the same branch, or the gradient all-reduce would wait forever.
                    flags = torch.tensor([empty, nonfinite, stop.requested], dtype=torch.float32)
                    if accelerator.num_processes > 1:
                        flags = accelerator.reduce(flags.to(accelerator.device), "sum").cpu()
                    any_empty, any_nonfinite, stop_now = (bool(f > 0) for f in flags)
                    update = not (any_empty or any_nonfinite)
                    if update:
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and args.max_grad_norm:
                            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                        optimizer.step()
                        if accelerator.sync_gradients:
                            state.train_seconds = training_seconds()
                            if isinstance(schedule, TimeBudgetSchedule):
                                schedule.seconds = state.train_seconds
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                if any_nonfinite:
                    consecutive_nonfinite += 1
                    state.nonfinite_skipped += 1
                    logger.warning(
                        "Non-finite loss at step %d: update skipped (%d in a row, %d in total).",
                        state.global_step, consecutive_nonfinite, state.nonfinite_skipped,
                    )  # fmt: skip
                    if consecutive_nonfinite >= args.max_consecutive_nonfinite:
                        raise NonFiniteLossError(
                            f"{consecutive_nonfinite} non-finite losses in a row, the last at step {state.global_step}. "
                            f"Last good checkpoint: {checkpoints.latest() or 'none saved'}. Lower --learning_rate, "
                            "check the data, or use --mixed_precision bf16 instead of fp16."
                        )
                if update:
                    consecutive_nonfinite = 0
                    result.seen += indices.tolist()
                    window_videos += len(indices) * accelerator.num_processes
                if update and accelerator.sync_gradients:
                    state.global_step += 1
                    result.losses.append(float(loss.detach()))
                    progress.update(1)
                    if state.global_step % args.logging_steps == 0 or state.global_step == args.max_train_steps:
                        elapsed = time.perf_counter() - window_start
                        logs = {
                            "loss": result.losses[-1],
                            "lr": scheduler.get_last_lr()[0],
                            "videos_per_s": window_videos / elapsed,
                        }
                        progress.set_postfix(
                            loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}", videos_s=f"{logs['videos_per_s']:.1f}"
                        )
                        accelerator.log(logs, step=state.global_step)
                        window_start, window_videos = time.perf_counter(), 0
                    if on_step is not None:
                        with not_training():
                            on_step(state.global_step, batch, outputs)
                    if checkpoint_every and state.global_step % checkpoint_every == 0:
                        result.checkpoint = save_checkpoint()
                if stop_now:
                    result.checkpoint = save_checkpoint()
                    result.stopped_by_signal = True
                    accelerator.print(
                        f"Stopped by signal at step {state.global_step}. Saved {result.checkpoint}; "
                        f"continue with --resume_from_checkpoint {result.checkpoint}"
                    )
                    break
                if state.global_step >= args.max_train_steps:
                    break
                if max_seconds and state.train_seconds >= max_seconds:
                    result.stopped_by_time = True
                    break
            else:
                exhausted = True
            if result.stopped_by_signal:
                break
            if streamed and exhausted and state.batches_in_epoch == 0:  # a whole pass gave nothing
                raise ValueError(
                    f"The stream gave no full batch of {args.per_device_train_batch_size} in epoch {epoch} on "
                    f"process {accelerator.process_index}: use a larger corpus or a smaller batch."
                )
            if exhausted or (not streamed and state.batches_in_epoch >= len(dataloader)):  # the epoch ran to its end
                if on_epoch_end is not None:
                    with not_training():
                        on_epoch_end(epoch, state)
                state.epoch, state.batches_in_epoch = epoch + 1, 0
                if args.checkpointing_steps == "epoch":
                    result.checkpoint = save_checkpoint()
            if state.global_step >= args.max_train_steps or result.stopped_by_time:
                break
    progress.close()
    result.seconds = time.perf_counter() - start
    if result.stopped_by_time:
        logger.info(
            "Stopped by --max_train_seconds %g after %.1f s of training, at step %d of at most %d (the step count "
            "depends on the machine and its load).", max_seconds, state.train_seconds, state.global_step,
            args.max_train_steps,
        )  # fmt: skip
    if state.videos_skipped:
        logger.warning(
            "%d unreadable videos were skipped during training (see the warnings above).", state.videos_skipped
        )
    return result


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
    steps_per_epoch = math.ceil(dataloader_len / args.gradient_accumulation_steps)
    if steps_per_epoch == 0:
        raise ValueError(
            f"The training set gives no full batch of {args.per_device_train_batch_size} per process; "
            "use more videos or a smaller --per_device_train_batch_size."
        )
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    if args.num_warmup_steps is None:
        args.num_warmup_steps = max(1, round(0.05 * args.max_train_steps))


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def predict_ef(
    model: torch.nn.Module, dataloader: torch.utils.data.DataLoader, accelerator: Accelerator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predict every video of an evaluation loader (`TrainingClips(training=False)`), gathered from all processes.

    Returns `(indices, predictions, references)` sorted by dataset index, one row per readable video:
    predictions are the model's `logits` averaged over the video's clips -- shape (N,) in the target's units
    (EF %) for regression, (N, num_labels) for classification. Unreadable videos are left out (and logged by
    the collator). Each process pads its batch back to its size before the collator dropped rows, so
    `gather_for_metrics` drops exactly the samples `accelerate` repeated to even out the last batch.
    """
    was_training = model.training
    model.eval()
    num_labels = unwrap(accelerator, model).config.num_labels
    gathered: dict[str, list[torch.Tensor]] = {"index": [], "logits": [], "labels": []}
    for batch in dataloader:
        index, labels, pixel_values = batch["index"], batch["labels"].float(), batch["pixel_values"]
        logits = torch.empty(0, num_labels, device=accelerator.device)
        if len(index):
            num_clips = pixel_values.shape[1] if pixel_values.ndim == 6 else 1  # (B, K, T, C, H, W) with K clips
            clips = pixel_values.flatten(0, 1) if pixel_values.ndim == 6 else pixel_values  # (B·K, T, C, H, W)
            logits = model(pixel_values=clips).logits.float()  # (B·K, num_labels)
            logits = logits.view(len(index), num_clips, num_labels).mean(dim=1)  # (B, num_labels)
        missing = int(batch["num_skipped"])
        rows = {
            "index": torch.cat([index, torch.full((missing,), -1, dtype=index.dtype, device=index.device)]),
            "logits": torch.cat([logits, torch.full((missing, num_labels), math.nan, device=logits.device)]),
            "labels": torch.cat([labels, torch.full((missing,), math.nan, device=labels.device)]),
        }
        rows = accelerator.gather_for_metrics({k: v.to(accelerator.device) for k, v in rows.items()})
        for key, value in rows.items():
            gathered[key].append(value.cpu())
    model.train(was_training)
    index = torch.cat(gathered["index"]).numpy()
    logits, labels = torch.cat(gathered["logits"]).numpy(), torch.cat(gathered["labels"]).numpy()
    index, first = np.unique(index, return_index=True)  # sorted; any repeat is the same video
    keep = index >= 0
    index, logits, labels = index[keep], logits[first[keep]], labels[first[keep]]
    return index, (logits[:, 0] if num_labels == 1 else logits), labels


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
    """`save_pretrained` of model (safetensors, with remote code) and processor, from the main process."""
    accelerator.wait_for_everyone()
    unwrap(accelerator, model).save_pretrained(
        output_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save,
        state_dict=model_state_dict(accelerator, model),
    )  # fmt: skip
    if accelerator.is_main_process:
        processor.save_pretrained(output_dir)
    accelerator.wait_for_everyone()


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
) -> ModelCard:
    """Fill `model_card.md` from the run: architecture, size, data, hyper-parameters and, for a fine-tuned
    model, the metrics (also written as the card's `model-index`, task regression, metrics MAE/RMSE/R²).

    `task` is "pretraining", "regression" or "classification"; `num_videos` None: a streamed corpus; `metrics` maps a split ("validation", "test") to
    {"mae": ..., "rmse": ..., "r2": ...} (or {"accuracy": ...}), with the mean predictor's figures on the same
    videos under "mean_predictor" (`metrics_echoai.check_against_mean_predictor`), shown beside the model's.
    `failure`: why the model did not learn EF (the same check), stated at the top of the card.
    """
    config = model.config
    synthetic = dataset_dir is not None and "synthetic_echonet" in str(dataset_dir)
    dataset_name = dataset_name or (
        "EchoAI synthetic echo phantom"
        if synthetic
        else "EchoNet-Dynamic"
        if dataset_dir and (Path(dataset_dir) / "FileList.csv").is_file()
        else "echo videos"
    )
    repo_id = args.hub_model_id or Path(args.output_dir).name
    eval_results, eval_rows, mean_predictor_ef = [], [], None
    names = {"mae": "MAE", "rmse": "RMSE", "r2": "R²", "accuracy": "accuracy"}
    task_type = "video-classification" if task == "classification" else "regression"
    for split, values in (metrics or {}).items():
        mean_predictor = values.get("mean_predictor") or {}
        mean_predictor_ef = mean_predictor.get("ef", mean_predictor_ef)
        for key, label in names.items():
            if values.get(key) is not None:  # None: undefined on this split
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
    card_data = ModelCardData(
        library_name="transformers",
        license="apache-2.0",
        tags=["echocardiography", "video", "masked-autoencoder", "echoai", "medical-imaging", "research-only"],
        pipeline_tag="video-classification",
        model_name=repo_id,
        eval_results=eval_results or None,
    )
    hyperparameters = {
        "preset": getattr(args, "config_name", None) or args.model_name_or_path,
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
    start = "a randomly initialised encoder" if getattr(args, "from_scratch", False) else "a pretrained encoder"
    pooling = {
        "mean": "mean-pooled tokens",
        "mean_max_min": "each token slice's mean, pooled by mean, maximum and minimum over time",
    }[config.pooling]
    procedure = {
        "pretraining": "masked-autoencoder pretraining: tube masking, norm-pix MSE on the hidden tubelets",
        "regression": f"EF regression from {start} ({pooling}, linear head)",
        "classification": f"classification from {start} ({pooling}, linear head)",
    }[task]
    period = getattr(args, "period", 4)
    return ModelCard.from_template(
        card_data,
        template_path=str(model_card_template()),
        model_name=repo_id,
        repo_id=repo_id,
        task=task,
        from_scratch=bool(getattr(args, "from_scratch", False)),
        architecture=type(model).__name__,
        num_parameters_m=f"{count_parameters(model) / 1e6:.2f}",
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_frames=config.num_frames,
        image_size=config.image_size,
        num_channels=config.num_channels,
        tubelet_size=config.tubelet_size,
        patch_size=config.patch_size,
        stem=(
            f"{len(config.stem_channels)} strided 3-D convolutions ({'/'.join(map(str, config.stem_channels))} "
            "channels) before the tubelet projection"
            if config.stem_channels
            else None
        ),
        period=period,
        mask_percent=round(100 * config.mask_ratio),
        synthetic=synthetic,
        training_data_short=dataset_name,
        training_data=(
            f"{num_videos} videos of {dataset_name}" if num_videos is not None else f"{dataset_name}, streamed"
        )
        + ("" if synthetic else f" ({dataset_dir})" if dataset_dir else ""),
        procedure=procedure,
        hyperparameters=hyperparameters,
        eval_rows=eval_rows,
        eval_protocol=eval_protocol,
        mean_predictor_ef=f"{mean_predictor_ef:.1f}" if mean_predictor_ef is not None else None,
        failure=failure,
    )


def push_to_hub(
    folder: str | os.PathLike, repo_id: str | None, token: str | None = None, api: HfApi | None = None
) -> str:
    """Create the repository if needed and upload `folder` (weights, processor, code, README.md card)."""
    if not repo_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. my-org/echoai-small-ef)")
    if not (Path(folder) / "README.md").is_file() or not (Path(folder) / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no saved model and card to upload")
    api = api or HfApi(token=token)
    url = api.create_repo(repo_id, exist_ok=True, repo_type="model")
    api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), commit_message="Upload EchoAI model",
        ignore_patterns=["checkpoints/*", "logs/*", "reconstructions/*", ".partial-*"],
    )  # fmt: skip
    return str(url)


def save_reconstruction(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    outputs,
    processor: EchoAIVideoProcessor,
    path: Path,
    num_frames_shown: int = 4,
) -> Path:
    """PNG of the first clip of a batch: original / masked input / reconstruction, a few frames each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clip = pixel_values[:1].float()
    masked, reconstruction = model.reconstruct(clip, outputs.logits[:1].float(), outputs.mask[:1].bool())
    mean = torch.tensor(processor.image_mean).view(1, -1, 1, 1)
    std = torch.tensor(processor.image_std).view(1, -1, 1, 1)
    rows = {"original": clip[0], "masked input": masked[0], "reconstruction": reconstruction[0]}
    frames = torch.linspace(0, clip.shape[1] - 1, num_frames_shown).round().long().tolist()
    figure, axes = plt.subplots(3, len(frames), figsize=(2 * len(frames), 6.3), squeeze=False)
    for r, (title, video) in enumerate(rows.items()):
        images = (video[frames].cpu() * std + mean).clamp(0, 1).mean(dim=1)  # (F, H, W) grey in [0, 1]
        if title == "masked input":
            images = torch.where(video[frames].cpu().abs().sum(1) == 0, torch.full_like(images, 0.5), images)
        for c, frame in enumerate(frames):
            axes[r][c].imshow(images[c].numpy(), cmap="gray", vmin=0, vmax=1)
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
            if r == 0:
                axes[r][c].set_title(f"frame {frame}")
        axes[r][0].set_ylabel(title)
    loss = float(outputs.loss.detach()) if getattr(outputs, "loss", None) is not None else float("nan")
    figure.suptitle(f"EchoAI masked reconstruction (batch loss {loss:.3f})")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path
