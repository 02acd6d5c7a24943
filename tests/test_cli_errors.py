"""Bad input to ``distill buffer``: one clear sentence on stderr and a non-zero exit, never a traceback.

The checks go through ``distill.cli:main`` (the console script), which turns
:class:`~distill.errors.DistillError` into ``Error: <sentence>``.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_main(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["distill", *args])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_sentence(code: int, err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("INFO ", "WARNING "))]
    assert code != 0
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith("Error: ") and lines[0].rstrip().endswith("."), lines[0]
    for f in fragments:
        assert f in lines[0], lines[0]


def _buffer(data, out, *extra) -> list[str]:
    return ["buffer", "--data", str(data), "--out", str(out), "--experts", "1", "--epochs", "1", "--device", "cpu",
            *extra]


def _npz(path: Path, arrays: dict) -> Path:
    np.savez(path, **arrays)
    return path


def test_missing_path(tmp_path, monkeypatch, capsys):
    code, _, err = run_main(_buffer(tmp_path / "nowhere.npz", tmp_path / "out"), monkeypatch, capsys)
    assert_one_sentence(code, err, "nowhere.npz", "neither an existing path nor a known MedMNIST name")


def test_wrong_npz_keys(tmp_path, tiny_arrays, monkeypatch, capsys):
    arrays = {k.replace("train_", "trn_"): v for k, v in tiny_arrays().items()}
    code, _, err = run_main(_buffer(_npz(tmp_path / "keys.npz", arrays), tmp_path / "out"), monkeypatch, capsys)
    assert_one_sentence(code, err, "lacks the MedMNIST keys train_images, train_labels")


def test_image_and_label_counts_disagree(tmp_path, tiny_arrays, monkeypatch, capsys):
    arrays = tiny_arrays()
    arrays["val_labels"] = arrays["val_labels"][:-1]
    code, _, err = run_main(_buffer(_npz(tmp_path / "count.npz", arrays), tmp_path / "out"), monkeypatch, capsys)
    assert_one_sentence(code, err, "val has 8 images but 7 labels")


def test_folder_with_one_class(tmp_path, monkeypatch, capsys):
    (tmp_path / "ds" / "normal").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((8, 8), 10 * i, np.uint8)).save(tmp_path / "ds" / "normal" / f"{i}.png")
    code, _, err = run_main(_buffer(tmp_path / "ds", tmp_path / "out"), monkeypatch, capsys)
    assert_one_sentence(code, err, "at least two class sub-folders; found 1")


def test_unknown_model(tiny_npz, tmp_path, monkeypatch, capsys):
    code, _, err = run_main(_buffer(tiny_npz, tmp_path / "out", "--model", "convnet9"), monkeypatch, capsys)
    assert_one_sentence(code, err, "Unknown model 'convnet9'", "convnet3")


def test_model_too_deep_for_the_images(tiny_npz, tmp_path, monkeypatch, capsys):
    code, _, err = run_main(_buffer(tiny_npz, tmp_path / "out", "--model", "convnet5"), monkeypatch, capsys)
    assert_one_sentence(code, err, "at least 32 pixels")


@pytest.mark.parametrize("flag, value", [("--epochs", "0"), ("--epochs", "-3"), ("--experts", "0")])
def test_non_positive_counts(tiny_npz, tmp_path, monkeypatch, capsys, flag, value):
    args = _buffer(tiny_npz, tmp_path / "out")
    args[args.index(flag) + 1] = value
    code, _, err = run_main(args, monkeypatch, capsys)
    assert_one_sentence(code, err, f"{flag} must be at least 1; got {value}")
    assert not list(tmp_path.glob("out/expert_*.h5"))


def test_unwritable_output_folder(tiny_npz, tmp_path, monkeypatch, capsys):
    # A regular file where a folder should be: unwritable even for root, unlike a chmod.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_main(_buffer(tiny_npz, blocker / "out"), monkeypatch, capsys)
    assert_one_sentence(code, err, "is not writable")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_gpu(tiny_npz, tmp_path, monkeypatch, capsys):
    args = _buffer(tiny_npz, tmp_path / "out")
    args[args.index("--device") + 1] = "cuda"
    code, _, err = run_main(args, monkeypatch, capsys)
    assert_one_sentence(code, err, "no CUDA GPU is available")


def test_bad_config_file(tiny_npz, tmp_path, monkeypatch, capsys):
    (tmp_path / "bad.toml").write_text("[x\n")
    (tmp_path / "unknown.toml").write_text("colour = 3\n")
    for name, message in (("bad.toml", "is not valid TOML"), ("unknown.toml", "Unknown setting 'colour'")):
        args = _buffer(tiny_npz, tmp_path / "out", "--config", str(tmp_path / name))
        code, _, err = run_main(args, monkeypatch, capsys)
        assert_one_sentence(code, err, message)


def test_unknown_augmentation(tiny_npz, tmp_path, monkeypatch, capsys):
    code, _, err = run_main(_buffer(tiny_npz, tmp_path / "out", "--augment", "flip,blur"), monkeypatch, capsys)
    assert_one_sentence(code, err, "Unknown augmentation blur")


def test_resume_with_another_size_is_refused_before_training(tiny_npz, tmp_path, monkeypatch, capsys):
    assert run_main(_buffer(tiny_npz, tmp_path / "out"), monkeypatch, capsys)[0] == 0
    args = _buffer(tiny_npz, tmp_path / "out", "--size", "16")
    args[args.index("--experts") + 1] = "2"
    code, _, err = run_main(args, monkeypatch, capsys)
    assert_one_sentence(code, err, "1x16x16", "--size")
    assert not (tmp_path / "out" / "expert_0001.h5").exists()


def test_console_script_exit_code_and_stderr(tmp_path, subprocess_env):
    """The real process: exit status 1 and one line on stderr, as a shell user sees it."""
    proc = subprocess.run([sys.executable, "-m", "distill.cli", *_buffer(tmp_path / "missing", tmp_path / "out")],
                          cwd=REPO_ROOT, env=subprocess_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert_one_sentence(proc.returncode, proc.stderr, "neither an existing path")


# ----------------------------------------------------------------------------- paths of the wrong kind, every command


@pytest.mark.parametrize("args, fragment", [
    (["eval", "{dir}", "--test", "{file}"], "is a directory"),  # click-level: a folder where a share file goes
    (["eval", "--baseline", "full", "--test", "{file}", "--json", "{dir}"], "is a directory"),
    (["buffer", "--data", "{file}", "--out", "{dir}/b", "--config", "{dir}"], "is a directory"),
    (["report", "{file}", "--out", "{dir}"], "is a directory"),
    (["audit", "{file}", "--data", "{dir}", "--pairs-png", "{dir}"], "is a directory"),
    (["inspect", "{dir}"], "is not a file"),
    (["inspect", "{file}"], "not a readable HDF5 file"),
    (["audit", "{file}", "--data", "{dir}"], "not a readable HDF5 file"),
    (["buffer", "--data", "{file}", "--out", "{dir}/b"], "not a .npz file or a folder"),
    (["export", "{dir}", "--out", "{dir}"], "is a folder"),
    (["eval", "--bogus"], "No such option"),
])
def test_every_command_answers_a_wrong_kind_of_path_in_one_sentence(args, fragment, tmp_path, monkeypatch, capsys):
    folder, file = tmp_path / "folder", tmp_path / "notes.txt"
    folder.mkdir()
    file.write_text("not data")
    args = [a.format(dir=folder, file=file) for a in args]
    code, _, err = run_main(args, monkeypatch, capsys)
    assert code == 1, err  # click's usage errors exited 2 with its usage block
    assert_one_sentence(code, err, fragment)


def test_help_still_exits_zero(monkeypatch, capsys):
    for args in (["--help"], ["eval", "--help"], []):
        code, out, _ = run_main(args, monkeypatch, capsys)
        assert code == 0 and "Usage:" in out
