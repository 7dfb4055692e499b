"""Progress that suits where it is shown: a tqdm bar on a terminal, one plain line per ``every`` % elsewhere.

Under Prefect, ``dvc repro`` logs or CI, stderr is no terminal and every tqdm refresh (a ``\\r``) becomes a log line
of its own: dozens per bar. :func:`progress` keeps the bar for people at a terminal and otherwise writes
``train: 40% 240/600 step 95s loss=0.1234`` once per ``every`` percent (and at the end).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

#: Percent between two lines when not on a terminal.
EVERY = 10


class LineProgress:
    """The subset of tqdm the stages use (iterate, ``update``, ``set_postfix``, ``close``), as occasional lines."""

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        total: int | None = None,
        initial: int = 0,
        desc: str = "",
        unit: str = "it",
        every: int = EVERY,
        file: TextIO | None = None,
        disable: bool = False,
    ) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.n = iterable, total, initial
        self.desc, self.unit, self.every, self.disable = desc, unit, max(1, every), disable
        self.file = file or sys.stderr
        self.postfix = ""
        self.start = time.perf_counter()
        self.last_time = self.start
        self.next_percent = self._next(self._percent())
        self.closed = False

    def _percent(self) -> int:
        return 100 * self.n // self.total if self.total else 0

    def _next(self, percent: int) -> int:
        return (percent // self.every + 1) * self.every

    def _line(self) -> None:
        done = f"{self._percent():3d}% {self.n}/{self.total}" if self.total else f"{self.n}"
        post = f" {self.postfix}" if self.postfix else ""
        elapsed = time.perf_counter() - self.start
        print(f"{self.desc}: {done} {self.unit} {elapsed:.0f}s{post}", file=self.file, flush=True)
        self.last_time = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.disable:
            return
        if self.total:
            if self._percent() >= self.next_percent:
                self._line()
                self.next_percent = self._next(self._percent())
        elif time.perf_counter() - self.last_time >= 60:  # no total: a line a minute
            self._line()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        # the last line, unless the 100 % line was just written
        if not self.disable and self.n and not (self.total and self.next_percent > 100):
            self._line()

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None, "LineProgress(total=...) is updated by hand, not iterated"
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    initial: int = 0,
    desc: str = "",
    unit: str = "it",
    disable: bool = False,
    every: int = EVERY,
    file: TextIO | None = None,
) -> Any:
    """A tqdm bar when ``file`` (stderr) is a terminal, else a :class:`LineProgress` (one line per ``every`` %)."""
    stream = file or sys.stderr
    if stream.isatty():
        from tqdm.auto import tqdm

        return tqdm(
            iterable, total=total, initial=initial, desc=desc, unit=unit, disable=disable, file=stream
        )
    return LineProgress(
        iterable,
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        every=every,
        file=stream,
        disable=disable,
    )
