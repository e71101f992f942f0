"""Run code as a Hub user without EchoAI would: in a fresh, offline Python where none of EchoAI's modules can be
imported (the editable install included), so a saved folder loads only through its remote code."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path


ECHOAI_MODULES = (
    "configuration_echoai", "modeling_echoai", "video_processing_echoai", "video_io_echoai", "inference_echoai",
    "pipeline_echoai", "baselines_echoai", "data_echoai", "corpus_echoai", "synthetic_echonet", "training_echoai",
    "metrics_echoai", "perf_echoai",
)  # fmt: skip

HIDE_ECHOAI = f"""
import importlib, importlib.abc, sys

class HideEchoAI(importlib.abc.MetaPathFinder):
    # Stand in for a machine where EchoAI is not installed.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ECHOAI_MODULES!r}:
            raise ModuleNotFoundError(name)

sys.meta_path.insert(0, HideEchoAI())
for name in {ECHOAI_MODULES!r}:
    try:
        importlib.import_module(name)
        raise SystemExit(name + " is still importable")
    except ModuleNotFoundError:
        pass
"""


def run_without_echoai(script: str, workdir: Path) -> str:
    """Run `script` in a child Python where EchoAI cannot be imported, in `workdir` (which also holds the child's
    transformers module cache); the test fails with the child's error unless it exits 0. Returns its stdout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(workdir / "modules"), "PYTHONPATH": ""}
    code = HIDE_ECHOAI + textwrap.dedent(script)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=workdir, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
