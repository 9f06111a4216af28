"""The scoring stage: `Scorer` for a few pairs in-process, `itsim score` (a Ray Data job) for large sets.

scorer (load a model, prepare rows, score) <- ray_job (read -> actors -> Parquet) with topk, read
(inputs: tables, shards), resources (actor sizes, model shipping), config, columns.
"""
from typing import Any

from itsim.score.config import ScoreConfig
from itsim.score.scorer import Prepared, Scorer, prepare_captions, prepare_images, prepare_rows

__all__ = ["Prepared", "ScoreConfig", "Scorer", "prepare_captions", "prepare_images", "prepare_rows", "run"]


def run(cfg: ScoreConfig) -> dict[str, Any]:
    """`itsim score`: the Ray Data job (see ray_job.py). Imported on use: Ray Data takes about 1.5 s to
    import, which `from itsim import Scorer` users do not need to pay."""
    from itsim.score.ray_job import run_score

    return run_score(cfg)
