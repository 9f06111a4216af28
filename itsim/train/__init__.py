"""The training stage: `itsim train` / `accelerate launch -m itsim.train`.

config (TrainConfig, lr schedule) -> loop (the Accelerate loop) with runtime (process set-up, signals,
cross-rank helpers), objective (one step's loss), augment, validate and checkpoint.
"""
from itsim.train.config import TrainConfig, lr_at
from itsim.train.loop import add_cli, run, train
from itsim.train.runtime import check_finished

__all__ = ["TrainConfig", "add_cli", "check_finished", "lr_at", "run", "train"]
