"""Every script starts as a user runs it: `python scripts/NAME.py --help` in a fresh interpreter.

In-process tests load scripts by path and would not see import problems of a real run, such as
`scripts/evaluate.py` shadowing the `evaluate` package for every script beside it.
"""

import subprocess
import sys
from pathlib import Path


SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "scripts").glob("*.py"))


def test_every_script_runs_from_the_command_line():
    assert len(SCRIPTS) >= 7
    processes = {
        script.name: subprocess.Popen(
            [sys.executable, str(script), "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for script in SCRIPTS
    }
    failures = {}
    for name, process in processes.items():
        out, err = process.communicate(timeout=300)
        if process.returncode != 0 or "usage:" not in out:
            failures[name] = err[-1500:]
    assert not failures, failures


def test_gpu_check_dry_run_prints_its_table(tmp_path_factory):
    """`bench/gpu_check.sh --dry_run`: the GPU check's every row, at tiny shapes on whatever device there is, so
    the command stays working between the runs that have a GPU."""
    from data_fixtures import tiny_corpus

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"
    corpus = tiny_corpus(tmp_path_factory)
    done = subprocess.run(["bash", str(script), "--dry_run", "--data_dir", str(corpus)], capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    for row in ("bf16 matmul peak", "pretraining step: EchoAI", "pretraining step: VideoMAE", "largest EchoAI batch",
                "pretrain.py end to end", "model-only step", "evaluate (all clips"):  # fmt: skip
        assert f"| {row}" in done.stdout, row
