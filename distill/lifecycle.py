"""The lifecycle every writing stage shares (buffer, run, export, split), in one context manager.

:func:`stage` checks the settings, picks the device and joins the torchrun process group (training stages),
holds the output lock (given, or entered by the stage on ``locks`` once it knows where it writes), and on the
way out, whatever happened: releases the locks, removes an output folder the stage made only to lock it when
the stage was refused (``tidy``), and leaves the process group. The stage body stays the stage's own.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import torch

from .distributed import World, destroy_process_group, init_process_group, resolve_device, world_from_env
from .io import remove_if_empty


@dataclass
class Stage:
    world: World
    device: torch.device | None  # None for a stage that trains nothing (export, split)
    locks: contextlib.ExitStack  # released on the way out; a stage enters its output lock here


@contextlib.contextmanager
def stage(*, check: Callable[[], None] | None = None, device: str | None = None, lock: ContextManager | None = None,
          tidy: str | os.PathLike | None = None) -> Iterator[Stage]:
    """Run one stage: ``check()`` first (nothing is touched before it passes), then ``device`` resolved and the
    process group joined when a device is named, ``lock`` held. ``tidy``: the output folder, removed on failure
    when the stage made it and left it empty (so a refused command changes nothing on disk)."""
    if check is not None:
        check()
    world = world_from_env() if device is not None else World()
    dev = resolve_device(device, world) if device is not None else None
    if dev is not None:
        init_process_group(world, dev)
    locks = contextlib.ExitStack()
    made = tidy is not None and not Path(tidy).exists()
    done = False
    try:
        if lock is not None:
            locks.enter_context(lock)
        yield Stage(world, dev, locks)
        done = True
    finally:
        locks.close()
        if made and not done and world.main:
            remove_if_empty(tidy)  # made only to hold the lock of a refused command
        if dev is not None:
            destroy_process_group(world)
