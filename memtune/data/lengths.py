"""Token-length distributions of a dataset, and the batch shapes padding and packing make of them.

Padding follows llama-cookbook's ``LengthBasedBatchSampler``: samples sorted by length and cut into batches of
``batch_size``, each padded to its longest sample, so the longest batch sets the activation peak. Packing
concatenates all tokens and cuts them into ``context_length`` chunks: every batch is full.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from memtune.data.files import read_dataset
from memtune.errors import ConfigError


@dataclass(frozen=True, kw_only=True, slots=True)
class LengthStats:
    lengths: tuple[int, ...]
    """Tokens per sample, sorted."""
    source: str

    @property
    def count(self) -> int:
        return len(self.lengths)

    @property
    def total_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def max(self) -> int:
        return self.lengths[-1]

    def quantile(self, q: float) -> int:
        return self.lengths[min(self.count - 1, int(q * self.count))]

    def padded(self, batch_size: int) -> tuple[int, float]:
        """(longest padded sequence, share of real tokens among padded ones) for length-grouped batches."""
        return self.max, self.total_tokens / self._padded_tokens(batch_size)

    def mean_padded(self, batch_size: int) -> float:
        """The average padded sequence of length-grouped batches: what an average step computes."""
        return self._padded_tokens(batch_size) / self.count

    def _padded_tokens(self, batch_size: int) -> int:
        return sum(max(self.lengths[i:i + batch_size]) * len(self.lengths[i:i + batch_size])
                   for i in range(0, self.count, batch_size))

    def packed_steps(self, context_length: int, batch_size: int) -> int:
        """Micro-batches of ``batch_size`` full ``context_length`` chunks in one epoch."""
        return math.ceil(self.total_tokens / context_length / batch_size)

    def to_json(self) -> dict:
        return {"source": self.source, "samples": self.count, "tokens": self.total_tokens, "p50": self.quantile(0.5),
                "p90": self.quantile(0.9), "p99": self.quantile(0.99), "max": self.max}


def load_lengths(path: str | Path, *, text_field: str = "text", length_field: str | None = None,
                 tokenizer: str | None = None, extra_tokens: int = 0) -> LengthStats:
    """Token lengths of a local JSON/JSONL/CSV/parquet dataset (loaded with ``datasets``).

    Args:
        length_field: a column that already holds token counts (then no tokenizer is needed).
        tokenizer: a local tokenizer folder for ``text_field`` (``AutoTokenizer``; nothing is downloaded).
        extra_tokens: tokens every sample gains from a prompt template (214 for the Llama Guard 3 prompt).

    Raises:
        ConfigError: missing file, unknown format or field, no way to count tokens, counts that are not whole
            non-negative numbers (or all zero), or a negative ``extra_tokens``.
    """
    data = read_dataset(path)
    if length_field is not None:
        if length_field not in data.column_names:
            raise ConfigError(f"dataset {path} has no column {length_field!r}; columns: {', '.join(data.column_names)}")
        counts = []
        for n in data[length_field]:
            if isinstance(n, bool) or not isinstance(n, int | float) or n != n or int(n) != n:
                raise ConfigError(f"column {length_field!r} of {path} must hold whole token counts; found {n!r}")
            counts.append(int(n))
    else:
        if tokenizer is None:
            raise ConfigError("counting tokens needs --tokenizer PATH (a local tokenizer folder) or --length-field")
        if text_field not in data.column_names:
            raise ConfigError(f"dataset {path} has no column {text_field!r}; columns: {', '.join(data.column_names)}")
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
        except (OSError, ValueError) as e:
            first = " ".join(str(e).split())[:300]
            raise ConfigError(f"cannot load the tokenizer {tokenizer} (a local tokenizer folder): {first}") from None
        texts = list(data[text_field])
        wrong = next((t for t in texts if not isinstance(t, str)), None)
        if wrong is not None:
            raise ConfigError(f"column {text_field!r} of {path} must hold text to tokenize; found {wrong!r} "
                              f"(--text-field names the text column, --length-field a column of token counts)")
        counts = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    if not counts:
        raise ConfigError(f"dataset {path} is empty")
    if extra_tokens < 0:
        raise ConfigError(f"the prompt template's tokens must be 0 or more, not {extra_tokens}")
    if min(counts) < 0 or max(counts) == 0:
        raise ConfigError(f"the token lengths in {path} must be positive (found {min(counts)} .. {max(counts)})")
    return LengthStats(lengths=tuple(sorted(n + extra_tokens for n in counts)), source=str(path))
