"""The compressed-tensors format: the hf layout (transformers' native `minimax` config and the spec's tensor
names) with the experts in compressed-tensors' `pack-quantized` (the schemes of m1.schemes.ct_pack), as
llm-compressor writes them and vLLM and transformers 5.x load them.

Its config.json is hf's plus compressed-tensors' quantization_config, so the files are planned like hf's (one
op per tensor); what is its own is that it stores only its schemes, and that its checkpoints (local folders or
Hub repos) are read through its storage view (m1.formats.ct_storage), which decodes the experts, so a
compressed-tensors checkpoint is a source for every command.
"""

from __future__ import annotations

from typing import Any

from m1.errors import UsageError
from m1.formats import hf
from m1.formats.base import Format, FormatPlan, PlanInput, identity_table
from m1.formats.tensor_plan import plan_by_tensor
from m1.schemes.ct_pack import FAMILY_NAME, SCHEMES

NAME = "compressed-tensors"
# Why m1 writes no mix of schemes here (a --budget or --recipe is refused with it).
NO_MIX = ("transformers 5.x's fused experts read one compressed-tensors scheme for every expert (its "
          "get_experts_scheme), so a mix of expert schemes would not load there")
NO_MIX_HINT = f"use one --scheme ({' or '.join(SCHEMES)}), or a format that stores mixes (--format hf)"
HINT = f"m1 quantize SRC DST --format {NAME} --scheme {' or '.join(SCHEMES)} (or --to hf for a dense checkpoint)"


def plan_ops(job: PlanInput) -> FormatPlan:
    scheme = job.request.scheme
    if scheme is None or scheme.family != FAMILY_NAME:
        raise UsageError(f"the {NAME} format holds {FAMILY_NAME} quantized experts: give it one of its schemes",
                         hint=HINT)
    if any(s is not None and s.name != scheme.name for s in job.mix.values()):
        raise UsageError(f"a {NAME} checkpoint holds one scheme: {NO_MIX}", hint=NO_MIX_HINT)
    return plan_by_tensor(job)


def _view_storage(storage: Any, raw: dict[str, Any]) -> Any:
    from m1.formats.ct_storage import view_storage

    return view_storage(storage, raw)


EXAMPLES = (
    ("quantize", f"m1 quantize m1-40k/ m1-w4a16/ --format {NAME} --scheme w4a16"),
    ("convert", "m1 convert m1-w4a16/ m1-bf16/ --dtype bf16"),
)

FORMAT = Format(
    name=NAME,
    description="the hf layout with compressed-tensors pack-quantized experts (llm-compressor's; vLLM, transformers)",
    model_types=(),  # its config.json is hf's: its storage view recognises its quantization_config
    claims=lambda raw: False,
    read_config=hf.read_config,
    write_config=hf.write_config,
    config_keys=(),
    names=identity_table(),
    plan_ops=plan_ops,
    extra_file=lambda name: not name.endswith(".py"),
    warnings=hf.rotary_warnings,
    view_storage=_view_storage,
    mix_candidates=",".join(SCHEMES),
    no_mix=(NO_MIX, NO_MIX_HINT),
    examples=EXAMPLES,
)
