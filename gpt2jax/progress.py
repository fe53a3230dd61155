"""Progress bars: tqdm's when it is installed, else a plain line.

download_model.py runs before `pip install`, with only the standard library.
"""

from __future__ import annotations

from typing import TextIO

try:
    from tqdm import tqdm
except ImportError:
    tqdm = None


class PlainProgress:
    """The part of tqdm's interface used here, for when tqdm is not installed: a line per file that
    shows the percentage (redrawn on a terminal, a few lines per file in a log)."""

    def __init__(
        self, *, total: int | None, initial: int, desc: str, disable: bool, file: TextIO, **_: object
    ) -> None:
        self.total, self.n, self.desc, self.disable, self.file = total, initial, desc, disable, file
        self.tty = file.isatty()
        self.shown: int | None = None

    def __enter__(self) -> PlainProgress:
        self._show()
        return self

    def __exit__(self, *exc) -> None:
        if self.tty and not self.disable:
            print(file=self.file)

    def update(self, n: int) -> None:
        self.n += n
        self._show()

    def _show(self) -> None:
        if self.disable:
            return
        # Percent if the size is known, else every 64 MiB; a log gets a line per quarter only.
        step = self.n * 100 // self.total if self.total else self.n >> 26
        if not self.tty and self.total:
            step -= step % 25
        if step == self.shown:
            return
        self.shown = step
        of = f" of {self.total / 2**20:.1f} MiB ({step}%)" if self.total else ""
        print(f"{self.desc}: {self.n / 2**20:.1f} MiB{of}", end="\r" if self.tty else "\n", file=self.file)

    @staticmethod
    def write(message: str, file: TextIO) -> None:
        print(message, file=file)


Progress = tqdm or PlainProgress
