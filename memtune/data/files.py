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
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a malformed file is reported below, in one line
    try:
        data = datasets.load_dataset(fmt, data_files=str(path), split="train")
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds for a malformed file
        cause = e.__cause__ or e.__context__
        detail = f"{e} ({cause})" if cause is not None and str(cause) not in str(e) else str(e)
        first = (" ".join(detail.split()) or type(e).__name__)[:300]
        raise ConfigError(f"cannot read dataset {path} as {fmt}: {first}") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
    if len(data) == 0:
        raise ConfigError(f"dataset {path} is empty")
    return data
