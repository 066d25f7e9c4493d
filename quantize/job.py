"""`m1 quantize`: `m1 convert` with a scheme. The pipeline's planner decides which weights the policy
quantizes (by default exactly the experts) and sizes every file; its executor streams one tensor at a
time through the scheme's library (bitsandbytes) into new shards, in this process or `--workers`.

Memory: a worker holds the source tensor being quantized (on a GPU also the next one, read ahead) and
one weight's quantized pieces; on CPU bitsandbytes works on a few million values at a time; kept tensors
are copied as byte ranges. Peak RSS is bounded by the largest tensor (per worker), not by the model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from m1.checkpoint import Checkpoint
from m1.config import M1Config
from m1.execute import RunOptions, execute
from m1.plan import Plan
from m1.planner import JobRequest, plan_checkpoint, plan_job
from m1.policy import Policy
from m1.safetensors_io import TensorInfo
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


def plan_quantize(cfg: M1Config, tensors: list[TensorInfo], opts: QuantizeOptions, *, source: str,
                  extra_files: list[str] | tuple[str, ...] = (), base_model: str | None = None,
                  revision: str | None = None) -> Plan:
    """The plan from a config and tensor list alone (see m1.planner.index_tensors): no data read."""
    return plan_job(cfg, tensors, opts.request(), source=source, extra_files=extra_files, base_model=base_model,
                    revision=revision)


def plan_from_checkpoint(ckpt: Checkpoint, opts: QuantizeOptions) -> Plan:
    return plan_checkpoint(ckpt, opts.request())


def run_quantize(ckpt: Checkpoint, dest: Path, opts: QuantizeOptions, *, device: str = "auto", workers: int = 1,
                 threads: int | None = None, resume: bool = False, overwrite: bool = False,
                 show_progress: bool = True, plan: Plan | None = None, scratch: int | None = None,
                 inputs: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Quantize `ckpt` into `dest`; returns what was written and how fast (per device too).

    `device` is a --device value (m1.devices: a set or `cuda` gives each worker its own GPU); `scratch`
    streams a Hub source through at most that many bytes of disk (m1.scratch); `inputs`: the other files
    the job reads (an imatrix, a recipe), which it must not write over."""
    from m1.devices import resolve_device

    dev = resolve_device(device)
    check = getattr(opts.scheme, "check_supported", None)
    if check is not None:
        check(dev)
    plan = plan or plan_from_checkpoint(ckpt, opts)
    spec = device if "," in device else str(dev)  # a set of devices goes to the executor as it is
    run = execute(plan, dest, ckpt, RunOptions(resume=resume, overwrite=overwrite, workers=workers, threads=threads,
                                               device=spec, show_progress=show_progress, label="quantize",
                                               scratch=scratch, inputs=inputs))
    params_done = sum(f.params for f in plan.files if f.name in run.written)
    shards = run.manifest["shards"]
    return {
        "dest": str(dest),
        "scheme": plan.scheme.name,
        "device": spec,
        "workers": run.workers,
        "threads": run.threads,
        "shards": shards,
        "bytes": sum(s["size"] for s in shards.values()),
        "params": params_done,
        "seconds": round(run.seconds, 3),
        "params_per_s": round(params_done / run.seconds) if run.seconds > 0 else None,
        "timing": {k: round(v, 3) for k, v in asdict(run.timing).items()},
        "devices": run.devices,
        "writer_devices": run.writer_devices,
        "rank": run.rank,
        "world": run.world,
        **({"scratch": run.scratch} if run.scratch is not None else {}),
        **plan.totals(),
    }
