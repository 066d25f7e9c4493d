"""The quantize job's typed options and the plan they make of a checkpoint (the job, the budget and a recipe's
replay all plan through here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from m1.checkpoint import Checkpoint
from m1.plan import Plan
from m1.planner import JobRequest, plan_checkpoint
from m1.policy import Policy
from m1.schemes import Scheme


@dataclass(frozen=True)
class QuantizeOptions:
    scheme: Scheme
    policy: Policy = field(default_factory=Policy)
    by_layer: bool = False
    shard_size: int = 5 * 10**9
    to: str | None = None  # the output format; None keeps the source's
    format_options: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)  # a mix (m1.quantize.budget): weight -> scheme or keep

    def request(self) -> JobRequest:
        return JobRequest("quantize", self.to, by_layer=self.by_layer, shard_size=self.shard_size,
                          scheme=self.scheme, policy=self.policy, format_options=self.format_options,
                          recipe=self.recipe)


def plan_from_checkpoint(ckpt: Checkpoint, opts: QuantizeOptions) -> Plan:
    return plan_checkpoint(ckpt, opts.request())
