"""The stage lifecycle shared by buffer, run, export and split (distill/lifecycle.py)."""
from __future__ import annotations

import pytest

from distill.errors import DistillError
from distill.io import output_lock
from distill.lifecycle import stage


def _refuse():
    raise DistillError("refused")


def test_a_failed_check_touches_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DistillError, match="refused"):
        with stage(check=_refuse, lock=output_lock(out), tidy=out):
            pytest.fail("the body ran after a failed check")
    assert not out.exists()


def test_a_refused_stage_releases_its_lock_and_removes_the_folder_it_made(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DistillError, match="refused"):
        with stage(device="cpu", tidy=out) as st:
            assert st.device.type == "cpu" and st.world.main
            st.locks.enter_context(output_lock(out))
            _refuse()
    assert not out.exists()
    with stage(lock=output_lock(out), tidy=out) as st:  # the lock was released: a second stage gets it
        assert st.device is None
        (out / "result").write_text("x")
    assert (out / "result").exists()


def test_a_refused_stage_leaves_a_folder_it_did_not_make(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DistillError):
        with stage(lock=output_lock(out), tidy=out):
            _refuse()
    assert out.is_dir()
