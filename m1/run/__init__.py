"""The executor: runs a plan into its destination, for every job that writes (m1.run.lifecycle)."""

from m1.run.lifecycle import RunOptions, RunResult, execute

__all__ = ["RunOptions", "RunResult", "execute"]
