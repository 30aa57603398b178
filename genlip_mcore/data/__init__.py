"""Data: what reaches the model is a `Batch` (one packed THD stream per micro-batch)."""

from genlip_mcore.data.batch import IGNORE_INDEX, Batch

__all__ = ["IGNORE_INDEX", "Batch"]
