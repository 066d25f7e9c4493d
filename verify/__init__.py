"""`m1 verify`. The jobs as functions: `m1.verify.compare(REF, CAND, ...)` and `m1.verify.perplexity(SRC, ...)`
(m1.verify.jobs). The package's modules of the same names (compare: the agreement metrics) are callable as those
jobs, so `m1.verify.compare(...)` is the job whichever was imported first."""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    if name == "compare":
        return importlib.import_module("m1.verify.compare")  # callable: the job (see its last lines)
    if name == "perplexity":
        return vars(importlib.import_module("m1.verify.jobs"))["perplexity"]
    raise AttributeError(f"module 'm1.verify' has no attribute {name!r}")
