"""`m1 quantize` (registered by quantize.quantize_cli once the quantize job exists)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    try:
        from quantize.quantize_cli import quantize_cmd
    except ModuleNotFoundError as exc:
        if exc.name != "quantize.quantize_cli":
            raise
        return
    app.command("quantize")(quantize_cmd)
