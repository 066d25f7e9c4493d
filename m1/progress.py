"""Rich progress bars for long work, on stderr so --json output on stdout stays clean."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

_console = Console(stderr=True)


@contextmanager
def byte_progress(total: int, description: str, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A bar over bytes with throughput and ETA; yields `advance(n_bytes)`."""
    if not enabled:
        yield lambda n: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=_console, transient=not sys.stderr.isatty()) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


@contextmanager
def lane_progress(total: int, description: str, lanes: list[str], enabled: bool = True
                  ) -> Iterator[Callable[[int, str | None], None]]:
    """`byte_progress` with one more row per lane (a device, say) showing its own bytes and throughput;
    yields `advance(n_bytes, lane)`."""
    if not enabled:
        yield lambda n, lane=None: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=_console, transient=not sys.stderr.isatty()) as bar:
        task = bar.add_task(description, total=total)
        rows = {lane: bar.add_task(f"  {lane}", total=None) for lane in lanes}

        def advance(n: int, lane: str | None = None) -> None:
            bar.advance(task, n)
            if lane in rows:
                bar.advance(rows[lane], n)

        yield advance


@contextmanager
def count_progress(total: int, description: str, unit: str = "", enabled: bool = True
                   ) -> Iterator[Callable[[float], None]]:
    """A bar over a count (parameters, tokens, layers) with rate and ETA; yields `advance(n)`."""
    if not enabled:
        yield lambda n: None
        return
    rate = TextColumn("{task.fields[rate]}")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(), rate,
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=_console, transient=not sys.stderr.isatty()) as bar:
        task = bar.add_task(description, total=total, rate="")

        def advance(n: float) -> None:
            bar.advance(task, n)
            speed = bar.tasks[task].speed
            if speed:
                from m1.units import human_count

                bar.update(task, rate=f"{human_count(speed)} {unit}/s")

        yield advance
