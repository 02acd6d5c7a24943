"""A share from another hospital is untrusted input (issue 27): each attack of the issue, kept as a test.

Locks and appends follow no link; received recipes are bounded; the checksum covers every field;
text from a share is printed safely; a buffer refuses to mix experts; every value is bounded.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import make_tiny_arrays
from distill.errors import DistillError
from distill.io import LOCK_FILE, append_text, output_lock, truncate_in_place
from test_cli_errors import assert_one_sentence, run_main


# ----------------------------------------------------------------------------- 1. locks and appends follow no link


def test_a_lock_that_is_a_symlink_is_refused_and_its_target_kept(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).symlink_to(victim)
    with pytest.raises(DistillError, match="symbolic link"):
        with output_lock(out):
            pass
    assert victim.read_text() == "precious\n"


def test_a_lock_that_is_a_hard_link_or_a_fifo_is_refused(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    os.link(victim, out / LOCK_FILE)
    with pytest.raises(DistillError, match="hard links"):
        with output_lock(out):
            pass
    assert victim.read_text() == "precious\n"
    (out / LOCK_FILE).unlink()
    os.mkfifo(out / LOCK_FILE)
    with pytest.raises(DistillError, match="not a regular file"):
        with output_lock(out):
            pass


def test_the_cli_refuses_a_planted_lock_link_in_one_sentence(tmp_path, monkeypatch, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    data = tmp_path / "tiny.npz"
    np.savez(data, **make_tiny_arrays())
    out = tmp_path / "sites"
    out.mkdir()
    (out / LOCK_FILE).symlink_to(victim)
    code, _, err = run_main(["split", str(data), "--out", str(out), "--sites", "2"], monkeypatch, capsys)
    assert_one_sentence(code, err, "symbolic link")
    assert victim.read_text() == "precious\n"


def test_a_lock_on_a_full_disk_leaves_no_file_and_no_folder(tmp_path, monkeypatch):
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    out = tmp_path / "new" / "out"
    with pytest.raises(DistillError, match="is full"):
        with output_lock(out):
            pass
    monkeypatch.undo()
    assert not out.exists() and (tmp_path / "new").exists()  # only the folder made for the lock goes


def test_appends_and_truncations_follow_no_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    log = tmp_path / "metrics.jsonl"
    log.symlink_to(victim)
    with pytest.raises(DistillError, match="symbolic link"):
        append_text(log, "{}\n")
    with pytest.raises(DistillError, match="symbolic link"):
        truncate_in_place(log, 0)
    assert victim.read_text() == "precious\n"
    log.unlink()
    append_text(log, "a\n")
    append_text(log, "b\n")
    truncate_in_place(log, 2)
    assert log.read_text() == "a\n"


def test_metrics_log_follows_no_link(tmp_path):
    from distill.mtt.rundir import MetricsLog

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "metrics.jsonl").symlink_to(victim)
    m = MetricsLog(tmp_path / "metrics.jsonl")
    with pytest.raises(DistillError, match="symbolic link"):
        m.write({"loss": 1.0})
    with pytest.raises(DistillError, match="symbolic link"):
        m.truncate(0)
    assert victim.read_text() == "precious\n"
