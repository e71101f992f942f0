"""EchoAI's EF metrics as a local `evaluate` module: `evaluate.load("<repo>/metrics/ef_metrics")`.

`evaluate.load` on a folder imports the script named after it (this file) from a copy in its module
cache, so the script cannot reach files beside it. It re-exports `EFMetrics` from the installed
`metrics_echoai` module (`pip install -e .` in the repository), the single source of the metric;
nothing is fetched from the Hub, so it loads with HF_HUB_OFFLINE=1. Outputs, definitions and
keyword arguments (`thresholds`, `bootstrap`, `seed`, `confidence`) are documented there.
"""

from metrics_echoai import EFMetrics


__all__ = ["EFMetrics"]
