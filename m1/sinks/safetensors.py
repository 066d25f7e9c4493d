"""The safetensors sink: shards written by `m1.safetensors_io` (header first when every size is known,
hashed as the bytes pass), then `model.safetensors.index.json` from the written headers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from m1 import safetensors_io
from m1.atomic_io import PendingShard, Produced, json_text, write_json_atomic
from m1.plan import OutputFile, Plan
from m1.safetensors_io import header_bytes, read_header

INDEX = "model.safetensors.index.json"


class SafetensorsSink:
    name = "safetensors"

    first_last = False

    def write_file(self, path: Path, file: OutputFile, produce: Callable[[str], Produced],
                   on_bytes: Callable[[int], None] | None = None, plan: Plan | None = None
                   ) -> tuple[str, int, PendingShard]:
        planned = [(t.name, t.dtype, t.shape, t.nbytes, t.exact) for t in file.tensors]
        return safetensors_io.write_shard_unsynced(path, planned, produce, on_bytes=on_bytes)

    def finish(self, dest: Path, plan: Plan) -> list[str]:
        # Sizes of inexact tensors are only known now: the index takes them from the written headers.
        weight_map: dict[str, str] = {}
        total = 0
        for file in plan.files:
            for t in read_header(dest / file.name).tensors.values():
                weight_map[t.name] = file.name
                total += t.nbytes
        write_json_atomic(dest / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        return [INDEX]


    def file_bytes(self, plan: Plan, file: OutputFile) -> int:
        planned = [(t.name, t.dtype, t.shape, t.nbytes, t.exact) for t in file.tensors]
        return header_bytes(planned) + file.nbytes  # inexact sizes are upper bounds

    def finish_bytes(self, plan: Plan) -> dict[str, int]:
        weight_map = {t.name: file.name for file in plan.files for t in file.tensors}
        bound = {"metadata": {"total_size": plan.total_bytes}, "weight_map": weight_map}  # as many digits or more
        return {INDEX: len(json_text(bound).encode())}

    def check(self, plan: Plan) -> None:
        pass


SINK = SafetensorsSink()
