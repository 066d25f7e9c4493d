"""Which weights get quantized: by default exactly the experts, with `--keep` / `--only` overrides.

The experts are 95% of M1's parameters and the only weights transformers' bitsandbytes path leaves in
bf16 (they are fused 3-D parameters there); everything else keeps its source dtype (the router fp32).
A pattern is an exact tensor name or `re:REGEX` (searched, so `re:layers\\.(0|79)\\.` works); a
pattern that matches nothing is an error, never a silent no-op.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from m1.errors import UsageError
from m1.spec import Role


@dataclass(frozen=True)
class Pattern:
    text: str  # as given on the command line

    @classmethod
    def parse(cls, text: str, option: str) -> Pattern:
        if not text or text == "re:":
            raise UsageError(f"{option} needs a tensor name or re:REGEX, got {text!r}")
        if text.startswith("re:"):
            try:
                re.compile(text[3:])
            except re.error as exc:
                raise UsageError(f"{option} {text!r} is not a valid regular expression ({exc})") from None
        return cls(text)

    def matches(self, name: str) -> bool:
        if self.text.startswith("re:"):
            return re.search(self.text[3:], name) is not None
        return name == self.text


@dataclass(frozen=True)
class Policy:
    keep: tuple[Pattern, ...] = ()
    only: tuple[Pattern, ...] = ()

    @classmethod
    def from_options(cls, keep: Iterable[str] = (), only: Iterable[str] = ()) -> Policy:
        return cls(tuple(Pattern.parse(p, "--keep") for p in keep), tuple(Pattern.parse(p, "--only") for p in only))

    def describe(self) -> dict[str, list[str]]:
        return {"keep": [p.text for p in self.keep], "only": [p.text for p in self.only]}

    def select(self, tensors: Iterable[tuple[str, Role]], source: str | None = None,
               aliases: dict[str, str] | None = None) -> set[str]:
        """The names to quantize among (name, role) pairs; usage errors for patterns that match nothing.

        aliases: another name a pattern may match instead (a stacked tensor's name, for one expert)."""
        tensors = list(tensors)
        aliases = aliases or {}

        def hit(pattern: Pattern, name: str) -> bool:
            return pattern.matches(name) or (name in aliases and pattern.matches(aliases[name]))

        experts = [name for name, role in tensors if role == Role.EXPERT]
        for pattern in self.keep:
            if not any(hit(pattern, name) for name, _ in tensors):
                raise UsageError(f"--keep {pattern.text!r} matches no tensor", file=source,
                                 hint=_pattern_hint(pattern))
        for pattern in self.only:
            if not any(hit(pattern, name) for name in experts):
                raise UsageError(f"--only {pattern.text!r} matches no expert weight (only the experts, "
                                 "...experts.E.w1/w2/w3.weight, are quantized)", file=source,
                                 hint=_pattern_hint(pattern))
        chosen = {
            name for name in experts
            if (not self.only or any(hit(p, name) for p in self.only))
            and not any(hit(p, name) for p in self.keep)
        }
        if not chosen:
            raise UsageError("nothing left to quantize: --keep/--only exclude every expert weight", file=source,
                             hint="loosen the patterns, or copy the checkpoint with m1 convert instead")
        return chosen


def _pattern_hint(pattern: Pattern) -> str:
    if pattern.text.startswith("re:"):
        return r"the regex is searched in full tensor names such as model.layers.0.block_sparse_moe.experts.3.w1.weight"
    return "an exact tensor name (see m1 inspect), or re:REGEX, e.g. 're:layers\\.(0|79)\\.'"
