"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`) for the installed version.

The transformers wheel does not ship its test suite; the source distribution on the package registry
does. `load()` downloads that sdist once (with pip, the same client that installed transformers), keeps
`tests/test_modeling_common.py` and `tests/test_configuration_common.py` in a cache folder as a small
package, and writes stand-ins for the three repository-only modules they import that the sdist leaves
out: the generation and export tester mixins (EchoAI cannot generate and the export tests are opted out)
and `config_common_kwargs` (the common `PreTrainedConfig` keyword arguments that `ConfigTester` sets
and reads back).

Set `ECHOAI_TRANSFORMERS_SDIST=/path/to/transformers-X.Y.Z.tar.gz` to use a file instead of downloading.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import SimpleNamespace

import transformers


PACKAGE = "transformers_common_tests"
KEPT = ("test_modeling_common.py", "test_configuration_common.py")
STUBS = {
    "__init__.py": "",
    "generation/__init__.py": "",
    "generation/test_utils.py": (
        "class GenerationTesterMixin:\n"
        '    """Stand-in: the generation tests live only in the transformers repository."""\n'
    ),
    "exporters/__init__.py": "",
    "exporters/test_export.py": (
        "class ExportTesterMixin:\n"
        '    """Stand-in: the torch.export tests live only in the transformers repository."""\n'
    ),
    "utils/__init__.py": "",
    "utils/test_configuration_utils.py": (
        "# PreTrainedConfig's common keyword arguments, each set to a non-default value.\n"
        "config_common_kwargs = {\n"
        '    "return_dict": False,\n'
        '    "output_hidden_states": True,\n'
        '    "output_attentions": True,\n'
        '    "dtype": "float16",\n'
        '    "chunk_size_feed_forward": 5,\n'
        '    "architectures": ["BertModel"],\n'
        '    "id2label": {0: "label"},\n'
        '    "label2id": {"label": "0"},\n'
        '    "problem_type": "regression",\n'
        "}\n"
    ),
}


def cache_root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "echoai"
    return Path(os.environ.get("ECHOAI_CACHE", default)) / f"transformers-{transformers.__version__}-tests"


def _sdist(workdir: Path) -> Path:
    given = os.environ.get("ECHOAI_TRANSFORMERS_SDIST")
    if given:
        return Path(given)
    command = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
        f"transformers=={transformers.__version__}", "--dest", str(workdir),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    archives = sorted(workdir.glob("transformers-*.tar.gz"))
    if result.returncode or not archives:
        raise RuntimeError(
            f"Could not download the transformers {transformers.__version__} source distribution "
            f"({result.stderr.strip()[-500:]}). Set ECHOAI_TRANSFORMERS_SDIST to a local copy."
        )
    return archives[0]


def _build(root: Path) -> None:
    """Extract the two common test files and the stand-ins into `root/PACKAGE`, atomically."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as scratch:
        scratch = Path(scratch)
        package = scratch / "tree" / PACKAGE
        package.mkdir(parents=True)
        with tarfile.open(_sdist(scratch)) as archive:
            for member in archive.getmembers():
                parts = Path(member.name).parts
                if len(parts) == 3 and parts[1] == "tests" and parts[2] in KEPT:
                    (package / parts[2]).write_bytes(archive.extractfile(member).read())
        missing = [name for name in KEPT if not (package / name).exists()]
        if missing:
            raise RuntimeError(f"The transformers sdist has no tests/{missing[0]}; cannot run the common tests.")
        for name, text in STUBS.items():
            (package / name).parent.mkdir(parents=True, exist_ok=True)
            (package / name).write_text(text)
        try:
            (scratch / "tree").rename(root)
        except OSError:  # another process finished first
            if not root.exists():
                raise
        shutil.rmtree(scratch / "tree", ignore_errors=True)


def load() -> SimpleNamespace:
    """Import and return the modules `test_modeling_common` and `test_configuration_common`."""
    root = cache_root()
    if not (root / PACKAGE / KEPT[0]).exists():
        _build(root)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return SimpleNamespace(
        modeling=importlib.import_module(f"{PACKAGE}.test_modeling_common"),
        configuration=importlib.import_module(f"{PACKAGE}.test_configuration_common"),
    )
