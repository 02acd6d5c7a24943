"""Settings: one frozen dataclass per stage in config.py, type-checked in one place, defaults shown from there."""
from __future__ import annotations

import dataclasses
import re

import pytest

from distill import cli as cli_mod
from distill.config import (AuditSettings, BufferConfig, EvalConfig, ExportConfig, InspectConfig, RunConfig, build,
                            default_text, load_toml)
from distill.errors import DistillError
from test_cli_errors import assert_one_sentence, run_main

CONFIGS = (BufferConfig, RunConfig, EvalConfig, AuditSettings, ExportConfig, InspectConfig)


@pytest.mark.parametrize("cls, key, value, expected", [
    (BufferConfig, "epochs", "three", "an integer"),
    (BufferConfig, "experts", 1.5, "an integer"),
    (BufferConfig, "augment", 7, "a string"),
    (BufferConfig, "lr", "0.01", "a number"),
    (BufferConfig, "zca", 1, "a boolean"),
    (RunConfig, "checkpoint_every", "5", "an integer"),
    (EvalConfig, "shares", [1], "a list of strings"),
])
def test_a_value_of_the_wrong_type_is_one_sentence_naming_key_value_and_type(cls, key, value, expected):
    with pytest.raises(DistillError) as e:
        build(cls, {key: value})
    msg = str(e.value)
    assert key in msg and repr(value) in msg and expected in msg and msg.endswith(".") and "\n" not in msg


def test_values_of_the_right_type_are_taken_as_the_field_asks():
    cfg = build(BufferConfig, {"lr": 1, "size": 16}, {"epochs": 3})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.size == 16 and cfg.epochs == 3
    assert build(EvalConfig, {"shares": ["a.h5", "b.h5"]}).shares == ("a.h5", "b.h5")  # a TOML list
    assert build(RunConfig) == RunConfig()  # no layer: every default
    assert build(BufferConfig, {"size": None}).size is None  # None means 'not given'


@pytest.mark.parametrize("size", [0, -5])
def test_size_must_be_positive(size):
    with pytest.raises(DistillError, match="size must be at least 1"):
        build(BufferConfig, {"size": size})
    with pytest.raises(DistillError, match="size must be at least 1"):
        build(EvalConfig, {"size": size})


@pytest.mark.parametrize("toml, fragment", [
    ('epochs = "three"', "epochs = 'three'"), ("experts = 1.5", "experts = 1.5"), ("augment = 7", "augment = 7"),
    ('lr = "0.01"', "lr = '0.01'"),
])
def test_toml_values_of_the_wrong_type_exit_1_with_one_sentence(tmp_path, tiny_npz, monkeypatch, capsys, toml,
                                                                 fragment):
    conf = tmp_path / "buffer.toml"
    conf.write_text(toml + "\n")
    code, _, err = run_main(["buffer", "--data", str(tiny_npz), "--out", str(tmp_path / "b"), "--config", str(conf)],
                            monkeypatch, capsys)
    assert_one_sentence(code, err, fragment)
    assert code == 1 and not (tmp_path / "b").exists()  # refused before anything was written


@pytest.mark.parametrize("command", [["buffer", "--data", "x.npz"], ["eval", "--test", "x.npz"]])
@pytest.mark.parametrize("size", ["0", "-5"])
def test_size_flag_must_be_positive(command, size, tmp_path, monkeypatch, capsys):
    code, _, err = run_main([*command, "--size", size], monkeypatch, capsys)
    assert_one_sentence(code, err, "size must be at least 1")


def test_every_command_takes_a_config_file():
    for name, command in cli_mod.cli.commands.items():
        assert "config_file" in {p.name for p in command.params}, f"distill {name} has no --config"


def test_help_shows_the_dataclass_defaults():
    """Every "(default X)" in a help text is the default of the config field of that flag."""
    classes = {"buffer": BufferConfig, "run": RunConfig, "eval": EvalConfig, "audit": AuditSettings,
               "export": ExportConfig, "inspect": InspectConfig}
    checked = 0
    for name, command in cli_mod.cli.commands.items():
        cls = classes.get(name)
        if cls is None:
            continue
        names = {f.name for f in dataclasses.fields(cls)}
        for p in command.params:
            shown = re.search(r"\(default [^:;)]+\)", p.help or "")
            if shown and p.name in names:
                assert shown.group(0) == default_text(cls, p.name), (name, p.name, p.help)
                checked += 1
    assert checked >= 25  # the check above really ran over the flags


def test_export_and_audit_settings_come_from_a_config_file(tmp_path, monkeypatch, capsys):
    conf = tmp_path / "audit.toml"
    conf.write_text('networks = "two"\n')
    code, _, err = run_main(["audit", str(tmp_path), "--data", "x.npz", "--config", str(conf)], monkeypatch, capsys)
    assert_one_sentence(code, err, "networks = 'two'", "an integer")
    conf.write_text("licence = 1\n")  # a misspelt key is named, with the valid ones
    code, _, err = run_main(["export", str(tmp_path), "--out", str(tmp_path / "s.h5"), "--config", str(conf)],
                            monkeypatch, capsys)
    assert_one_sentence(code, err, "licence", "license")


def test_saved_configs_read_back_equal(tmp_path):
    from distill.config import save_toml

    for cls in CONFIGS:
        if cls is EvalConfig:
            cfg = cls(shares=("a.h5",), baselines=("full",), size=8, model_kwargs={"width": 8})
        else:
            cfg = cls()
        save_toml(cfg, tmp_path / "c.toml")
        assert build(cls, load_toml(tmp_path / "c.toml")) == cfg


def test_an_export_config_file_reaches_the_share(tmp_path, monkeypatch, capsys):
    import shutil
    from pathlib import Path

    from distill.formats import load_share

    run = tmp_path / "run"
    shutil.copytree(Path(__file__).parent / "data" / "legacy_v1" / "run", run)
    conf = tmp_path / "export.toml"
    conf.write_text('license = "CC0-1.0"\ndescription = "from the config file"\n')
    code, out, err = run_main(["export", str(run), "--out", str(tmp_path / "s.h5"), "--config", str(conf),
                               "--description", "from the flag"], monkeypatch, capsys)
    assert code == 0, err
    share = load_share(tmp_path / "s.h5")
    assert share.license == "CC0-1.0" and share.description == "from the flag"  # the flag beats the file


# ----------------------------------------------------------------------------- ranges, in one style


def test_every_range_names_a_real_field_and_the_defaults_pass():
    from distill.config import ALLOWED, check_ranges

    for cls, table in ALLOWED.items():
        names = {f.name for f in dataclasses.fields(cls)}
        assert set(table) <= names, f"{cls.__name__}: {set(table) - names} are not fields"
        check_ranges(cls())  # the shipped defaults are allowed


@pytest.mark.parametrize("cls, key, value, message", [
    (BufferConfig, "batch_experts", -1, "--batch-experts must be 0 (auto) or at least 1; got -1."),
    (BufferConfig, "lr", 0.0, "--lr must be positive; got 0.0."),
    (BufferConfig, "snapshot_dtype", "int8", "--snapshot-dtype must be one of float32, float16, bfloat16; got 'int8'."),
    (RunConfig, "momentum", 1.0, "momentum must be in [0, 1); got 1.0."),
    (RunConfig, "lr_lr", -0.1, "lr_lr must be 0 (fixed step size) or positive; got -0.1."),
    (RunConfig, "iterations", -1, "--iterations must be 0 or more; got -1."),
    (RunConfig, "fast", "turbo", "--fast must be one of auto, graphs, compile, eager; got 'turbo'."),
])
def test_a_value_out_of_range_is_one_sentence_through_build_and_the_stage(cls, key, value, message):
    from distill.config import check_ranges

    with pytest.raises(DistillError) as built:
        build(cls, {key: value})
    assert str(built.value) == message
    # A config made in Python, without build(), meets the same check when its stage validates it.
    with pytest.raises(DistillError) as direct:
        check_ranges(dataclasses.replace(cls(), **{key: value}))
    assert str(direct.value) == message


def test_stages_validate_through_the_one_table(tmp_path):
    from distill.buffer import validate as validate_buffer
    from distill.mtt.distiller import validate as validate_run

    with pytest.raises(DistillError, match="--experts must be at least 1; got 0"):
        validate_buffer(dataclasses.replace(BufferConfig(), experts=0))
    with pytest.raises(DistillError, match="checkpoint_every must be at least 1; got 0"):
        validate_run(dataclasses.replace(RunConfig(), checkpoint_every=0))
    with pytest.raises(DistillError, match="--pairs must be 0 or more; got -1"):
        AuditSettings(pairs=-1)


def test_a_written_config_names_its_format_and_reads_back(tmp_path):
    from distill.config import save_toml

    save_toml(RunConfig(ipc=3), tmp_path / "config.toml")
    raw = load_toml(tmp_path / "config.toml")
    assert raw["format"] == "distill-run-config" and raw["format_version"] == "1.0"
    assert build(RunConfig, raw) == RunConfig(ipc=3)
    with pytest.raises(DistillError, match=r"format version 2\.0.*Upgrade distill"):
        build(RunConfig, {**raw, "format_version": "2.0"})
    with pytest.raises(DistillError, match="is a distill-run-config, not a distill-buffer-config"):
        build(BufferConfig, raw)


def test_random_real_per_class_keeps_its_flag_and_toml_name(tmp_path, monkeypatch, capsys):
    """EvalConfig.real_per_class (random real images per class) is still --ipc and `ipc` in TOML."""
    assert build(EvalConfig, {"ipc": 3}) == EvalConfig(real_per_class=3) == build(EvalConfig, {"real_per_class": 3})
    with pytest.raises(DistillError, match=r"^--ipc must be"):
        build(EvalConfig, {"ipc": 0})
    for flag in ("--ipc", "--real-per-class"):
        code, _, err = run_main(["eval", "--baseline", "random-real", "--test", str(tmp_path / "none.npz"), flag, "0"],
                                monkeypatch, capsys)
        assert_one_sentence(code, err, "--ipc must be at least 1")
