"""`m1 quantize`."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    from m1.quantize.quantize_cli import quantize_cmd

    app.command("quantize")(quantize_cmd)
