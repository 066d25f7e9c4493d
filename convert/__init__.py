"""`m1 convert`. Callable: `m1.convert(source, dest, to="gguf", ...)` is `m1.convert.job.convert` (see there)."""

from m1.api import callable_module

callable_module(__name__, "m1.convert.job:convert")
