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


# ----------------------------------------------------------------------------- keys inside the documents

# The key classes (and key constants) of formats/ whose strings must not be spelled, as keys, by the modules that
# write or read those documents. Each module is checked against the documents it handles only, since a short key
# such as "members" or "data" means something else in another table of the same module.
MEASURES = ("PIXEL_CORRELATION", "SSIM", "FEATURE_COSINE")  # the keys of summary.nearest_neighbour
EVAL_KEYS = ("eval_report.py", ("EvalKey", "ScoredSplitKey", "RowKey", "MetricKey", "TrainedOnKey", "ShareKey",
                               "RecipeKey"), ())
AUDIT_KEYS = ("audit.py", ("SettingKey", "DataKey", "NeighbourKey", "QuantileKey", "MembershipKey", "RateKey",
                           "RmiaKey", "ReferenceKey", "CanaryKey", "DetailKey", "VerdictKey", "AuditSummary"), MEASURES)
RMIA_KEYS = ("audit.py", ("RateKey", "RmiaKey", "ReferenceKey", "CanaryKey"), ())
ATTACK_KEYS = ("audit.py", ("RateKey", "MembershipKey"), ())
NEIGHBOUR_KEYS = ("audit.py", ("NeighbourKey", "QuantileKey"), ())
# The run folder's metrics records, and the config.toml keys a reader of a finished run needs.
RUN_METRICS_KEYS = ("run.py", (), ("KIND", "ITERATION", "EVAL", "LOSS", "SYN_LR", "VAL_ACC_MEAN", "VAL_MAJORITY"))
RUN_CONFIG_KEYS = ("run.py", (), ("CONFIG_DATA", "CONFIG_BUFFER"))
KEY_USERS = {
    "distill/report.py": (EVAL_KEYS, AUDIT_KEYS, RUN_METRICS_KEYS, RUN_CONFIG_KEYS),
    "distill/audit_page.py": (AUDIT_KEYS,),
    "distill/evaluate.py": (EVAL_KEYS,),
    "distill/privacy/audit.py": (AUDIT_KEYS,),
    "distill/privacy/strong.py": (RMIA_KEYS,),
    "distill/privacy/membership.py": (ATTACK_KEYS,),
    "distill/privacy/rmia.py": (ATTACK_KEYS,),
    "distill/privacy/neighbours.py": (NEIGHBOUR_KEYS,),
    "distill/mtt/distiller.py": (RUN_METRICS_KEYS,),
}
# evaluate.py: its report writer (the row _run_arm returns, the document evaluate assigns to ``report``) and its
# plain-text table. The rest of the module (the rows' trained_on records, the cost estimate) is left for later: the
# training code there is being reworked on another branch.
KEY_SCOPES = {"distill/evaluate.py": (("_run_arm", "return"), ("evaluate", "report"), ("format_report", None))}


def _str_values(node: ast.AST) -> set[str]:
    """The strings a constant assignment gives: ``A = "a"``, ``A, B = "a", "b"`` or ``A = ("a", "b")``."""
    values = node.elts if isinstance(node, ast.Tuple) else [node]
    return {v.value for v in values if isinstance(v, ast.Constant) and isinstance(v.value, str)}


def _assigned_names(node: ast.Assign) -> set[str]:
    names = set()
    for t in node.targets:
        names |= {e.id for e in (t.elts if isinstance(t, ast.Tuple) else [t]) if isinstance(e, ast.Name)}
    return names


def _keys(home: tuple[str, tuple[str, ...], tuple[str, ...]]) -> set[str]:
    """The key strings of the given classes (constants, and a dataclass's field names) and module constants."""
    module, classes, names = home
    tree = ast.parse((FORMATS / module).read_text())
    keys, found = set(), set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name in classes:
            found.add(node.name)
            for item in node.body:
                if isinstance(item, ast.Assign):
                    keys |= _str_values(item.value)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    keys.add(item.target.id)
        elif isinstance(node, ast.Assign) and _assigned_names(node) & set(names):
            found |= _assigned_names(node) & set(names)
            keys |= _str_values(node.value)
    assert found == set(classes) | set(names), f"formats/{module} lacks {set(classes) | set(names) - found}"
    return keys


def _key_literals(tree: ast.AST) -> list[tuple[int, str]]:
    """String constants in key position: dict display keys, subscripts, .get/.pop/.setdefault's key, `in`."""
    out = []

    def add(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            out.append((node.lineno, node.value))

    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for k in node.keys:
                add(k)
        elif isinstance(node, ast.Subscript):
            add(node.slice)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("get", "pop", "setdefault") and node.args):
            add(node.args[0])
        elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
            add(node.left)
    return out


def _scopes(tree: ast.Module, module: str) -> list[ast.AST]:
    """The parts of ``module`` to check: all of it, or the KEY_SCOPES: a function, its return statements, or the
    value it assigns to a name."""
    if module not in KEY_SCOPES:
        return [tree]
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    out = []
    for name, part in KEY_SCOPES[module]:
        assert name in functions, f"{module} has no function {name}"
        f = functions[name]
        if part is None:
            found = [f]
        elif part == "return":
            found = [n for n in ast.walk(f) if isinstance(n, ast.Return)]
        else:
            found = [n.value for n in ast.walk(f) if isinstance(n, ast.Assign)
                     and any(isinstance(t, ast.Name) and t.id == part for t in n.targets)]
        assert found, f"{module}:{name} has no {part}"
        out += found
    return out


def _key_offenders(source: str, module: str, keys: set[str]) -> list[str]:
    return [f"{module}:{line}: key {text!r}" for scope in _scopes(ast.parse(source), module)
            for line, text in _key_literals(scope) if text in keys]


def test_the_key_sets_hold_the_documents_keys():
    assert {"results", "trained_on", "mean", "accuracy", "payload_sha256", "epochs"} <= _keys(EVAL_KEYS)
    assert {"membership", "verdict", "reasons", "rmia", "tpr_at_1pct_fpr", "ci95", "resolvable", "threshold",
            "median", "significantly_above_random_subset", "pixel_correlation", "ssim",
            "feature_cosine"} <= _keys(AUDIT_KEYS)
    assert {"kind", "iteration", "eval", "loss", "syn_lr", "val_acc_mean", "val_majority"} <= _keys(RUN_METRICS_KEYS)
    assert {"data", "buffer"} <= _keys(RUN_CONFIG_KEYS)


def test_the_key_checker_finds_planted_keys_but_not_values_or_prose():
    keys = _keys(AUDIT_KEYS)
    planted = ('a = s["membership"]\nb = m.get("ci95")\nc = {"reasons": []}\nd = "rmia" in m\n'
               'e = r.get(RateKey.AUC)\nlog.info("the rmia attack")\nf = {"x": "verdict"}\n')
    assert [line for line, _ in _key_literals(ast.parse(planted)) if _ in keys] == [1, 2, 3, 4]
    assert len(_key_offenders(planted, "distill/x.py", keys)) == 4


def test_no_writer_or_reader_spells_a_key_of_the_eval_report_or_the_audit_summary():
    offenders = []
    for module, homes in KEY_USERS.items():
        keys = set().union(*(_keys(h) for h in homes))
        offenders += _key_offenders((PACKAGE.parent / module).read_text(), module, keys)
    assert not offenders, ("use the key constants of distill/formats/eval_report.py, audit.py and run.py:\n"
                           + "\n".join(offenders))
