"""itsim: train and run image-caption matching models at scale.

Public API (imported lazily so `import itsim` stays cheap):
    Scorer, load_model, save_model, build_shards, train_model, evaluate_model

`train_model`/`evaluate_model` are `itsim.train.train`/`itsim.eval.evaluate.evaluate` under names that do not
collide with their modules (importing `itsim.train` rebinds the package attribute `train`).
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Scorer": "itsim.score",
    "load_model": "itsim.model",
    "save_model": "itsim.model",
    "build_shards": "itsim.data.shards",
    "train_model": ("itsim.train", "train"),
    "evaluate_model": ("itsim.eval", "evaluate"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name] if isinstance(_LAZY[name], tuple) else (_LAZY[name], name)
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'itsim' has no attribute {name!r}")
