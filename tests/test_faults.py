"""Faults without surprises (issue 16): full disks, torn files, concurrent writers, refused commands.

Every case goes through the console-script entry point (``distill.cli:main``) where a user
would meet it, and checks three things: one sentence and the documented exit status, no
temporary file left behind, and nothing changed by a command that was refused. A real full
disk is a small tmpfs where the test may mount one (root); elsewhere OSError is injected
into the writers.
"""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import distill.io
from conftest import REPO_ROOT, make_tiny_arrays
from distill.buffer import build_buffer
from distill.config import BufferConfig
from distill.data import fit_preprocessing, load_data
from distill.errors import DistillError
from distill.formats.synset import SyntheticSet, write_synset
from distill.formats.trajectory import expert_path, read_expert
from distill.io import LOCK_FILE, output_lock
from distill.mtt.experts import ExpertPool, Segment
from test_cli_errors import assert_one_sentence, run_main

EXPERTS, EPOCHS = 2, 2


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    np.savez(root / "tiny.npz", **make_tiny_arrays())
    np.savez(root / "other.npz", **make_tiny_arrays(seed=1))  # same shape, other images: other data
    return root


def _buffer_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["buffer", "--data", str(data), "--out", str(out), "--experts", str(EXPERTS), "--epochs", str(EPOCHS),
            "--batch-size", "5", "--augment", "none", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def buffer(data_dir) -> Path:
    """2 experts x 2 epochs (3 snapshots each) of the tiny data; tests copy it before changing it."""
    out = data_dir / "buffer"
    build_buffer(BufferConfig(data=str(data_dir / "tiny.npz"), out=str(out), experts=EXPERTS, epochs=EPOCHS,
                              batch_size=5, augment="none", device="cpu"))
    return out


def _run_args(buffer: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--buffer", str(buffer), "--out", str(out), "--ipc", "1", "--iterations", "2", "--syn-steps", "2",
            "--expert-epochs", "1", "--max-start-epoch", "1", "--eval-every", "0", "--device", "cpu", *extra]


def _rundir(path: Path, data_file: Path) -> Path:
    """A run folder holding a synthetic set made of training images (an audit fails it), without audit.json."""
    data = load_data(data_file)
    pre = fit_preprocessing(data.train.images)
    path.mkdir(parents=True)
    write_synset(path / "synthetic.h5", SyntheticSet(
        images=pre(data.train.images[:4]), labels=data.train.labels[:4], label_logits=None, preprocessing=pre,
        syn_lr=0.01, label_temperature=1.0, model="convnet3", class_names=list(data.class_names),
        model_kwargs={"width": 8}, fingerprint=data.fingerprint(), method={"eval_epochs": 2, "augment": "none"}))
    return path


def _temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ----------------------------------------------------------------------------- full disk and other OSErrors


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs (needs root); unmounted afterwards whatever happens."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if made.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root); the injected ENOSPC cases below still run")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_full_disk_is_one_sentence_and_a_rerun_frees_the_stale_temporary(small_fs, data_dir, subprocess_env):
    # A separate process: before the fix HDF5 crashed the interpreter here (exit 139).
    out = small_fs / "buffer"
    out.mkdir()
    stale = out / ".expert_0001.h5.abcd1234.tmp"
    stale.write_bytes(b"\0" * 900_000)  # what a hard kill left: it keeps the disk full until removed
    proc = subprocess.run([sys.executable, "-m", "distill.cli", *_buffer_args(data_dir / "tiny.npz", out)],
                          cwd=REPO_ROOT, env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert_one_sentence(proc.returncode, proc.stderr, "is full", str(out))
    assert not _temporaries(small_fs)  # the stale one went first, the new one on the error
    assert not list(out.glob("expert_*.h5"))


ERRNOS = {errno.ENOSPC: "is full", errno.EACCES: "Permission denied", errno.EROFS: "read-only file system"}


def _fail_writes(monkeypatch, code: int) -> None:
    """Every file the writers open for writing gets a few bytes, then the OSError ``code``."""
    real_open = open

    def failing_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "w" in mode:
            f.write(b"partial" if "b" in mode else "partial")
            f.close()
            raise OSError(code, os.strerror(code), str(path))
        return f

    monkeypatch.setattr(distill.io, "open", failing_open, raising=False)


@pytest.mark.parametrize("code", list(ERRNOS))
@pytest.mark.parametrize("command", ["buffer", "run", "export"])
def test_write_errors_are_one_sentence_and_leave_no_partial_file(command, code, buffer, data_dir, tmp_path,
                                                                  monkeypatch, capsys):
    if command == "buffer":
        args, target = _buffer_args(data_dir / "tiny.npz", tmp_path / "b"), tmp_path / "b" / "preprocessing.h5"
    elif command == "run":
        args, target = _run_args(buffer, tmp_path / "r"), tmp_path / "r" / "checkpoint.pt"
    else:
        rundir = _rundir(tmp_path / "run", data_dir / "tiny.npz")
        args, target = ["export", str(rundir), "--out", str(tmp_path / "s.h5"), "--force"], tmp_path / "s.h5"
    _fail_writes(monkeypatch, code)
    exit_code, _, err = run_main(args, monkeypatch, capsys)
    assert exit_code == 1
    assert_one_sentence(exit_code, err, ERRNOS[code], str(target))
    assert not target.exists() and not _temporaries(tmp_path)
    assert not list(tmp_path.rglob(LOCK_FILE)) and not list(tmp_path.rglob(".*.lock"))  # locks released


def test_a_config_file_on_a_read_only_folder_is_one_sentence(data_dir, tmp_path, monkeypatch, capsys):
    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "write_text", read_only)
    code, _, err = run_main(_buffer_args(data_dir / "tiny.npz", tmp_path / "b"), monkeypatch, capsys)
    assert_one_sentence(code, err, "read-only file system", "config.toml")
    assert not _temporaries(tmp_path)


# ----------------------------------------------------------------------------- refused commands change nothing


def test_a_refused_buffer_leaves_the_folder_byte_identical(buffer, data_dir, tmp_path, monkeypatch, capsys):
    out = shutil.copytree(buffer, tmp_path / "b")
    before = _bytes(out)
    code, _, err = run_main(_buffer_args(data_dir / "other.npz", out), monkeypatch, capsys)
    assert_one_sentence(code, err, "already holds a buffer for other data")
    assert _bytes(out) == before  # config.toml included

    for flag, value, made in (("--epochs", "3", "epochs 2"), ("--lr", "0.5", "lr 0.01")):
        code, _, err = run_main(_buffer_args(data_dir / "tiny.npz", out, flag, value), monkeypatch, capsys)
        assert_one_sentence(code, err, "was made with other settings", made)
        assert _bytes(out) == before  # the refused value is not recorded in config.toml


def test_stale_temporaries_go_first_even_when_the_command_is_refused(buffer, data_dir, tmp_path, monkeypatch,
                                                                    capsys):
    out = shutil.copytree(buffer, tmp_path / "b")
    (out / ".expert_0005.h5.x1y2z3.tmp").write_bytes(b"half an expert")
    (out / ".config.toml.q9w8e7.tmp").write_text("half a config")
    before = {k: v for k, v in _bytes(out).items() if not k.endswith(".tmp")}
    code, _, _ = run_main(_buffer_args(data_dir / "other.npz", out), monkeypatch, capsys)
    assert code == 1
    assert not _temporaries(out) and _bytes(out) == before


def test_a_refused_command_removes_the_output_folder_it_made_and_keeps_one_that_was_there(buffer, data_dir, tmp_path,
                                                                                          monkeypatch, capsys):
    # buffer and run make their --out folder before checking the input, to lock it; refused, they remove it.
    new = tmp_path / "new" / "buffer"
    code, _, err = run_main(_buffer_args(data_dir / "missing.npz", new), monkeypatch, capsys)
    assert code == 1 and "missing.npz" in err
    assert not new.exists() and new.parent.exists()  # only the folder the command itself needed
    run_out = tmp_path / "new-run"
    code, _, _ = run_main(_run_args(data_dir / "no-buffer-here", run_out), monkeypatch, capsys)
    assert code == 1 and not run_out.exists()
    code, _, _ = run_main(_run_args(buffer, run_out, "--init", "nonsense"), monkeypatch, capsys)
    assert code == 1 and not run_out.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    code, _, _ = run_main(_buffer_args(data_dir / "missing.npz", kept), monkeypatch, capsys)
    assert code == 1 and kept.is_dir() and not any(kept.iterdir())


# ----------------------------------------------------------------------------- one writer per folder


def _hold_lock(folder: Path, env: dict, name: str = LOCK_FILE) -> subprocess.Popen:
    code = ("import sys, time\nfrom distill.io import output_lock\n"
            "with output_lock(sys.argv[1], sys.argv[2]):\n    print('held', flush=True)\n    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder), name], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.parametrize("command", ["buffer", "run", "export"])
def test_a_second_writer_is_refused_with_the_holders_pid_until_the_holder_dies(command, buffer, data_dir, tmp_path,
                                                                                monkeypatch, capsys, subprocess_env):
    if command == "buffer":
        out = tmp_path / "b"
        args, folder, name = _buffer_args(data_dir / "tiny.npz", out), out, LOCK_FILE
    elif command == "run":
        out = tmp_path / "r"
        args, folder, name = _run_args(buffer, out), out, LOCK_FILE
    else:
        rundir = _rundir(tmp_path / "run", data_dir / "tiny.npz")
        out = tmp_path / "shares" / "s.h5"
        args, folder, name = ["export", str(rundir), "--out", str(out), "--force"], out.parent, ".s.h5.lock"
    holder = _hold_lock(folder, subprocess_env, name)
    try:
        code, _, err = run_main(args, monkeypatch, capsys)
        assert_one_sentence(code, err, f"PID {holder.pid}", str(folder))
        assert [p.name for p in folder.iterdir()] == [name]  # nothing written but the holder's lock
    finally:
        holder.kill()
        holder.wait()
    assert (folder / name).read_text().strip() == str(holder.pid)  # the dead holder's lock file is still there ...
    code, _, err = run_main(args, monkeypatch, capsys)
    assert code == 0, err  # ... and does not block
    assert not (folder / name).exists()


def test_a_lock_names_its_holder_and_is_gone_after_release(tmp_path):
    with output_lock(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())
        with pytest.raises(DistillError, match=f"PID {os.getpid()}"):
            with output_lock(tmp_path):
                pass
    assert not (tmp_path / LOCK_FILE).exists()


# ----------------------------------------------------------------------------- torn and missing expert files


def _tear(path: Path, row: int = 1) -> None:
    """Zero one snapshot row in place: the file keeps its size and stays valid HDF5."""
    size = path.stat().st_size
    with h5py.File(path, "r+") as f:
        f["snapshots"][row] = 0
    assert path.stat().st_size == size


def test_a_torn_expert_is_refused_by_run_and_retrained_by_buffer(buffer, data_dir, tmp_path, monkeypatch, capsys,
                                                                  caplog):
    b = shutil.copytree(buffer, tmp_path / "b")
    original = read_expert(b / "expert_0001.h5").snapshots()
    _tear(b / "expert_0001.h5")
    code, _, err = run_main(_run_args(b, tmp_path / "r"), monkeypatch, capsys)
    assert_one_sentence(code, err, "expert_0001.h5", "checksum")
    assert not (tmp_path / "r" / "config.toml").exists()

    code, _, err = run_main(_buffer_args(data_dir / "tiny.npz", b), monkeypatch, capsys)
    assert code == 0 and "expert_0001.h5 will be trained again" in caplog.text
    assert read_expert(b / "expert_0001.h5").snapshots().equal(original)  # retrained to the same trajectory


def test_an_expert_file_without_a_checksum_still_loads(buffer, tmp_path):
    b = shutil.copytree(buffer, tmp_path / "b")
    for i in range(EXPERTS):
        with h5py.File(expert_path(b, i), "r+") as f:  # as written before format 1.1
            del f.attrs["snapshots_sha256"]
            f.attrs["format_version"] = "1.0"
    _tear(expert_path(b, 0))
    assert len(ExpertPool(b).experts) == EXPERTS  # unchecked: nothing to check against


def test_a_gap_in_the_expert_numbering_is_reported(buffer, tmp_path, monkeypatch, capsys):
    b = shutil.copytree(buffer, tmp_path / "b")
    expert_path(b, 1).rename(expert_path(b, 2))
    code, _, err = run_main(_run_args(b, tmp_path / "r"), monkeypatch, capsys)
    assert_one_sentence(code, err, "has a gap", "expert_0001.h5 missing")


def test_an_expert_deleted_during_a_run_is_one_sentence(buffer, tmp_path):
    b = shutil.copytree(buffer, tmp_path / "b")
    pool = ExpertPool(b)
    expert_path(b, 1).unlink()
    with pytest.raises(DistillError, match=r"expert_0001\.h5 disappeared during the run.*--resume"):
        pool.pair(Segment(1, 0, 1), pool.experts[0].snapshots([0]).device)


# ----------------------------------------------------------------------------- a run killed before its first checkpoint


def test_a_run_folder_without_a_checkpoint_starts_over(buffer, tmp_path, monkeypatch, capsys, caplog):
    caplog.set_level("INFO", logger="distill")
    out = tmp_path / "r"
    out.mkdir()
    (out / "config.toml").write_text("ipc = 1\n")
    (out / "metrics.jsonl").write_text('{"kind": "iteration", "iteration": 0, "loss": 9.0}\n')
    code, _, err = run_main(_run_args(buffer, out), monkeypatch, capsys)
    assert code == 0, err
    assert "stopped before its first checkpoint; starting it over" in caplog.text
    assert (out / "checkpoint.pt").exists() and "9.0" not in (out / "metrics.jsonl").read_text()
    # With a checkpoint there is something to resume, so a rerun without --resume is still refused.
    code, _, err = run_main(_run_args(buffer, out), monkeypatch, capsys)
    assert_one_sentence(code, err, "already holds a run", "--resume")


# ----------------------------------------------------------------------------- audit, export, eval


def test_audit_fail_exits_3(data_dir, tmp_path, monkeypatch, capsys):
    rundir = _rundir(tmp_path / "run", data_dir / "tiny.npz")  # training images: a certain FAIL
    code, out, _ = run_main(["audit", str(rundir), "--data", str(data_dir / "tiny.npz"), "--networks", "1",
                             "--epochs", "1", "--expert-epochs", "1", "--bootstrap", "5", "--pairs", "0",
                             "--device", "cpu"], monkeypatch, capsys)
    assert "Verdict: FAIL" in out and code == 3
    assert (rundir / "audit.json").exists()  # the report is still written


def test_export_refuses_to_overwrite_unless_asked(data_dir, tmp_path, monkeypatch, capsys):
    rundir = _rundir(tmp_path / "run", data_dir / "tiny.npz")
    share = tmp_path / "s.h5"
    share.write_bytes(b"an earlier share")
    code, _, err = run_main(["export", str(rundir), "--out", str(share), "--force"], monkeypatch, capsys)
    assert_one_sentence(code, err, "already exists", "--overwrite")
    assert share.read_bytes() == b"an earlier share"
    code, _, err = run_main(["export", str(rundir), "--out", str(share), "--force", "--overwrite"], monkeypatch, capsys)
    assert code == 0, err
    assert share.read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"


@pytest.fixture
def share(data_dir, tmp_path, monkeypatch, capsys) -> Path:
    rundir = _rundir(tmp_path / "run", data_dir / "tiny.npz")
    path = tmp_path / "s.h5"
    assert run_main(["export", str(rundir), "--out", str(path), "--force"], monkeypatch, capsys)[0] == 0
    return path


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("training started before the check")

    monkeypatch.setattr("distill.evaluate.train_network", refuse)


def _eval_args(data_dir: Path, *shares: Path | str, extra: tuple[str, ...] = ()) -> list[str]:
    return ["eval", *map(str, shares), "--test", str(data_dir / "tiny.npz"), "--runs", "1", "--epochs", "1",
            "--baseline", "none", "--device", "cpu", *extra]


def test_eval_refuses_the_same_share_given_twice(share, data_dir, tmp_path, monkeypatch, capsys, no_training):
    copy = shutil.copy(share, tmp_path / "copy.h5")
    dotted = f"{share.parent}/./{share.name}"
    for pair, fragment in (((share, share), "is given twice"), ((share, dotted), "name the same file"),
                           ((share, copy), "equal payload checksums")):
        code, _, err = run_main(_eval_args(data_dir, *pair), monkeypatch, capsys)
        assert_one_sentence(code, err, fragment, "give each share once")


def test_eval_checks_its_json_path_before_training(share, data_dir, tmp_path, monkeypatch, capsys, no_training):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_main(_eval_args(data_dir, share, extra=("--json", str(blocker / "e.json"))), monkeypatch, capsys)
    assert_one_sentence(code, err, str(blocker / "e.json"))

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr("tempfile.NamedTemporaryFile", read_only)
    code, _, err = run_main(_eval_args(data_dir, share, extra=("--json", str(tmp_path / "e.json"))), monkeypatch,
                            capsys)
    assert_one_sentence(code, err, "read-only file system", "e.json")


# ----------------------------------------------------------------------------- config values (item 6)


def test_a_run_config_value_of_the_wrong_type_writes_nothing(buffer, tmp_path, monkeypatch, capsys):
    # test_config.py covers the buffer keys of the issue and --size; this is its run key, through the CLI.
    conf = tmp_path / "run.toml"
    conf.write_text('checkpoint_every = "5"\n')
    code, _, err = run_main(_run_args(buffer, tmp_path / "r", "--config", str(conf)), monkeypatch, capsys)
    assert_one_sentence(code, err, "checkpoint_every = '5'", "an integer")
    assert not (tmp_path / "r").exists()


def test_a_lock_that_cannot_record_its_holder_is_released_with_the_error(tmp_path, monkeypatch):
    # A full disk while writing the PID must not leave this process holding the lock through a lost handle.
    def full(fd, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "ftruncate", full)
    with pytest.raises(DistillError, match="is full"):
        with output_lock(tmp_path):
            pass
    monkeypatch.undo()
    with output_lock(tmp_path):  # the same process takes it again: nothing holds it
        pass


def test_a_second_split_into_the_same_folder_is_refused_while_the_first_holds_it(tmp_path):
    from distill.config import SplitConfig
    from distill.sites import split_dataset

    data = tmp_path / "tiny.npz"
    np.savez(data, **make_tiny_arrays())
    out = tmp_path / "sites"
    with output_lock(out):
        with pytest.raises(DistillError, match="in use by another distill process"):
            split_dataset(SplitConfig(data=str(data), out=str(out), sites=2))
    assert not (out / "split.json").exists()
