"""Shared helpers for the data-pipeline tests: a tiny synthetic corpus and ways to damage copies of it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from data_echoai import synthetic_echonet_dir


TINY_NUM_VIDEOS = 8
TINY_SEED = 3


def tiny_corpus(tmp_path_factory, num_videos: int = TINY_NUM_VIDEOS) -> Path:
    """The session's tiny corpus; generated once, shared by every test module through the cache. Metrics
    that need two videos per evaluation split (R², SD) need `num_videos` >= 12 (2 validation, 2 test)."""
    cache = tmp_path_factory.getbasetemp() / "echoai_cache"
    return synthetic_echonet_dir(num_videos=num_videos, seed=TINY_SEED, cache_dir=cache, num_workers=2)


def copy_corpus(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


def truncate(path: Path, fraction: float = 0.4) -> None:
    """Cut a file to `fraction` of its bytes, as an interrupted copy would."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def file_list(corpus: Path) -> pd.DataFrame:
    return pd.read_csv(corpus / "FileList.csv")
