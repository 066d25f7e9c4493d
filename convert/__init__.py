"""The convert job (its command: m1/cli/convert.py). Callable: `m1.convert(source, dest, to="hf", ...)` is
`m1.convert.job.convert` (see there)."""

from m1.api import callable_module

callable_module(__name__, "m1.convert.job:convert")
