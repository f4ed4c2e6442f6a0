"""Progress bars on stderr: a rich bar on a terminal, a start and a done line when the output is piped.

``progress_bar`` is the one bar: loads count bytes, the CLI's recording and replays count items, ``verify``'s
hashing counts bytes of an unknown total.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .config import format_bytes

UNITS = ("bytes", "items")


@contextmanager
def progress_bar(enabled: bool, label: str, total: int | None, *, unit: str = "bytes") -> Iterator[Callable[..., None]]:
    """A bar for ``label`` (``"loading dense weights"``, ``"replaying"``) on stderr, of ``total`` bytes or, with
    ``unit="items"``, things; ``total=None``: not known in advance. Yields the function that advances it
    (``advance(n=1)``). Piped, a line when it starts and one when it is done; ``enabled=False``, nothing."""
    if unit not in UNITS:
        raise ValueError(f"unit={unit!r}: use one of {', '.join(UNITS)}")
    console = Console(stderr=True)
    if enabled and not console.is_terminal:
        size = None if total is None else format_bytes(total) if unit == "bytes" else f"{total} to go"
        yield from start_and_done_lines(console, label, size)
        return
    columns = ((DownloadColumn(binary_units=True), TimeRemainingColumn()) if unit == "bytes"
               else (MofNCompleteColumn(), TimeElapsedColumn()))
    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), *columns, console=console, transient=True,
                  disable=not enabled) as p:
        task = p.add_task(label, total=total)
        yield lambda n=1: p.advance(task, n)


def start_and_done_lines(console: Console, label: str, size: str | None) -> Iterator[Callable[..., None]]:
    """What a progress bar shows, as two lines for a log (output that is not a terminal): the start, with
    ``size`` where it is known, once the work starts (the first advance), and the end, with the time taken.
    A block that fails before its first advance prints neither, so an error stays the only line. A generator
    for a contextmanager; yields the advance."""
    start = time.perf_counter()
    started = False

    def advance(*n) -> None:
        nonlocal started
        if not started:
            started = True
            console.print(f"{label} ({size})..." if size is not None else f"{label}...", highlight=False, markup=False)

    yield advance
    advance()
    console.print(f"{label}: done in {time.perf_counter() - start:.1f} s", highlight=False, markup=False)
