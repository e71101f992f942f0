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
