"""Property-based test of the share reader (issue 27, item 7): a share is untrusted input.

Hypothesis mutates a valid share (truncations, flipped bytes, changed or deleted attributes,
datasets of another dtype or shape, recipe fields, text fields), sometimes recomputing both
checksums as an attacker would, so the checks behind them are reached too. Whatever it makes,
reading it ends in a valid share or one clean :class:`~distill.errors.DistillError` sentence:
never another exception, never a hang (each example is time-boxed by Hypothesis's deadline).

Profiles (``HYPOTHESIS_PROFILE``): ``ci`` (the default) runs in well under a minute on one
CPU core; ``nightly`` runs many more examples with a longer deadline:

    HYPOTHESIS_PROFILE=nightly python -m pytest -q tests/test_share_fuzz.py
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from datetime import timedelta
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distill.checks import check_share_recipe
from distill.errors import DistillError
from distill.export import export_share
from distill.formats import load_share
from test_share import _text, make_run, restamp

# The deadline is the hang guard: a valid share reads in about 0.1 s, and the machines running CI are shared.
settings.register_profile("ci", max_examples=120, deadline=timedelta(seconds=10), derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("nightly", max_examples=5000, deadline=timedelta(seconds=30),
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")

# Objects of a share and the attributes they carry (schema: docs/share-format.md).
PATHS = ["/", "images", "labels", "label_logits", "class_names", "preprocessing", "recipe", "provenance", "privacy"]
ATTRS = ["format", "format_version", "created", "payload_sha256", "content_sha256", "num_images", "num_classes",
         "license", "description", "citation", "space", "images_per_class", "kind", "temperature", "target", "size",
         "channels", "zca", "zca_eps", "model", "model_kwargs", "lr", "epochs", "batch_size", "momentum",
         "weight_decay", "lr_decay", "augment", "loss", "method", "experts", "dataset", "software", "audit_status",
         "forced", "summary", "statement", "audit_created", "epsilon"]
DATASETS = ["images", "labels", "label_logits", "class_names", "preprocessing/mean", "preprocessing/std"]

hostile_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40) | st.sampled_from(
    ["", "none", "convnet3", "resnet18", "1.1", "2.0", "1.x", "distill-share", "half", "cross_entropy",
     "soft_cross_entropy", "benign\x1b[2J\x07\r", "{}", '{"width": 300000}', '{"depth": 99}', '{"norm": "batch"}',
     "[]", "null", '{"a": NaN}', "\u202e"])
numbers = (st.integers(min_value=-(2 ** 63), max_value=2 ** 63 - 1) | st.sampled_from([0, 1, 2, 10 ** 12, -1])
           | st.floats(allow_nan=True, allow_infinity=True))
arrays = st.builds(lambda dtype, shape, fill: np.full(shape, fill).astype(dtype),
                   st.sampled_from(["float32", "float64", "int64", "int8", "uint8", "bool", "S4"]),
                   st.lists(st.integers(0, 4), min_size=0, max_size=4).map(tuple), st.integers(-3, 300))


def _set_attr(f: h5py.File, path: str, name: str, value) -> None:
    obj = f[path]
    if value is None:
        if name in obj.attrs:
            del obj.attrs[name]
    elif isinstance(value, str):
        _text(obj, name, value)
    elif isinstance(value, np.ndarray):
        obj.attrs[name] = value
    elif isinstance(value, float):
        obj.attrs[name] = np.float64(value)
    else:
        obj.attrs[name] = np.int64(value)


def _replace_dataset(f: h5py.File, path: str, data: np.ndarray) -> None:
    if path in f:
        del f[path]
    f.create_dataset(path, data=data)


edit = st.one_of(
    st.tuples(st.just("attr"), st.sampled_from(PATHS), st.sampled_from(ATTRS),
              st.none() | hostile_text | numbers | arrays),
    st.tuples(st.just("recipe"), st.sampled_from(["model", "model_kwargs", "lr", "epochs", "batch_size", "momentum",
                                                   "weight_decay", "lr_decay", "augment", "loss"]),
              hostile_text | numbers),
    st.tuples(st.just("text"), st.sampled_from(["description", "citation", "license", "created"]), hostile_text),
    st.tuples(st.just("dataset"), st.sampled_from(DATASETS), arrays),
    st.tuples(st.just("delete"), st.sampled_from(DATASETS + ["recipe", "privacy", "provenance", "preprocessing"])),
)
mutation = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(0, 255)),
    st.tuples(st.just("edits"), st.lists(edit, min_size=1, max_size=3), st.booleans()),
)


def _apply(path: Path, m: tuple) -> None:
    if m[0] in ("truncate", "flip"):
        data = bytearray(path.read_bytes())
        at = min(int(m[1] * len(data)), len(data) - 1)
        path.write_bytes(bytes(data[:at]) if m[0] == "truncate" else bytes(data[:at]) + bytes([m[2]]) + bytes(data[at + 1:]))
        return
    _, edits, fix_checksums = m
    with h5py.File(path, "r+") as f:
        for e in edits:
            kind = e[0]
            if kind == "attr":
                if e[1] == "/" or e[1] in f:
                    _set_attr(f, e[1], e[2], e[3])
            elif kind == "recipe":
                if "recipe" in f:  # an earlier edit may have deleted it
                    _set_attr(f, "recipe", e[1], e[2])
            elif kind == "text":
                _set_attr(f, "/", e[1], e[2])
            elif kind == "dataset":
                _replace_dataset(f, e[1], e[2])
            elif e[1] in f:
                del f[e[1]]
    if fix_checksums:
        try:
            restamp(path)  # the attacker's part; some edits leave nothing to hash, which the reader refuses anyway
        except (KeyError, ValueError, TypeError, OSError, RuntimeError, DistillError):
            pass


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    path = export_share(make_run(root / "run"), root / "share.h5")
    check_share_recipe(load_share(path), str(path))  # first-call imports stay out of the examples' time
    return path


@settings(settings.get_profile(PROFILE))
@given(m=mutation)
def test_a_mutated_share_is_valid_or_refused_in_one_sentence(template, tmp_path_factory, m):
    path = tmp_path_factory.getbasetemp() / "fuzzed.h5"
    shutil.copyfile(template, path)
    _apply(path, m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a newer minor version is read with a warning
        try:
            share = load_share(path)
            check_share_recipe(share, str(path))
        except DistillError as e:
            text = str(e)
            assert text.strip() and "\n" not in text and "Traceback" not in text
            return
    # A share that passed is usable: every summary renders, and the training targets exist.
    json.dumps(share.summary(), allow_nan=False)
    assert "\x1b" not in share.describe()
    assert share.targets().shape[0] == share.num_images


# Cases Hypothesis found, kept so that the CI profile replays them. Hypothesis found the first as a flip at
# a fixed offset; offsets move whenever the format gains a field, so the byte is found by name here.
@pytest.mark.parametrize("name", [b"audit_status", b"num_images", b"payload_sha256"])
def test_found_by_hypothesis_attribute_name_not_utf8(template, tmp_path, name):
    """An attribute name that is no longer UTF-8 (h5py hands it back as bytes) is refused in one sentence."""
    path = tmp_path / "found.h5"
    data = bytearray(template.read_bytes())
    at = data.find(name)
    assert at >= 0, name
    data[at] = 0x80
    path.write_bytes(bytes(data))
    with pytest.raises(DistillError):
        load_share(path)
