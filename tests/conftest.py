"""Test-wide settings: everything runs offline, as on a machine with no Hub access, and every test starts at
torch's default thread count."""

import os

import pytest
import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

DEFAULT_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """Scripts called in-process with `--num_threads` (in a test or in a module-scoped fixture) set the process's
    thread count. Left behind, it changes later tests' numerics: a run compared bit for bit with a subprocess,
    which starts at torch's default, would then differ by summation order alone."""
    yield
    torch.set_num_threads(DEFAULT_THREADS)
