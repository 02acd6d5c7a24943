"""Progress bars on stderr that switch themselves off when stderr is not a terminal."""
from __future__ import annotations

import sys
from typing import Iterable, TypeVar

import click

T = TypeVar("T")


def progress(items: Iterable[T], label: str, length: int | None = None, enabled: bool | None = None):
    """click's progress bar, on stderr; a no-op wrapper where stderr is no TTY (logs, CI)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return _Plain(items)
    return click.progressbar(items, length=length, label=label, file=sys.stderr, show_pos=True, show_eta=True)


class _Plain:
    def __init__(self, items):
        self.items = items

    def __enter__(self):
        return self.items

    def __exit__(self, *exc):
        return False
