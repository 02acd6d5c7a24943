"""Small file helpers shared by every stage: atomic writes and hashing."""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import tempfile
from pathlib import Path
from typing import Iterator

from . import __version__
from .errors import DistillError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only on success.

    A crash or exception leaves no partial file behind, so a file that exists is
    always complete (the same idea as timm's checkpoint saver).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise DistillError(f"Cannot write to {path.parent}: {e.strerror or e}.") from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def strict_json(obj, digits: int | None = None):
    """A copy that any JSON reader accepts: NaN and infinities become null, tuples lists,
    and floats are rounded to ``digits`` decimals when given."""
    if isinstance(obj, float):
        if not math.isfinite(obj):
            return None
        return round(obj, digits) if digits is not None else obj
    if isinstance(obj, dict):
        return {k: strict_json(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v, digits) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def md5_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def check_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and prove we can write there, or raise a clear error."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe."):
            pass
    except OSError as e:
        raise DistillError(f"Output folder {path} is not writable: {e.strerror or e}.") from None
    return path


def software_versions() -> dict[str, str]:
    """Versions of the libraries that shape numerical results (no host or user names)."""
    import h5py
    import numpy
    import torch

    out = {
        "distill": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "h5py": h5py.__version__,
    }
    try:
        import kornia

        out["kornia"] = kornia.__version__
    except ImportError:  # pragma: no cover - kornia is a hard dependency
        pass
    return out
