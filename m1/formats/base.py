"""What a format is: its config mapping, its name table and the rest, as one frozen record.

Format modules (release, hf, ...) build a `Format`; they see a config through `ConfigView`, the fields
`m1.config.M1Config` has, so that no format depends on the config module that dispatches to it. A format
plans its files from a `PlanInput` (what m1.planner read and chose) into a `FormatPlan`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from m1.errors import UnknownTensorError
from m1.tensors import name_pattern

if TYPE_CHECKING:
    from m1.plan import OutputFile


class ConfigView(Protocol):
    model_type: str
    head_dim: int
    rotary_dim: int
    num_hidden_layers: int
    layer_kinds: tuple[str, ...]
    postnorm: bool
    block_size: int
    full_attn_alpha: float
    full_attn_beta: float
    linear_attn_alpha: float
    linear_attn_beta: float
    mlp_alpha: float
    mlp_beta: float


@dataclass(frozen=True)
class NameTable:
    """Spec tensor names <-> a format's names, as pattern pairs with `{layer}` / `{expert}` holes."""

    pairs: tuple[tuple[str, str], ...]  # (spec pattern, format pattern)

    @cached_property
    def _to_spec(self) -> tuple[tuple[re.Pattern[str], str], ...]:
        return tuple((name_pattern(theirs), ours) for ours, theirs in self.pairs)

    @cached_property
    def _from_spec(self) -> tuple[tuple[re.Pattern[str], str], ...]:
        return tuple((name_pattern(ours), theirs) for ours, theirs in self.pairs)

    @cached_property
    def identity(self) -> bool:
        return all(ours == theirs for ours, theirs in self.pairs)

    def to_spec(self, name: str, file: str | None = None, companions: Iterable[str] = ()) -> str:
        """The spec name of a stored name; a quantization companion keeps its suffix (`<module>.<suffix>`)."""
        return self._companion_aware(name, self._to_spec, file, companions)

    def from_spec(self, name: str, companions: Iterable[str] = ()) -> str:
        return self._companion_aware(name, self._from_spec, None, companions)

    @staticmethod
    def _companion_aware(name: str, table: Iterable[tuple[re.Pattern[str], str]], file: str | None,
                         companions: Iterable[str]) -> str:
        table = tuple(table)
        try:
            return _translate(name, table, file)
        except UnknownTensorError:
            for suffix in companions:
                if name.endswith("." + suffix):
                    weight = _translate(name[: -len(suffix) - 1] + ".weight", table, file)
                    return f"{weight[: -len('.weight')]}.{suffix}"
            raise


def _translate(name: str, table: Iterable[tuple[re.Pattern[str], str]], file: str | None) -> str:
    for rx, target in table:
        m = rx.match(name)
        if m:
            return target.format(**m.groupdict())
    raise UnknownTensorError("no tensor of this format's name table", file=file, tensor=name,
                             hint="the checkpoint has a tensor m1 does not know; remove it or check the source model")


def identity_table() -> NameTable:
    from m1.tensors import M1_TENSORS

    return NameTable(tuple((r.pattern, r.pattern) for r in M1_TENSORS))


class FormatOption(str):
    """One of a format's own job options: its keyword name (the string itself, so that `name in fmt.options` reads
    the same whether a format lists plain names or these), with the flag, help and value type the CLI declares."""

    flag: str
    help: str
    type: type

    def __new__(cls, name: str, flag: str = "", help: str = "", type: type = str) -> FormatOption:
        option = super().__new__(cls, name)
        option.flag = flag or "--" + name.replace("_", "-")
        option.help = help
        option.type = type
        return option

    @property
    def name(self) -> str:
        return str(self)


@dataclass(frozen=True)
class ImatrixFile:
    """A format's importance-matrix file: `m1 verify imatrix` writes one from statistics it collects by spec weight
    name (m1.verify.imatrix.ImportanceStats); the format's quantizers read it."""

    entry: Callable[[str], str]  # spec weight name -> the file's entry for it (one entry may hold several weights)
    write: Callable[[Path, Any], int]  # (path, ImportanceStats) -> bytes written
    example: str  # a file name for examples and hints (its suffix picks the format when several have one)
    what: str  # the file's format in a phrase, for --help (after its suffix)
    used_by: str  # the quantizers that weigh by it, for --help


@dataclass(frozen=True)
class Runtime:
    """A program that runs a format's files, in which `m1 verify <command>` checks one against m1's engine."""

    command: str  # the verify command's name
    name: str  # the runtime as output lines name it
    package: str  # what provides it in Python, for --help
    example: str  # a file name for the command's example
    require: Callable[[], None]  # raises one UsageError line saying what to install, when it is missing
    # (file, token windows, the engine's logits (called once), threads) -> (engine logits, runtime logits), the
    # file and the runtime's logits checked (usage errors naming the file)
    run: Callable[[Path, Any, Callable[[], Any], int], tuple[Any, Any]]


@dataclass(frozen=True)
class PlanInput:
    """What a format plans its files from: the source, classified against the spec by m1.planner, the request,
    and the weights the policy and a recipe chose to quantize."""

    format: Format  # the output format (its name table, single file, config writer)
    cfg: Any  # the source's m1.config.M1Config
    tensors: list[Any]  # its m1.safetensors_io.TensorInfo, in spec order, a weight's companions right after it
    classified: dict[str, Any]  # tensor name -> its m1.spec.Classified (rule, layer, the weight a companion serves)
    specs: dict[str, Any]  # spec name -> its m1.spec.TensorSpec
    request: Any  # the m1.planner.JobRequest
    chosen: set[str]  # the weights to quantize
    mix: dict[str, Any]  # of those, the ones a recipe gives another Scheme than request.scheme
    source: str  # how errors name the source
    read_rows: Callable[[str, int], Iterator[tuple[int, Any]]] | None = None  # rows [start:] of a 2-D tensor
    tokenizer_dir: Path | None = None  # the local folder of the source's tokenizer.json, if it has one


@dataclass(frozen=True)
class FormatPlan:
    """What a format plans: its files of ops, the config.json it writes ({} for none), its part of the job
    record (between the source and the base model), warnings, and what its sink needs besides the tensors."""

    files: list[OutputFile]
    config: dict[str, Any] = field(default_factory=dict)
    job: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    sink_data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Format:
    name: str
    description: str
    model_types: tuple[str, ...]  # the config.json model_type values this format reads
    claims: Callable[[dict[str, Any]], bool]  # does this raw config.json belong to the format?
    read_config: Callable[[dict[str, Any], str], dict[str, Any]]  # raw -> ConfigView's format-specific fields
    # Fills a config.json (the raw config minus every format's own keys) in place, in a fixed key order.
    write_config: Callable[[ConfigView, dict[str, Any]], None]
    config_keys: tuple[str, ...]  # the keys that belong to this format (dropped when converting to another)
    names: NameTable
    # Its files, planned: m1.formats.tensor_plan.plan_by_tensor for the formats that hold the spec's tensors one
    # to one (release, hf); a format that stacks tensors or types each one brings its own.
    plan_ops: Callable[[PlanInput], FormatPlan]
    sink: str = "safetensors"
    single_file: str | None = None  # the one file every tensor goes in (e.g. "model.safetensors"); None: shards
    # The names --keep/--only may give a weight besides its spec name (spec -> the format's); None: `names`.
    # A format that stacks experts gives an expert its stacked tensor's name.
    selection_names: NameTable | None = None
    writes_config: bool = True  # a config.json and the extra files beside the weights (else its files embed their own)
    extra_file: Callable[[str], bool] = lambda name: True  # which of the source's extra files to carry
    warnings: Callable[[ConfigView], list[str]] = field(default=lambda cfg: [])
    # Its own job options (keyword names, e.g. attn_type), and what makes them the request's
    # format_options: (destination, {name: value given}) -> options; usage errors for bad values.
    # A name may be a FormatOption, whose flag, help and type the CLI adds to convert and quantize.
    options: tuple[str, ...] = ()
    make_options: Callable[[Path, dict[str, Any]], dict[str, Any]] = field(default=lambda dest, given: {})
    imatrix: ImatrixFile | None = None  # its importance-matrix file, if it has one
    runtime: Runtime | None = None  # the program that runs its files, if m1 can check them there
    examples: tuple[tuple[str, str], ...] = ()  # (command, an example command line) for that command's --help
    # A format whose checkpoints are files it reads itself: which sources are its own, and the storage
    # over one (None when the file is not there); None: read as a folder with a config.json.
    opens: Callable[[str], bool] = field(default=lambda source: False)
    open_storage: Callable[[str], Any] | None = None
    # A format of config.json folders that its own reader shows the rest of m1 (compressed-tensors: the experts
    # decoded): (a local or Hub storage, its raw config.json) -> the storage seen through that reader, or None
    # when the config is not this format's.
    view_storage: Callable[[Any, dict[str, Any]], Any] | None = None
    # A file-set format: a destination ending in this suffix names the output files' set itself
    # (`tiny.<suffix>`), written beside whatever else its folder holds, with its own manifest and progress
    # record (the index, the Hub and the manifest know it as a weight file suffix); None: a folder of shards.
    file_suffix: str | None = None
    sink_module: str | None = None  # the module whose SINK is `sink`, for a format that brings its own
    # A format that stacks each layer's experts into one tensor per weight kind: spec expert pattern -> the
    # stacked tensor's name (a measured mix's recipe keys); None: one tensor per expert.
    expert_stacks: NameTable | None = None
    mix_candidates: str = "nf4,int8"  # the default --candidates of a measured mix (--budget)
    # (why, what to do instead) when the format writes no mix of schemes: --budget and --recipe are refused
    # before anything is measured; None: it writes them.
    no_mix: tuple[str, str] | None = None
    # The tensor groups a measured mix plans (m1.verify.mix_groups: w13, w2, attn, embed, head); the others keep
    # the job's fixed types. A format option that pins a group's type (e.g. an --attn-type) takes it out of the mix.
    mix_parts: tuple[str, ...] = ("w13", "w2")
    mix_pins: dict[str, str] = field(default_factory=dict)  # group part -> the format option that pins it
    # The head's least bits per weight in a mix unless --head-candidates says otherwise: (a type's name, its bits)
    mix_head_floor: tuple[str, float] | None = None
    # A format that stores a type per tensor, so that its own runtime reads any mix: the recipe's `loader`
    # line; None: a mix of several schemes loads through m1.load_pretrained only.
    mix_reader: str | None = None
    # The model card's line on loading the folder's files of this format (`file_suffix`; none there: a line
    # for the folder's other weights); None: no line.
    card_line: Callable[[list[str]], str] | None = None

    def aliases(self, weights: Iterable[str]) -> dict[str, str]:
        """Spec weight -> the name --keep/--only may match instead (none where the format's names are the spec's)."""
        table = self.selection_names or self.names
        return {} if table.identity else {w: table.from_spec(w) for w in weights}
