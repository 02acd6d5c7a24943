"""Small file helpers shared by every stage: atomic writes, hashing, output-folder locks and
filesystem errors turned into one sentence."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import math
import os
import platform
import stat
import shutil
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
        raise fs_error(e, path) from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them (power loss)
        os.replace(tmp, path)
    except OSError as e:
        raise fs_error(e, path) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``folder``; rename it into place only on success.

    ``folder`` must be absent or an empty folder (refused in one sentence otherwise), so a crash never
    leaves half a folder under the final name and nothing the user had is replaced.
    """
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise DistillError(f"{folder} already exists and is not an empty folder; choose another one.")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    except OSError as e:
        raise fs_error(e, folder) from None
    try:
        yield tmp
        if folder.exists():
            folder.rmdir()
        os.replace(tmp, folder)
    except OSError as e:
        raise fs_error(e, folder) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def new_h5(path: str | os.PathLike) -> Iterator["h5py.File"]:
    """A new HDF5 file built in memory; its bytes reach ``path`` through Python when the block ends.

    HDF5 never writes to the disk itself. On a full disk its own flush fails inside close,
    leaves the file open in the library and crashed the interpreter at exit (exit 139, the
    temporary file left behind); a Python write fails with an ordinary OSError, which
    :func:`atomic_path` turns into one sentence. Use inside ``atomic_path``.
    """
    import h5py

    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        yield f
    with open(path, "wb") as out:
        out.write(buf.getbuffer())


def write_bytes_atomic(path: str | os.PathLike, data: bytes | memoryview) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


# ----------------------------------------------------------------------------- filesystem errors

def fs_error(e: OSError, path: str | os.PathLike) -> DistillError:
    """One sentence for a failed filesystem call on ``path``: what happened and what to do."""
    code = e.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        return DistillError(f"The disk holding {path} is full; free some space or choose another folder, "
                            "then run the command again (finished work is kept).")
    if code in (errno.EACCES, errno.EPERM):
        return DistillError(f"Permission denied writing {path}; choose a folder you may write to or change its "
                            "permissions.")
    if code == errno.EROFS:
        return DistillError(f"{path} is on a read-only file system; choose a writable folder.")
    if code == errno.ENOENT:
        return DistillError(f"{path} or a folder above it disappeared while in use; restore it or choose another "
                            "folder, then run the command again.")
    if code == errno.ENAMETOOLONG:
        return DistillError(f"The name {path} is too long for the file system; choose a shorter one.")
    if code == errno.ELOOP:
        return DistillError(f"{path} is a symbolic link (or a loop of them); distill does not write through links.")
    if code == errno.ENOTDIR:
        return DistillError(f"A part of {path} is a file, not a folder; choose another path.")
    why = (e.strerror or str(e)).rstrip(".").replace("\n", " ")
    return DistillError(f"Cannot write {path} ({why}); check the disk, then run the command again.")


def remove_stale_temps(folder: str | os.PathLike, name: str = "*") -> list[Path]:
    """Delete the temporary files :func:`atomic_path` left in ``folder`` for targets matching ``name``.

    Only call this while holding the folder's :func:`output_lock`: then no live writer owns them,
    and a hard kill (SIGKILL, power loss) is the only way they stay behind.
    """
    removed = []
    for stale in Path(folder).glob(f".{name}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
            removed.append(stale)
    return removed


# ----------------------------------------------------------------------------- one writer per folder

LOCK_FILE = ".distill.lock"


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, name: str = LOCK_FILE) -> Iterator[Path]:
    """Hold an advisory ``flock`` on ``folder/name`` for the block; a second writer gets one sentence.

    The lock file records the holder's PID for that sentence. The kernel drops a lock when its
    process dies, so a lock file left by a killed writer does not block. The file is removed on
    release; a writer that opened it just before checks that it still locks the file at that
    name, and opens it again when it does not.

    The lock file is opened without following a symbolic link and must be a regular file with no
    other name (:func:`open_no_follow`): anyone who may write to a shared output folder could
    otherwise point it at another user's file, which this writer would truncate. A lock that cannot
    be recorded (a full disk) is removed again, and so is the folder when it was made for the lock.
    """
    folder = Path(folder)
    path = folder / name
    made = not os.path.lexists(folder)
    fd = None
    created = False
    try:
        folder.mkdir(parents=True, exist_ok=True)
        while True:
            created = not os.path.lexists(path)
            fd = open_no_follow(path, os.O_RDWR | os.O_CREAT, what="lock file")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                fd = None
                raise DistillError(f"{folder} is in use by another distill process (PID {holder}); wait until it "
                                   "finishes or choose another output.") from None
            try:
                same = os.fstat(fd).st_ino == os.lstat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder before us removed this file as we opened it
            fd = None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except (OSError, DistillError) as e:
        if fd is not None:
            if created:  # we hold the lock, so the file at this name is ours to remove
                with contextlib.suppress(OSError):
                    path.unlink()
            os.close(fd)  # a lock we took but cannot record must not outlive this error
        if made:
            remove_if_empty(folder)  # made only to hold this lock
        if isinstance(e, DistillError):
            raise
        raise fs_error(e, path) from None
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)  # releases the lock


def open_no_follow(path: str | os.PathLike, flags: int, mode: int = 0o644, *, what: str = "file") -> int:
    """``os.open`` that follows no symbolic link at ``path`` and accepts only a regular file with one name.

    For files opened in place (locks, appended logs): through a link planted in a folder that
    others may write to, such a write would truncate or grow a file that is not ours. A hard link
    is refused as well, for the same reason. Returns the descriptor; anything else is a
    :class:`DistillError` in one sentence.
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DistillError(f"The {what} {path} is a symbolic link; distill does not write through links. "
                               "Remove it and run the command again.") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
        os.close(fd)
        kind = "a regular file with other names (hard links)" if stat.S_ISREG(st.st_mode) else "not a regular file"
        raise DistillError(f"The {what} {path} is {kind}; distill writes only its own files there. "
                           "Remove it and run the command again.")
    os.set_blocking(fd, True)
    return fd


def append_text(path: str | os.PathLike, text: str, *, what: str = "log") -> None:
    """Append ``text`` to ``path`` (made if missing) through :func:`open_no_follow`, so a link is never followed."""
    try:
        fd = open_no_follow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, what=what)
        try:
            with os.fdopen(fd, "a", encoding="utf-8", closefd=True) as f:
                fd = None
                f.write(text)
        finally:
            if fd is not None:
                os.close(fd)
    except OSError as e:
        raise fs_error(e, path) from None


def truncate_in_place(path: str | os.PathLike, size: int, *, what: str = "log") -> None:
    """Cut ``path`` to ``size`` bytes in place, following no link (see :func:`open_no_follow`)."""
    try:
        fd = open_no_follow(path, os.O_WRONLY, what=what)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
    except OSError as e:
        raise fs_error(e, path) from None


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"


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


def remove_if_empty(path: str | os.PathLike) -> None:
    """Remove the folder ``path`` if it holds nothing; a folder with anything in it, or none, is left alone.

    For a command refused after it made its output folder (to lock it): the folder goes again, so a
    refused command changes nothing on disk.
    """
    with contextlib.suppress(OSError):
        os.rmdir(path)


def check_writable_file(path: str | os.PathLike) -> Path:
    """Prove that ``path`` can be written later (its folder exists or can be made, and takes a file)."""
    path = Path(path)
    if path.is_dir():
        raise DistillError(f"{path} is a folder; give a file name.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"):
            pass
    except OSError as e:
        raise fs_error(e, path) from None
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
