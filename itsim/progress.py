"""Progress of long loops: a tqdm bar on a terminal, plain `logging` lines anywhere else.

Why: tqdm redraws its bar with a carriage return several times a second. In a log file (SLURM, Ray
jobs, nohup, CI) every redraw stays, so a 25-minute run leaves megabytes of bar fragments and no line
a person can read. So a bar is drawn only when stderr (where tqdm draws) is a terminal; otherwise a
`LogProgress` writes one log line every `every` updates or every `seconds`, whichever comes first,
and a last one when the loop ends. Every stage that shows progress gets it from `progress()` or
`track()` here, so they all behave alike.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any, Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")

DEFAULT_SECONDS = 30.0


def interactive() -> bool:
    """True when a bar can be drawn: stderr is a terminal (not a file, a pipe or /dev/null)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"


class LogProgress:
    """tqdm's `update` / `set_postfix` / `close` as log lines, for output that is not a terminal.

    A line is written every `every` updates (0 = not by count), every `seconds` (0 = not by time),
    whenever `set_postfix` brings new numbers (the training loop calls it once per `--log-every`
    steps), and once at `close` if anything happened since the last line.
    """

    def __init__(self, total: int | None, desc: str, unit: str, logger: logging.Logger, every: int = 0,
                 seconds: float = DEFAULT_SECONDS, initial: int = 0, disable: bool = False):
        self.total, self.desc, self.unit, self.log = total, desc, unit, logger
        self.every, self.seconds, self.disable = every, seconds, disable
        self.n = self.start_n = self.last_n = initial
        self.start = self.last_time = time.monotonic()
        self.postfix: dict[str, Any] = {}

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.disable:
            return
        by_count = self.every > 0 and self.n // self.every > self.last_n // self.every
        by_time = self.seconds > 0 and time.monotonic() - self.last_time >= self.seconds
        if by_count or by_time:
            self.emit()

    def set_postfix(self, **fields: Any) -> None:
        """New numbers for the line: written now (they are what the caller wants reported)."""
        self.postfix = fields
        if not self.disable:
            self.emit()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = (self.n - self.start_n) / elapsed
        if self.total:
            parts = [f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)"]
        else:
            parts = [f"{self.desc}: {self.n} {self.unit}"]
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        parts.append(f"{rate:.1f} {self.unit}/s")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {format_seconds((self.total - self.n) / rate)}")
        elif self.n:
            parts.append(f"elapsed {format_seconds(elapsed)}")
        return ", ".join(parts)

    def emit(self) -> None:
        self.log.info("%s", self.line())
        self.last_n, self.last_time = self.n, time.monotonic()

    def close(self) -> None:
        if not self.disable and self.n != self.last_n:
            self.emit()
        self.disable = True

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(total: int | None, desc: str, unit: str = "it", *, logger: logging.Logger | None = None,
             every: int = 0, seconds: float = DEFAULT_SECONDS, initial: int = 0, disable: bool = False,
             **tqdm_kwargs: Any) -> Any:
    """A tqdm bar when stderr is a terminal, else a `LogProgress` (same update/set_postfix/close).

    `every`/`seconds` only apply to the log lines; `tqdm_kwargs` only to the bar.
    """
    if interactive():
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=disable, **tqdm_kwargs)
    return LogProgress(total, desc, unit, logger or logging.getLogger("itsim.progress"), every=every,
                       seconds=seconds, initial=initial, disable=disable)


def track(iterable: Iterable[T], desc: str, unit: str = "it", total: int | None = None, **kwargs: Any) -> Iterator[T]:
    """`for x in track(items, ...)`: `progress()` around an iterable."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    bar = progress(total, desc, unit, **kwargs)
    try:
        for item in iterable:
            yield item
            bar.update(1)
    finally:
        bar.close()


def every_tenth(total: int) -> int:
    """A line at each tenth of the work (at least one item per line)."""
    return max(1, total // 10)
