"""The `m1` command: every CLI module lives in this package (`convert`, `quantize`, `verify*`, `hub`, `core`, their
shared `options`, and `registries`, what is generated from the format and scheme registries); here the app is
assembled and errors become one line + exit code. A command parses, calls its job (m1.convert, m1.quantize,
m1.verify.jobs, ...) and prints.

Exit codes everywhere: 0 sound / done, 1 findings or a problem with the input, 2 usage errors, 3 a bug in
m1 itself (please report it).
Set M1_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence

import click
import typer

from m1.errors import InternalError, M1Error

app = typer.Typer(
    name="m1",
    help="Convert, quantize, verify and publish MiniMax-M1 checkpoints.\n\n"
    "Example: m1 make-tiny tiny-m1/ && m1 convert tiny-m1/ out-hf/ --to hf",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _register() -> None:
    from m1.cli.convert import register as register_convert
    from m1.cli.core import register as register_core
    from m1.cli.hub import register as register_hub
    from m1.cli.quantize import register as register_quantize
    from m1.cli.verify import register as register_verify

    register_core(app)
    register_convert(app)
    register_quantize(app)
    verify_app = register_verify(app)
    register_hub(app, verify_app)


_register()


def _click_flavours() -> list:
    """click itself and the copy that typer (>= 0.2x) vendors as typer._click: their exceptions differ."""
    mods = [click]
    try:
        from typer import _click as vendored
    except ImportError:
        return mods
    return [*mods, vendored]


_CLICK = _click_flavours()
_CLICK_ERRORS = tuple(m.exceptions.ClickException for m in _CLICK)
_CLICK_EXITS = (click.exceptions.Exit, typer.Exit)
_ABORTS = (click.exceptions.Abort, typer.Abort)


def _say(line: str) -> None:
    """One line to stderr in one write: the ranks of a torchrun job share it, and a line written as text then
    newline can be split by another rank's line."""
    sys.stderr.flush()
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    _say(f"warning: {message}")


def _rewritten_instead(exc: Exception) -> Exception:
    """A read that failed because a writer is --overwrite-ing the source is said as that, not as damage."""
    from m1.manifest import rewritten_error, rewritten_source

    if isinstance(exc, M1Error) and exc.exit_code == 2:  # bad options: nothing to do with the source
        return exc
    folder = rewritten_source()
    return exc if folder is None else rewritten_error(folder)


def run_cli(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code (tests call this; `main` exits with it)."""
    debug = os.environ.get("M1_DEBUG") == "1"
    previous = warnings.showwarning
    warnings.showwarning = _warning_line
    from m1.manifest import forget_sources

    forget_sources()
    try:
        result = app(args=list(argv) if argv is not None else None, standalone_mode=False, prog_name="m1")
        if result == 130:  # typer turns KeyboardInterrupt into a silent exit code 130
            _say("error: interrupted; run the same command with --resume to finish")
        return result if isinstance(result, int) else 0
    except M1Error as exc:
        if debug:
            raise
        exc = _rewritten_instead(exc)
        _say(f"error: {exc.one_line()}")
        return exc.exit_code
    except _CLICK_EXITS as exc:
        return exc.exit_code
    except _ABORTS:
        _say("error: aborted")
        return 130
    except _CLICK_ERRORS as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # `m1` or `m1 verify` alone: the help, already shown
            if exc.format_message().strip():
                print(exc.format_message())
            return 2
        if debug:
            raise
        _say(f"error: {exc.format_message()} (see m1 --help)")
        return getattr(exc, "exit_code", 2) or 2
    except KeyboardInterrupt:
        _say("error: interrupted; run the same command with --resume to finish")
        return 130
    except Exception as exc:  # a bug: still one line, the traceback with M1_DEBUG=1
        if debug:
            raise
        busy = _rewritten_instead(exc)
        if busy is not exc:
            _say(f"error: {busy.one_line()}")
            return busy.exit_code
        text = str(exc).splitlines()[0] if str(exc) else ""
        _say(f"error: internal error {type(exc).__name__}: {text} (this is a bug in m1; please report it, with the "
             "traceback that M1_DEBUG=1 shows)")
        return InternalError.exit_code
    finally:
        warnings.showwarning = previous


def main() -> None:
    try:
        code = run_cli()
    except M1Error as exc:  # M1_DEBUG=1: the traceback, and still the exit code the error has
        import traceback

        traceback.print_exc()
        code = exc.exit_code
    except _CLICK_ERRORS as exc:
        import traceback

        traceback.print_exc()
        code = getattr(exc, "exit_code", 2) or 2
    except Exception:
        import traceback

        traceback.print_exc()
        code = InternalError.exit_code
    sys.exit(code)

