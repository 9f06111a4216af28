"""The evaluation stage: `itsim eval` (evaluate), its pure metric functions (metrics) and PNGs (plots)."""
from itsim.eval.evaluate import EvalConfig, add_cli, evaluate, run

__all__ = ["EvalConfig", "add_cli", "evaluate", "run"]
