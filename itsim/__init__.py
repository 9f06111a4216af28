"""itsim: train and run image-caption matching models at scale.

Public API (imported lazily so `import itsim` stays cheap):
    Scorer, load_model, build_shards, train, evaluate
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Scorer": "itsim.score",
    "load_model": "itsim.model",
    "build_shards": "itsim.data.shards",
    "train": "itsim.train",
    "evaluate": "itsim.evaluate",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'itsim' has no attribute {name!r}")
