"""Data-loading throughput: EchoAI's partial decoding against decode-everything-then-sample.

    python bench/bench_data.py [--num_videos 64] [--rounds 5] [--batch_size 8]

Measures clips/s of the whole training path, file -> normalised `pixel_values` (T, C, H, W), for
16-frame period-2 clips drawn at random from 100-200-frame synthetic EchoNet videos:

* partial: `EchoAIVideoProcessor` -- seek, decode only the 31 frames the clip spans, stop;
* full:    what EchoNet-Dynamic's loader does -- decode every frame of the video, then sample the
           clip (here with the same decoder, `clip_frame_indices` and `frames_to_pixel_values`, so
           only the decoding strategy differs).

Both run through a `torch.utils.data.DataLoader` with 0 and with 2 worker processes. The contenders
alternate epoch by epoch in one process (the machine is shared, so absolute numbers drift); the
table reports medians and the ratio partial / full. It then compares the partial path with the
input rate a pretraining step of the `small` preset consumes (measured for transformers' VideoMAE
at the same size on the development machine; see docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data_echoai import load_echonet_dynamic, synthetic_echonet_dir
from video_io_echoai import decode_all_frames  # every frame, as EchoNet's `loadvideo` reads them
from video_processing_echoai import EchoAIVideoProcessor, clip_frame_indices


# Input rate a pretraining step consumes: EchoAI's `small` preset (ViT-S, 384 wide, 12 layers) at 16 x 112^2,
# batch 8, on the 2-core development machine (docs/BENCHMARKS.md, bench_pretrain.py).
PRETRAIN_VIDEOS_PER_S = {"fp32": 14.5, "bf16": 37.3}


class ClipDataset(Dataset):
    """One random training clip per video, by partial decoding or by decoding everything first."""

    def __init__(self, paths: list[str], processor: EchoAIVideoProcessor, partial: bool):
        self.paths, self.processor, self.partial = paths, processor, partial

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.partial:
            return self.processor(self.paths[i], clip_sampling="random")["pixel_values"][0]
        frames = decode_all_frames(self.paths[i])
        indices = clip_frame_indices(len(frames), self.processor.num_frames, self.processor.period, "random")
        return self.processor.frames_to_pixel_values(frames[indices])[0]


def clips_per_second(loader: DataLoader) -> float:
    start, count = time.perf_counter(), 0
    for batch in loader:
        count += len(batch)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_videos", type=int, default=64, help="Videos per epoch (100-200 frames each).")
    parser.add_argument("--rounds", type=int, default=5, help="Alternating epochs per contender.")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of the main process (DataLoader workers always use 1)."
    )
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    # One intra-op thread, as in a DataLoader worker, so "0 workers" measures the same per-clip work in
    # one process; several threads on small per-clip tensors mostly wait on each other on a busy machine.
    torch.set_num_threads(args.threads)

    # Enough synthetic videos that `num_videos` of them have 100-200 frames.
    corpus = synthetic_echonet_dir(num_videos=max(2 * args.num_videos, 100), seed=args.seed)
    rows = load_echonet_dynamic(corpus, check_videos=False)["train"]
    paths = [r["video_path"] for r in rows if 100 <= r["NumberOfFrames"] <= 200][: args.num_videos]
    frames = [r["NumberOfFrames"] for r in rows if r["video_path"] in set(paths)]
    processor = EchoAIVideoProcessor(num_frames=16, period=2, image_size=112, num_channels=3)
    print(f"{len(paths)} videos, {min(frames)}-{max(frames)} frames (mean {np.mean(frames):.0f}); "
          f"clips of {processor.num_frames} x period {processor.period}; {os.cpu_count()} CPU cores, "
          f"main-process torch threads {torch.get_num_threads()}")  # fmt: skip

    results = {}
    for workers in (0, 2):
        loaders = {
            name: DataLoader(
                ClipDataset(paths, processor, partial=name == "partial"),
                batch_size=args.batch_size,
                num_workers=workers,
                persistent_workers=workers > 0,
            )
            for name in ("partial", "full")
        }
        for loader in loaders.values():  # warm-up epoch: worker start, page cache
            clips_per_second(loader)
        rates = {name: [] for name in loaders}
        for _ in range(args.rounds):
            for name, loader in loaders.items():  # alternate A, B, A, B, ...
                rates[name].append(clips_per_second(loader))
        results[workers] = {name: statistics.median(r) for name, r in rates.items()}

    print("\n| DataLoader workers | partial decode (clips/s) | decode all, then sample (clips/s) | ratio |")
    print("|---:|---:|---:|---:|")
    for workers, r in results.items():
        print(f"| {workers} | {r['partial']:.1f} | {r['full']:.1f} | {r['partial'] / r['full']:.2f}x |")
    best = results[2]["partial"]
    print("\n| pretraining step (`small`, batch 8) | needs (videos/s) | partial decode, 2 workers / need |")
    print("|---|---:|---:|")
    for dtype, need in PRETRAIN_VIDEOS_PER_S.items():
        print(f"| {dtype} | {need} | {best / need:.1f}x |")


if __name__ == "__main__":
    main()
