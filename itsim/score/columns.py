"""The column names every `itsim score` reader and writer shares.

A module of its own so the table and shard readers (`tables`, `shards`) and the
datasource (`read`, which re-exports them for the scoring jobs) share them without importing
each other.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

ROW_ID = "row_id"
JPG = "__jpg"  # encoded image bytes of a shard row (dropped before writing)
READ_ERROR = "__read_error"  # a reason found while reading (kept as the row's error)
# Columns the Ray job adds between its stages (preprocessed inputs, dropped before writing).
PIXELS, IDS, LENGTHS, IMAGE_KEY = "__pixels", "__ids", "__lengths", "__image_key"
# Names an input table may not use: the output's own columns and every internal one.
RESERVED = (ROW_ID, "score", "error", JPG, READ_ERROR, PIXELS, IDS, LENGTHS, IMAGE_KEY)


def tensor_column(table: pa.Table, name: str) -> np.ndarray:
    """A tensor column as one array: zero-copy (read-only) when it is one chunk, as a batch-sized block
    is; `combine_chunks` copies the whole column (69 MB for 256 rows at 299 px) even then."""
    column = table.column(name)
    return (column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()).to_numpy()
