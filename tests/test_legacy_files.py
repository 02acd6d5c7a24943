"""Files written before the format modules were gathered under distill/formats/ (git 5bd3815) still load.

The files in tests/data/legacy_v1/ were made by that code from the noise set of
conftest.make_tiny_arrays (see the README there); they are never regenerated.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.formats import load_share
from distill.formats.synset import read_synset
from distill.formats.trajectory import list_experts, read_buffer_preprocessing, read_expert
from distill.models import create_model, load_flat

LEGACY = Path(__file__).parent / "data" / "legacy_v1"


def test_the_old_share_loads_and_trains_a_recipient(tiny_npz):
    from distill.evaluate import EvalConfig, evaluate

    share = load_share(LEGACY / "share.h5")  # the reader checks the payload hash and every limit
    assert share.images.shape == (2, 1, 8, 8) and share.class_names == ["0", "1"]
    assert share.recipe.model == "convnet" and share.recipe.model_kwargs == {"width": 4}
    assert share.privacy["audit_status"] == "passed"
    assert share.provenance["dataset"]["name"] == "custom"
    report = evaluate(EvalConfig(shares=(str(LEGACY / "share.h5"),), test=str(tiny_npz), baselines=("none",),
                                 runs=1, epochs=1, device="cpu"))
    assert report["results"][0]["trained_on"]["images"] == 2


def test_the_old_share_carries_no_path_or_real_image():
    share = load_share(LEGACY / "share.h5")
    text = repr(share.provenance) + repr(share.privacy)
    assert "/" not in text.replace("n/a", "") and "tiny.npz" not in text


def test_the_old_buffer_loads(tiny_npz):
    experts = list_experts(LEGACY / "buffer")
    assert [p.name for p in experts] == ["expert_0000.h5"]
    e = read_expert(experts[0])
    assert e.num_snapshots == 3 and e.attrs["snapshot_dtype"] == "float16"
    assert e.model_kwargs == {"width": 4} and e.train["epochs"] == 2
    net = create_model(e.attrs["model"], int(e.attrs["num_classes"]), int(e.attrs["channels"]), int(e.attrs["size"]),
                       **e.model_kwargs)
    load_flat(net, e.snapshots([e.num_snapshots - 1])[0])
    assert torch.isfinite(net(torch.zeros(1, 1, 8, 8))).all()
    pre, fingerprint, _ = read_buffer_preprocessing(LEGACY / "buffer")
    assert pre.size == 8 and not pre.zca and fingerprint["sha256"] == e.fingerprint["sha256"]


def test_the_old_run_folder_loads_and_its_audit_reads():
    from distill.privacy import load_subject, read_audit

    s = read_synset(LEGACY / "run")
    assert s.images.shape == (2, 1, 8, 8) and s.label_logits is not None
    audit = read_audit(LEGACY / "run")
    assert audit.passed is True and "membership" in audit.summary
    subject = load_subject(LEGACY / "run")
    assert subject.recipe.epochs == 300 and np.isclose(subject.recipe.lr, s.syn_lr)


def test_a_run_can_go_on_from_the_old_buffer(tiny_npz, tmp_path):
    from distill.config import RunConfig
    from distill.mtt import distill_run

    buffer = tmp_path / "buffer"
    shutil.copytree(LEGACY / "buffer", buffer)
    cfg = RunConfig(buffer=str(buffer), out=str(tmp_path / "run"), data=str(tiny_npz), ipc=1,
                    iterations=1, syn_steps=1, expert_epochs=1, max_start_epoch=1, eval_every=0, eval_models=0,
                    device="cpu")
    out = distill_run(cfg)
    assert read_synset(out).images.shape == (2, 1, 8, 8)


def test_the_old_buffer_config_reads_through_its_schema(tmp_path):
    from distill.config import BufferConfig
    from distill.formats.buffer_config import read_buffer_config

    cfg = read_buffer_config(LEGACY / "buffer")
    assert isinstance(cfg, BufferConfig) and cfg.data == "tiny.npz" and cfg.snapshot_dtype == "float16"
    assert cfg.size is None and cfg.seed == 0
    assert read_buffer_config(tmp_path) is None  # no config.toml: the caller needs --data
    # A key from a newer version is ignored, so this reader still finds the data.
    (tmp_path / "config.toml").write_text((LEGACY / "buffer" / "config.toml").read_text() + "future_knob = 3\n")
    assert read_buffer_config(tmp_path) == cfg


def test_the_audit_of_the_old_run_repeats_its_old_summary(tiny_npz, tmp_path):
    """The audit, now a package of stages, computes what the single module computed.

    Everything that trains no network (data, nearest neighbours, flags, verdict) repeats to float noise.
    The membership attack trains networks with DSA, whose random draws changed on purpose with the
    one-pass augmentation (issue 11), so there only the layout (keys, list lengths) must repeat.
    """
    import json

    from distill.privacy import run_audit

    run = tmp_path / "run"
    shutil.copytree(LEGACY / "run", run)
    old = json.loads((LEGACY / "run" / "audit.json").read_text())
    s = old["summary"]["settings"]
    report = run_audit(run, tiny_npz, networks=s["networks"], epochs=s["epochs"], expert_epochs=s["expert_epochs"],
                       bootstrap=s["bootstrap"], pairs=s["pairs"], seed=s["seed"], device="cpu")
    # The old run records no split; the summary now says which one the audit assumed (issue 17).
    assert report.summary["data"].pop("split") == {"recorded": False, "method": "official"}
    # Equal up to float noise another CPU's BLAS may add; keys, counts and verdict exactly.
    new_s, old_s = dict(report.summary), dict(old["summary"])
    new_m, old_m = new_s.pop("membership"), old_s.pop("membership")
    assert _close(new_s, old_s), (new_s, old_s)
    assert _layout(new_m) == _layout(old_m)
    assert report.document()["subject_sha256"] == old["subject_sha256"]


def _layout(a):
    """The shape of a JSON document: its keys and list lengths, with every number replaced by its type."""
    if isinstance(a, dict):
        return {k: _layout(v) for k, v in a.items()}
    if isinstance(a, list):
        return [_layout(x) for x in a]
    return type(a).__name__ if isinstance(a, (int, float)) and not isinstance(a, bool) else a


def _close(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return abs(a - b) <= 1e-4
    return a == b
