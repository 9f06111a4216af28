"""Shards: the plan, manifest and CLI (build), the writer of one shard (writer), and tar reading
shared by the training loader and the scorer (tar)."""
from itsim.data.shards.build import FailureRateError, ShardConfig, add_cli, build_shards, plan_shards, run

__all__ = ["FailureRateError", "ShardConfig", "add_cli", "build_shards", "plan_shards", "run"]
