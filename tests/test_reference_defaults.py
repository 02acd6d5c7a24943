"""The reference code's step size, epochs and batch are written once, in distill/reference_defaults.py (issue 26).

Parsed with ``ast``: each place that used to spell 0.01 / 300 / 256 itself must name the constant it takes
from reference_defaults, and no other module may assign those numbers to a name that says it is a step size,
an epoch count or a batch size.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

from distill import reference_defaults

PACKAGE = Path(__file__).resolve().parents[1] / "distill"
HOME = "distill/reference_defaults.py"

# (module, "NAME" or "Class.field") -> the reference_defaults constant it must be. These all once spelled the number.
SITES = {
    # BufferConfig.lr is None (resolved in buffer.py: NETWORK_LR, or dp.DP_LR for DP experts); the
    # resolution is covered by the no-spelling check below and by tests/test_dp.py.
    ("distill/config.py", "BufferConfig.batch_size"): "BATCH",
    ("distill/config.py", "RunConfig.syn_lr_init"): "NETWORK_LR",
    ("distill/config.py", "RunConfig.eval_epochs"): "SMALL_SET_EPOCHS",
    ("distill/evaluate.py", "REAL_LR"): "NETWORK_LR",
    ("distill/evaluate.py", "REAL_EPOCHS"): "SMALL_SET_EPOCHS",
    ("distill/privacy/membership.py", "REAL_SUBSET_LR"): "NETWORK_LR",
    ("distill/train.py", "EVAL_BATCH"): "BATCH",
}
# A name that says what the number is, for each reference default.
MEANINGS = {"NETWORK_LR": re.compile(r"(^|_)lr(_init)?$", re.I), "SMALL_SET_EPOCHS": re.compile(r"epoch", re.I),
            "BATCH": re.compile(r"batch", re.I)}
# name -> why it may hold one of the numbers without being that default.
ALLOWED = {"lr_lr": "the step size of the learned step size, not of a network"}


def _source(module: str) -> ast.Module:
    return ast.parse((PACKAGE.parent / module).read_text())


def _value_of(tree: ast.Module, site: str) -> ast.AST:
    """The expression assigned to a module constant ``NAME`` or to a dataclass field ``Class.field``."""
    cls, _, name = site.rpartition(".")
    body = tree.body
    if cls:
        body = next(n.body for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    for node in body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
            return node.value
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return node.value
    raise AssertionError(f"{site} is not assigned")


def _imported_from_home(tree: ast.Module) -> set[str]:
    return {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
            and (n.module or "").endswith("reference_defaults") for a in n.names}


def _spelled(tree: ast.Module) -> list[tuple[int, str, object]]:
    """(line, name, number) of every reference number given to a name that says it is that default."""
    numbers = {getattr(reference_defaults, k): k for k in MEANINGS}
    pairs = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            pairs += [(t.id if isinstance(t, ast.Name) else getattr(t, "attr", ""), node.value) for t in node.targets]
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            pairs.append((getattr(node.target, "id", getattr(node.target, "attr", "")), node.value))
        elif isinstance(node, ast.keyword) and node.arg:
            pairs.append((node.arg, node.value))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            pairs += list(zip([x.arg for x in a.args[len(a.args) - len(a.defaults):]], a.defaults))
            pairs += [(x.arg, d) for x, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]
    out = []
    for name, value in pairs:
        if (isinstance(value, ast.Constant) and type(value.value) in (int, float) and value.value in numbers
                and MEANINGS[numbers[value.value]].search(name) and name not in ALLOWED):
            out.append((value.lineno, name, value.value))
    return out


def test_the_places_that_once_spelled_a_reference_number_name_its_constant():
    for (module, site), constant in SITES.items():
        tree = _source(module)
        value = _value_of(tree, site)
        assert isinstance(value, ast.Name) and value.id == constant, (
            f"{module}: {site} should be {constant} from distill/reference_defaults.py, not {ast.unparse(value)}")
        assert constant in _imported_from_home(tree), f"{module} does not import {constant} from reference_defaults"


def test_the_checker_sees_a_spelled_default_and_not_other_numbers():
    planted = ("lr: float = 0.01\nREAL_EPOCHS = 300\ndef f(batch_size=256, n=256): pass\ng(eval_epochs=300)\n"
               "lr_lr = 0.01\nNN_CHUNK = 256\nmomentum = 0.01\n")
    found = sorted((line, name) for line, name, _ in _spelled(ast.parse(planted)))
    assert found == [(1, "lr"), (2, "REAL_EPOCHS"), (3, "batch_size"), (4, "eval_epochs")]


def test_no_module_spells_the_reference_step_size_epochs_or_batch():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = path.relative_to(PACKAGE.parent).as_posix()
        if module != HOME:
            offenders += [f"{module}:{line}: {name} = {number!r}"
                          for line, name, number in _spelled(ast.parse(path.read_text()))]
    assert not offenders, "import the number from distill/reference_defaults.py instead:\n" + "\n".join(offenders)
