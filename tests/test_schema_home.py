"""Every exchanged file has one home under distill/formats/ (issue 26): no other module of the package spells a
known file name (a ``*_FILE`` or ``*_JSON`` constant of formats/) or a ``"format"``/``"format_version"`` key.

Parsed with ``ast`` (nothing is imported): string literals count, comments and docstrings' prose do not,
because a literal is matched whole (or as a path ending in ``/NAME``), never as a word inside a sentence.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "distill"
FORMATS = PACKAGE / "formats"
FORMAT_KEYS = ("format", "format_version")

# module -> why it may spell a format key. Not for file names.
ALLOWED_FORMAT_KEYS = {
    # The TOML schema of every stage's settings (config.toml, --config): it cannot import formats/, which
    # imports it, without an import circle.
    "distill/config.py": "the stage configs' own TOML schema (FILE_KEYS)",
}


def _known_file_names() -> set[str]:
    names = set()
    for path in FORMATS.glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                    and isinstance(node.value.value, str)):
                if any(isinstance(t, ast.Name) and t.id.endswith(("_FILE", "_JSON")) for t in node.targets):
                    names.add(node.value.value)
    return names


def _offenders(source: str, module: str, known: set[str]) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            continue
        text = node.value
        if text in known or any(text.endswith("/" + name) for name in known):
            out.append(f"{module}:{node.lineno}: file name {text!r}")
        elif text in FORMAT_KEYS and module not in ALLOWED_FORMAT_KEYS:
            out.append(f"{module}:{node.lineno}: format key {text!r}")
    return out


def test_the_known_names_are_those_of_the_exchanged_files():
    assert {"config.toml", "checkpoint.pt", "metrics.jsonl", "audit.json", "synthetic.h5", "preprocessing.h5",
            "split.json", "dp.json"} <= _known_file_names()


def test_the_checker_finds_a_planted_name_and_key_but_not_prose():
    known = _known_file_names()
    planted = 'p = rundir / "metrics.jsonl"\nq = f"{out}/audit.json"\nd = {"format": "x"}\n'
    assert len(_offenders(planted, "distill/x.py", known)) == 3
    prose = '"""Writes metrics.jsonl."""\nmsg = f"{p} has no config.toml naming its data"\n'
    assert _offenders(prose, "distill/x.py", known) == []


def test_no_module_outside_formats_spells_a_file_name_or_a_format_key():
    known = _known_file_names()
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if FORMATS in path.parents:
            continue
        module = path.relative_to(PACKAGE.parent).as_posix()
        offenders += _offenders(path.read_text(), module, known)
    assert not offenders, "use the constants of distill/formats/ instead:\n" + "\n".join(offenders)
