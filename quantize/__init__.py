"""`m1 quantize`. Callable: `m1.quantize(source, dest, scheme="nf4", ...)` is `m1.quantize.job.quantize`."""

from m1.api import callable_module

callable_module(__name__, "m1.quantize.job:quantize")
