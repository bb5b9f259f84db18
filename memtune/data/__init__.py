"""Training data as memtune sees it: the token lengths that decide padded and packed batch shapes."""

from memtune.data.lengths import LengthStats, load_lengths

__all__ = ["LengthStats", "load_lengths"]
