"""Where the shipped profiles (models, GPUs, calibration) live."""

from __future__ import annotations

import os
from pathlib import Path


def profiles_dir() -> Path:
    """``$MEMTUNE_PROFILES`` if set, else the ``profiles/`` folder next to the package."""
    env = os.environ.get("MEMTUNE_PROFILES")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "profiles"
