"""Test-wide settings: everything runs offline, as on a machine with no Hub access."""

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
