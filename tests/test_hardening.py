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
from distill.formats.trajectory import expert_path
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
    from distill.formats.run import MetricsLog

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "metrics.jsonl").symlink_to(victim)
    m = MetricsLog(tmp_path / "metrics.jsonl")
    with pytest.raises(DistillError, match="symbolic link"):
        m.write({"loss": 1.0})
    with pytest.raises(DistillError, match="symbolic link"):
        m.truncate(0)
    assert victim.read_text() == "precious\n"


# ----------------------------------------------------------------------------- shares to attack

import shutil  # noqa: E402

import h5py  # noqa: E402

from distill.export import export_share  # noqa: E402
from distill.formats import load_share  # noqa: E402
from distill.formats.share import _walk, content_sha256  # noqa: E402
from test_share import _text, make_run, restamp  # noqa: E402


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hardening")
    return export_share(make_run(root / "run"), root / "share.h5")


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny.npz"
    np.savez(path, **make_tiny_arrays())
    return path


def forged(template: Path, tmp_path: Path, edit) -> Path:
    """A copy of ``template`` changed by ``edit(f)``, both checksums recomputed as an attacker would."""
    path = tmp_path / "forged.h5"
    shutil.copyfile(template, path)
    with h5py.File(path, "r+") as f:
        edit(f)
    restamp(path)
    return path


# ----------------------------------------------------------------------------- 2. a received share is bounded


@pytest.mark.parametrize("edit, fragment", [
    (lambda f: f["recipe"].attrs.__setitem__("epochs", np.int64(10 ** 12)), "1000000000000 epochs"),
    (lambda f: f["recipe"].attrs.__setitem__("batch_size", np.int64(10 ** 9)), "batch size 1000000000"),
    (lambda f: _text(f["recipe"], "model_kwargs", '{"width": 300000}'), "model_kwargs.width = 300000"),
    (lambda f: _text(f["recipe"], "model_kwargs", '{"evil": 1}'), "model_kwargs.evil"),
    (lambda f: _text(f["recipe"], "model", "bigmodel"), "unknown model 'bigmodel'"),
], ids=["epochs", "batch", "width", "unknown-kwarg", "model-name"])
def test_a_hostile_recipe_makes_inspect_call_the_share_invalid(template, tmp_path, monkeypatch, capsys, edit, fragment):
    path = forged(template, tmp_path, edit)
    code, out, err = run_main(["inspect", str(path)], monkeypatch, capsys)
    assert_one_sentence(code, err, fragment, "the share is invalid")
    assert out == ""


def _real_build_refused(built: list, instead=None):
    """``create_model`` that builds on the meta device (the estimate) and records, or fails, a real build."""
    import torch

    from distill.models import create_model

    def build(*args, **kwargs):
        if torch.get_default_device().type == "meta":
            return create_model(*args, **kwargs)
        built.append(args)
        return instead(*args, **kwargs) if instead else None

    return build


def test_a_recipe_over_the_cost_limits_is_refused_before_the_model_is_built(template, tmp_path, monkeypatch, capsys):
    import distill.checks

    path = forged(template, tmp_path, lambda f: _text(f["recipe"], "model_kwargs", '{"width": 2048}'))
    built = []
    monkeypatch.setattr(distill.checks, "create_model", _real_build_refused(built))
    monkeypatch.setattr(distill.limits, "MAX_PARAMS", 10_000_000)  # width 2048 at 8 px: about 75 million
    code, _, err = run_main(["inspect", str(path)], monkeypatch, capsys)
    assert_one_sentence(code, err, "parameters", "the share is invalid")
    monkeypatch.setattr(distill.limits, "MAX_PARAMS", 10 ** 9)
    monkeypatch.setattr(distill.limits, "MAX_ACTIVATION_BYTES", 1 << 20)
    code, _, err = run_main(["inspect", str(path)], monkeypatch, capsys)
    assert_one_sentence(code, err, "activations", "the share is invalid")
    assert not built


def test_the_cost_estimate_matches_the_built_model():
    from distill.checks import estimate_model
    from distill.models import create_model

    for name, kw in (("convnet3", {}), ("convnet", {"width": 16, "depth": 2}), ("vgg11", {}), ("resnet18", {})):
        est = estimate_model(name, 3, 1, 28, kw)
        assert est.params == sum(p.numel() for p in create_model(name, 3, 1, 28, **kw).parameters())
        assert est.activation_bytes > 0 and est.flops > 0


@pytest.mark.parametrize("command", ["buffer", "eval"])
def test_size_is_bounded_before_any_data_is_loaded(tiny_npz, tmp_path, monkeypatch, capsys, command):
    args = (["buffer", "--data", str(tiny_npz), "--out", str(tmp_path / "b")] if command == "buffer"
            else ["eval", "--test", str(tiny_npz), "--baseline", "random-real"])
    code, _, err = run_main([*args, "--size", "100000"], monkeypatch, capsys)
    assert_one_sentence(code, err, "--size must be at most 512; got 100000")
    assert not (tmp_path / "b").exists()


def test_eval_refuses_what_would_exceed_max_hours_with_the_estimate(template, tiny_npz, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("training started before the estimate")

    monkeypatch.setattr("distill.evaluate.train_network", refuse)
    code, _, err = run_main(["eval", str(template), "--test", str(tiny_npz), "--match-classes-by-position",
                             "--baseline", "none", "--runs", "2", "--device", "cpu", "--max-hours", "1e-12"],
                            monkeypatch, capsys)
    assert_one_sentence(code, err, "would train for at least", "--max-hours 1e-12")


def test_eval_refuses_what_would_exceed_the_free_memory(template, tiny_npz, monkeypatch, capsys):
    monkeypatch.setattr("distill.evaluate.free_memory", lambda device: 1000)
    code, _, err = run_main(["eval", str(template), "--test", str(tiny_npz), "--match-classes-by-position",
                             "--baseline", "none", "--runs", "1", "--device", "cpu"], monkeypatch, capsys)
    assert_one_sentence(code, err, "of memory but", "is free")


def test_a_model_build_that_runs_out_of_memory_is_one_sentence(monkeypatch):
    import distill.checks

    def oom(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: "
                           "you tried to allocate 3200000000000 bytes.")

    monkeypatch.setattr(distill.checks, "create_model", _real_build_refused([], oom))
    with pytest.raises(DistillError, match="ran out of memory while being built"):
        distill.checks.check_model_builds("convnet3", 2, 1, 28)


# ----------------------------------------------------------------------------- 3. the checksum covers every field


def _swap_class_names(f):
    names = f["class_names"][()]
    f["class_names"][...] = names[::-1]


@pytest.mark.parametrize("edit", [
    _swap_class_names,
    lambda f: f["recipe"].attrs.__setitem__("epochs", f["recipe"].attrs["epochs"] + 1),
    lambda f: f["preprocessing"].attrs.__setitem__("zca_eps", np.float64(0.5)),
    lambda f: _text(f["privacy"], "audit_status", "failed"),
    lambda f: _text(f["provenance"], "dataset", '{"name": "elsewhere"}'),
    lambda f: _text(f, "description", "something else"),
    lambda f: f["privacy"].attrs.__setitem__("epsilon", np.float64(1.0)),  # a field this reader does not know
], ids=["class-names", "recipe", "preprocessing-attr", "privacy", "provenance", "text", "new-field"])
def test_any_changed_field_fails_the_checksum(template, tmp_path, edit):
    path = tmp_path / "edited.h5"
    shutil.copyfile(template, path)
    with h5py.File(path, "r+") as f:
        edit(f)
    with pytest.raises(DistillError, match="content checksum does not match"):
        load_share(path)


def test_the_checksum_follows_the_documented_bytes(template):
    """An independent reading of docs/share-format.md's description, with h5py's own walk."""
    import hashlib
    import json

    def put(h, b):
        h.update(len(b).to_bytes(8, "little") + b)

    def put_array(h, a):
        a = np.ascontiguousarray(np.asarray(a), dtype=np.asarray(a).dtype.newbyteorder("<"))
        for b in (a.dtype.str.encode(), json.dumps(list(a.shape)).encode(), a.tobytes()):
            put(h, b)

    with h5py.File(template, "r") as f:
        objs = {"": f}
        f.visititems(lambda name, obj: objs.update({name: obj}))  # a callback's non-None return stops the walk
        h = hashlib.sha256()
        for path in sorted(objs, key=str.encode):
            obj = objs[path]
            put(h, path.encode())
            put(h, b"dataset" if isinstance(obj, h5py.Dataset) else b"group")
            if isinstance(obj, h5py.Dataset):
                put_array(h, obj[()])
            for name in sorted(obj.attrs, key=str.encode):
                if not (path == "" and name == "content_sha256"):
                    put(h, name.encode())
                    put_array(h, obj.attrs[name])
        assert f.attrs["content_sha256"].decode() == h.hexdigest()
        assert h.hexdigest() == content_sha256(f, _walk(f, str(template)))


def test_a_version_1_0_share_loads_and_says_what_is_unverified():
    from conftest import REPO_ROOT

    share = load_share(REPO_ROOT / "tests" / "data" / "legacy_v1" / "share.h5")
    assert share.format_version == "1.0" and not share.content_sha256
    text = share.describe()
    assert "UNVERIFIED" in text and "class names" in text and "recipe" in text and "privacy record" in text
    assert "class names" in share.summary()["unverified"]


def test_a_current_share_is_version_1_1_and_fully_verified(template):
    share = load_share(template)
    assert share.format_version == "1.1" and len(share.content_sha256) == 64 and not share.unverified
    assert "verified: every field" in share.describe() and "UNVERIFIED" not in share.describe()


# ----------------------------------------------------------------------------- 4. text from a share is printed safely

HOSTILE = "benign\x1b[2J\x1b]0;pwned\x07\rmalignant\u202e"


def test_printable_escapes_every_control_character():
    import unicodedata

    from distill.text import control_characters, printable

    assert printable(HOSTILE) == "benign\\x1b[2J\\x1b]0;pwned\\x07\\x0dmalignant\\u202e"
    controls = [chr(c) for c in range(0x250) if unicodedata.category(chr(c)) == "Cc"]
    assert all(printable(c).startswith("\\x") for c in controls)
    assert printable("Pneumonie, größer als 5 mm") == "Pneumonie, größer als 5 mm"  # ordinary text is kept
    assert control_characters("a\tb\nc\x1b", allow="\n\t") == ["\\x1b"]


def test_inspect_prints_a_hostile_text_escaped(template, tmp_path, monkeypatch, capsys):
    def edit(f):
        _text(f, "description", HOSTILE)
        _text(f["provenance"], "method", '{"note": "\\u001b[31mred"}')
        names = f["class_names"][()]
        del f["class_names"]
        f.create_dataset("class_names", data=np.array([b"ok\x1b[1A", names[1]], dtype=h5py.string_dtype("utf-8", 16)))
    path = forged(template, tmp_path, edit)
    code, out, err = run_main(["inspect", str(path)], monkeypatch, capsys)
    assert code == 0, err
    assert not any(c in out + err for c in "\x1b\x07\r\u202e")
    assert "\\x1b[2J" in out and "ok\\x1b[1A" in out


def test_log_lines_and_errors_are_escaped(monkeypatch, capsys):
    import logging

    from distill.cli import _PrintableFormatter

    record = logging.LogRecord("distill", logging.INFO, __file__, 1, "class %s", (HOSTILE,), None)
    assert "\x1b" not in _PrintableFormatter("%(message)s").format(record)
    code, _, err = run_main(["inspect", f"/nonexistent/{HOSTILE}.h5"], monkeypatch, capsys)
    assert code == 1 and "\x1b" not in err and "\\x1b" in err


@pytest.mark.parametrize("flag", ["--description", "--cite", "--license"])
def test_export_refuses_control_characters_in_text_options(tmp_path, monkeypatch, capsys, flag):
    rundir = make_run(tmp_path / "run")
    out = tmp_path / "s.h5"
    code, _, err = run_main(["export", str(rundir), "--out", str(out), flag, "x\x1b[2J\x07\ry"], monkeypatch, capsys)
    assert_one_sentence(code, err, "\\x1b")
    assert "\x1b" not in err and not out.exists()


# ----------------------------------------------------------------------------- 5. a buffer holds experts of one kind


def _buffer_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["buffer", "--data", str(data), "--out", str(out), "--experts", "1", "--epochs", "1", "--batch-size", "5",
            "--augment", "none", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def float32_buffer(tiny_npz, tmp_path_factory) -> Path:
    from distill.buffer import build_buffer
    from distill.config import BufferConfig

    out = tmp_path_factory.mktemp("buffers") / "f32"
    build_buffer(BufferConfig(data=str(tiny_npz), out=str(out), experts=1, epochs=1, batch_size=5, augment="none",
                              device="cpu"))
    return out


def test_buffer_refuses_to_add_experts_of_another_kind(float32_buffer, tiny_npz, tmp_path, monkeypatch, capsys):
    out = tmp_path / "b"
    shutil.copytree(float32_buffer, out)
    config = (out / "config.toml").read_text()
    args = _buffer_args(tiny_npz, out, "--experts", "2", "--snapshot-dtype", "float16", "--bf16")
    code, _, err = run_main(args, monkeypatch, capsys)
    assert_one_sentence(code, err, "snapshot_dtype 'float32'", "bf16 False")
    assert (out / "config.toml").read_text() == config and not expert_path(out, 1).exists()


def test_run_refuses_a_buffer_whose_experts_disagree(float32_buffer, tiny_npz, tmp_path):
    from distill.buffer import build_buffer
    from distill.config import BufferConfig
    from distill.mtt.experts import ExpertPool

    other = tmp_path / "f16"
    build_buffer(BufferConfig(data=str(tiny_npz), out=str(other), experts=1, epochs=1, batch_size=5, augment="none",
                              device="cpu", snapshot_dtype="float16"))
    mixed = tmp_path / "mixed"
    shutil.copytree(float32_buffer, mixed)
    shutil.copyfile(expert_path(other, 0), expert_path(mixed, 1))
    with pytest.raises(DistillError, match="snapshot_dtype 'float16'"):
        ExpertPool(mixed)


# ----------------------------------------------------------------------------- 6. every value bounded and finite


@pytest.mark.parametrize("command", ["buffer", "run", "eval", "audit", "split"])
@pytest.mark.parametrize("seed", ["-1", str(2 ** 64)])
def test_seeds_outside_the_int64_range_are_one_sentence(tiny_npz, tmp_path, monkeypatch, capsys, command, seed):
    args = {"buffer": _buffer_args(tiny_npz, tmp_path / "b"),
            "run": ["run", "--buffer", str(tmp_path / "nobuffer"), "--out", str(tmp_path / "r")],
            "eval": ["eval", "--test", str(tiny_npz), "--baseline", "random-real"],
            "audit": ["audit", str(tmp_path / "norun"), "--data", str(tiny_npz)],
            "split": ["split", str(tiny_npz), "--out", str(tmp_path / "s")]}[command]
    code, _, err = run_main([*args, "--seed", seed], monkeypatch, capsys)
    assert_one_sentence(code, err, "--seed must be in [0, 2^63)")
    assert not (tmp_path / "b").exists() and not (tmp_path / "r").exists() and not (tmp_path / "s").exists()


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_an_infinite_learning_rate_is_refused_up_front(tiny_npz, tmp_path, monkeypatch, capsys, value):
    code, _, err = run_main(_buffer_args(tiny_npz, tmp_path / "b", "--lr", value), monkeypatch, capsys)
    assert_one_sentence(code, err, "--lr must be")
    assert not (tmp_path / "b").exists()


def test_a_config_file_that_is_not_utf8_is_one_sentence(tiny_npz, tmp_path, monkeypatch, capsys):
    conf = tmp_path / "latin1.toml"
    conf.write_bytes('augment = "none"  # größer\n'.encode("latin-1"))
    code, _, err = run_main([*_buffer_args(tiny_npz, tmp_path / "b"), "--config", str(conf)], monkeypatch, capsys)
    assert_one_sentence(code, err, "is not UTF-8")


def test_a_too_long_file_name_is_one_sentence(tiny_npz, tmp_path, monkeypatch, capsys):
    long = tmp_path / ("x" * 300)
    for args in (_buffer_args(tiny_npz, long), ["inspect", str(long) + ".h5"],
                 ["eval", "--test", str(long) + ".npz", "--baseline", "random-real"]):
        code, _, err = run_main(args, monkeypatch, capsys)
        assert_one_sentence(code, err)


def test_a_buffer_whose_folder_vanishes_mid_run_exits_1(tiny_npz, tmp_path, monkeypatch, capsys):
    import distill.buffer

    out = tmp_path / "b"
    real = distill.buffer.train_network

    def vanish(*args, **kwargs):
        shutil.rmtree(out)
        return real(*args, **kwargs)

    monkeypatch.setattr(distill.buffer, "train_network", vanish)
    code, _, err = run_main(_buffer_args(tiny_npz, out), monkeypatch, capsys)
    assert_one_sentence(code, err, "disappeared")
    assert not expert_path(out, 0).exists()
