"""Reading a local dataset file (JSON, JSONL, CSV or parquet) with ``datasets``: for token lengths and for runs."""

from __future__ import annotations

from pathlib import Path

from memtune.errors import ConfigError

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
"""File suffix -> the ``datasets`` builder that reads it."""


def read_dataset(path: str | Path):
    """A ``datasets.Dataset`` of a local JSON/JSONL/CSV/parquet file.

    Raises:
        ConfigError: missing file or unknown format.
    """
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(f"dataset {path}: use a .jsonl, .json, .csv or .parquet file")
    if not path.is_file():
        raise ConfigError(f"dataset {path} does not exist")
    if path.stat().st_size == 0:
        raise ConfigError(f"dataset {path} is empty")
    import datasets

    datasets.disable_progress_bars()
    try:
        data = datasets.load_dataset(fmt, data_files=str(path), split="train")
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds for a malformed file
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"cannot read dataset {path}: {first}") from None
    if len(data) == 0:
        raise ConfigError(f"dataset {path} is empty")
    return data
