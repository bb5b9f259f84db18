"""Where the shipped profiles (models, GPUs, calibration) live, and memtune's cache."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path


def profiles_dir() -> Path:
    """``$MEMTUNE_PROFILES`` if set, else the ``profiles/`` folder next to the package."""
    env = os.environ.get("MEMTUNE_PROFILES")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "profiles"


def cache_root() -> Path:
    """memtune's cache folder: ``$MEMTUNE_CACHE``, default ``~/.cache/memtune`` (traces, model specs, measurements)."""
    return Path(os.environ.get("MEMTUNE_CACHE", Path.home() / ".cache" / "memtune"))


def write_cached(path: Path, data) -> None:
    """Store ``data`` as JSON at ``path`` in the cache, whole or not at all (a temporary file of this process, then
    renamed); a cache that cannot be written costs the next run the work, nothing else."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)
    except OSError:
        pass


@functools.lru_cache(maxsize=16)
def calibrations(gpu_name: str) -> tuple[tuple[str, dict], ...]:
    """``(file name, contents)`` of every ``profiles/calibration/*.json``, the given GPU's own file first (another
    GPU's measurements are the fallback: the estimator's errors come from the software stack more than the card)."""
    files = sorted((profiles_dir() / "calibration").glob("*.json"), key=lambda p: (p.stem != gpu_name, p.name))
    return tuple((path.name, json.loads(path.read_text())) for path in files)
