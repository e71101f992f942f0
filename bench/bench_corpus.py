"""Corpus throughput: preparation (videos/s, AVI and DICOM apart) and streaming reads (clips/s).

    python bench/bench_corpus.py [--num_avi 64] [--num_dicom 12] [--num_workers 1 2]

Preparation: `corpus_echoai.prepare_corpus` over
* AVI: synthetic EchoNet-layout videos (112 x 112 MJPEG, 60-200 frames) -- already in the corpus format,
  so remuxed -- and the same videos resized to 128 x 160 with an inter-frame codec (MPEG-4 part 2 in
  AVI), which are decoded, resized and re-encoded;
* DICOM: multi-frame ultrasound, 480 x 640 uncompressed (a phantom upscaled x 4 inside a canvas with
  burnt-in text), 64 frames, the size class of a scanner's cine export: read, sector-masked, cropped,
  resized, encoded.
Streaming: `load_corpus(streaming=True)` rows -> `data_echoai.row_pixel_values` (one random 16 x period-2 clip,
112^2, 3 channels, augmentation on) in one process, as one DataLoader worker would do it, against the
rate a pretraining step of the `small` preset consumes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from corpus_echoai import load_corpus, prepare_corpus
from data_echoai import row_pixel_values, synthetic_echonet_dir
from video_io_echoai import VideoReader, decode_all_frames, write_video
from video_processing_echoai import EchoAIVideoProcessor


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, markdown_table  # noqa: E402


PRETRAIN_VIDEOS_PER_S = {"fp32": 8.6, "bf16": 12.7}  # see bench/bench_data.py and docs/BENCHMARKS.md


def write_dicoms(folder: Path, videos: list[Path], num_frames: int = 64) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, UltrasoundMultiFrameImageStorage, generate_uid

    for i, video in enumerate(videos):
        with VideoReader(video) as reader:
            frames = reader.read(np.arange(min(num_frames, reader.num_frames))).frames
        canvas = np.zeros((len(frames), 480, 640), dtype=np.uint8)
        canvas[:, 16:464, 96:544] = np.kron(frames, np.ones((4, 4), dtype=np.uint8))  # (T, 448, 448)
        canvas[:, 20:40, 10:90] = 255  # burnt-in text beside the sector
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = (
            UltrasoundMultiFrameImageStorage,
            generate_uid(),
        )
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{i:04d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.StudyInstanceUID = "US", generate_uid()
        ds.Rows, ds.Columns, ds.NumberOfFrames, ds.FrameTime = 480, 640, len(canvas), "20"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = canvas.tobytes()
        ds.save_as(folder / f"{i:04d}.dcm", enforce_file_format=True)


def write_resized(folder: Path, videos: list[Path]) -> None:
    for video in videos:
        frames = decode_all_frames(video)
        resized = torch.nn.functional.interpolate(torch.from_numpy(frames)[:, None].float(), size=(128, 160))
        write_video(folder / f"{video.stem}.avi", resized[:, 0].round().byte().numpy())


def prepare_rate(folder: Path, output: Path, num_workers: int) -> tuple[float, int]:
    shutil.rmtree(output, ignore_errors=True)
    start = time.perf_counter()
    report = prepare_corpus([folder], output, salt="bench", num_workers=num_workers, progress=False)
    return report.videos_written / (time.perf_counter() - start), report.videos_written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_avi", type=int, default=64)
    parser.add_argument("--num_dicom", type=int, default=12)
    parser.add_argument("--num_workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--read_rounds", type=int, default=3, help="Passes over the streamed corpus.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(machine_info(), f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}")
    videos = sorted(
        (synthetic_echonet_dir(num_videos=max(args.num_avi, args.num_dicom), seed=0) / "Videos").glob("*.avi")
    )
    work = Path(tempfile.mkdtemp(prefix="bench_corpus_"))
    try:
        sources = {name: work / name for name in ("avi_112_mjpeg", "avi_128x160_mpeg4", "dicom_480x640")}
        for folder in sources.values():
            folder.mkdir()
        for video in videos[: args.num_avi]:
            os.symlink(video, sources["avi_112_mjpeg"] / video.name)
        write_resized(sources["avi_128x160_mpeg4"], videos[: args.num_avi])
        write_dicoms(sources["dicom_480x640"], videos[: args.num_dicom])
        rows = []
        for name, folder in sources.items():
            for workers in args.num_workers:
                rate, count = prepare_rate(folder, work / f"out_{name}", workers)
                rows.append([name, str(count), str(workers), f"{rate:.1f}"])
        print(markdown_table(["source", "videos", "workers", "videos/s"], rows))

        processor = EchoAIVideoProcessor(num_frames=16, period=2, image_size=112, num_channels=3)
        stream = load_corpus(work / "out_avi_112_mjpeg", streaming=True)
        rates = []
        for round_index in range(args.read_rounds + 1):
            generator, start, count = torch.Generator().manual_seed(round_index), time.perf_counter(), 0
            for row in stream:
                row_pixel_values(row, processor, generator, training=True)
                count += 1
            if round_index:  # the first pass warms the page cache
                rates.append(count / (time.perf_counter() - start))
        best = float(np.median(rates))
        print(f"\nstreaming read, parquet row -> normalised augmented clip, 1 process: {best:.1f} clips/s")
        print(markdown_table(
            ["pretraining step (`small`, batch 8)", "needs (videos/s)", "one reading process / need"],
            [[dtype, str(need), f"{best / need:.1f}x"] for dtype, need in PRETRAIN_VIDEOS_PER_S.items()],
        ))  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
