"""Progress bars on stderr: a rich bar on a terminal, a start and a done line when the output is piped."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from .config import format_bytes


def progress_bar(enabled: bool, what: str, total: int) -> AbstractContextManager[Callable[[int], None]]:
    """A bar for loading ``total`` bytes of ``what``; yields the function that advances it by a number of bytes."""

    @contextmanager
    def bar():
        console = Console(stderr=True)
        if enabled and not console.is_terminal:  # piped: a line when it starts and one when it is done
            yield from start_and_done_lines(console, f"loading {what}", format_bytes(total))
            return
        with Progress(
            TextColumn(f"[bold]loading {what}"), BarColumn(), DownloadColumn(binary_units=True), TimeRemainingColumn(),
            console=console, transient=True, disable=not (enabled and console.is_terminal),
        ) as p:
            task = p.add_task(what, total=total)
            yield lambda n: p.advance(task, n)

    return bar()


def start_and_done_lines(console: Console, label: str, size: str) -> Iterator[Callable[..., None]]:
    """What a progress bar shows, as two lines for a log (output that is not a terminal): the start, with
    ``size``, and the end, with the time taken. A generator for a contextmanager; yields a no-op advance."""
    console.print(f"{label} ({size})...", highlight=False, markup=False)
    start = time.perf_counter()
    yield lambda *n: None
    console.print(f"{label}: done in {time.perf_counter() - start:.1f} s", highlight=False, markup=False)
