"""The jobs as Python functions: `m1.convert(...)`, `m1.quantize(...)`, `m1.verify.compare(...)`.

The job folders are packages named for their command (`m1.convert` holds the convert job; its command is in
m1/cli/), so the package itself is made callable: `m1.convert(src, dst, to="hf")` runs `m1.convert.job.convert`.
The job is imported on the first call, so importing the package stays light.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any


def callable_module(module: str, target: str) -> None:
    """Make module `module` callable as the function `target` ("package.module:function")."""
    where, name = target.split(":")

    class JobModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return vars(importlib.import_module(where))[name](*args, **kwargs)

    sys.modules[module].__class__ = JobModule
