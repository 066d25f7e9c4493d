"""A measured mix's groups on this checkpoint: which parts a format plans, each group's candidates (its runtime's
rules) and their sizes in bytes, from the schemes' `pieces()` over the tensors' headers (m1.quantize.budget)."""

from __future__ import annotations

import math
from typing import Any

from m1.errors import UsageError
from m1.quantize.recipe import stacks_experts


def group_sizes(ckpt: Any, groups: list[Any], candidates: dict[str, Any], fmt: str,
                accepts: dict[str, list[str]] | None = None) -> dict[str, dict[str, int]]:
    """sizes[group][candidate] in bytes, from the schemes' pieces() over the tensors' headers; `accepts`: group
    key -> the candidates it may take (default: all)."""
    import math

    from m1.dtypes import DTYPE_BYTES

    cfg = ckpt.config
    stacked = stacks_experts(fmt)
    out: dict[str, dict[str, int]] = {}
    for g in groups:
        infos = [ckpt.info(n) for n in g.weight_names(cfg)]
        row: dict[str, int] = {}
        for c in (accepts[g.key] if accepts is not None else candidates):
            scheme = candidates[c]
            if stacked and g.experts:  # the stacked tensors [experts, rows, cols], one per weight kind of the group
                size = 0
                for kind in range(len(infos) // cfg.num_local_experts):
                    first = infos[kind]
                    shape = (cfg.num_local_experts, *first.shape)
                    size += (math.prod(shape) * DTYPE_BYTES[first.dtype] if scheme is None else
                             sum(p.nbytes for p in scheme.pieces(first.dtype, shape)))
            else:
                size = sum(t.nbytes if scheme is None else sum(p.nbytes for p in scheme.pieces(t.dtype, tuple(t.shape)))
                           for t in infos)
            row[c] = size
        out[g.key] = row
    return out


def group_candidates(ckpt: Any, groups: list[Any], cands: dict[str, Any], fmt: str,
                     head_cands: dict[str, Any] | None = None) -> tuple[dict[str, list[str]], list[str]]:
    """group key -> the candidates its runtime accepts, and a line for each kind of group that lost some.

    The experts take every candidate (a scheme that refuses them is an error, as in a uniform job). A group
    outside the experts takes those whose scheme accepts each of its weights (`check_weight`: the dtype, rows
    that split into the type's blocks, an imatrix entry where the scheme uses one), and the head, unless
    `head_cands` (--head-candidates) names its own, only those of at least the format's `mix_head_floor`."""
    from m1.formats import get_format

    floor = get_format(fmt).mix_head_floor
    cfg = ckpt.config
    out: dict[str, list[str]] = {}
    dropped: dict[str, dict[str, str]] = {}  # part -> candidate -> why
    for g in groups:
        if g.experts:
            out[g.key] = list(cands)
            continue
        own = head_cands if g.part == "head" and head_cands is not None else cands
        infos = [ckpt.info(n) for n in g.weight_names(cfg)]
        ok = []
        for c, scheme in own.items():
            why = None if scheme is None else _refusal(scheme, infos)
            if why is None and scheme is not None and g.part == "head" and head_cands is None and floor is not None:
                bits = 8 * sum(sum(p.nbytes for p in scheme.pieces(t.dtype, tuple(t.shape))) for t in infos) / sum(
                    math.prod(t.shape) for t in infos)
                if bits < floor[1] - 1e-9:
                    why = f"{bits:.2f} bits per weight, below {floor[0]} (add --head-candidates to allow it)"
            if why is None:
                ok.append(c)
            else:
                dropped.setdefault(g.part, {}).setdefault(c, why)
        out[g.key] = ok
    notes = [f"{part}: not " + "; not ".join(f"{c} ({why})" for c, why in whys.items())
             for part, whys in dropped.items()]
    return out, notes


def _refusal(scheme: Any, infos: list[Any]) -> str | None:
    """Why `scheme` cannot store one of these weights (its own check's message), or None."""
    for t in infos:
        try:
            scheme.check_weight(t.name, t.dtype, tuple(t.shape), t.file)
        except UsageError as exc:
            return exc.message
    return None


def mix_parts(fmt: str, format_options: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The group parts a mix of format `fmt` plans (`Format.mix_parts`), less those a format option pins (e.g. an
    --attn-type), and a line per pinned part."""
    from m1.formats import get_format

    form = get_format(fmt)
    parts, notes = [], []
    for p in form.mix_parts:
        option = form.mix_pins.get(p)
        if option is not None and format_options.get(option) is not None:
            notes.append(f"{p}: pinned at {format_options[option]} by --{option.replace('_', '-')}, not in the mix")
        else:
            parts.append(p)
    return parts, notes
