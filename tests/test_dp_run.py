"""Issue 23, part B: ``distill run`` on a DP buffer is post-processing, and the share states the guarantee.

A DP buffer here is a tiny ordinary buffer with a DPRecord written into its ``dp.json``
(and DP class means into ``dp_stats.h5``), as ``distill buffer --dp-epsilon`` writes them.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import TINY_CLASSES, TINY_SIZE, make_tiny_arrays
from distill.buffer import build_buffer
from distill.config import BufferConfig, RunConfig
from distill.errors import DistillError
from distill.export import export_share
from distill.formats import load_share
from distill.formats.dp_record import (DP_STATS_CLASS_MEANS, DP_STATS_FILE, DP_STATS_FORMAT, DP_STATS_VERSION, DPRecord,
                                       dp_path)
from distill.formats.buffer_config import read_buffer_config
from distill.formats.share_schema import NO_GUARANTEE
from distill.formats.synset import read_synset
from distill.mtt import distill_run
from distill.mtt.dpmode import DP_MEANS_JITTER
from distill.formats.run import read_metrics
from distill.report import write_report
from test_share import run_cli

LEGACY = Path(__file__).resolve().parent / "data" / "legacy_v1"
RECORD = DPRecord(epsilon=8.0, delta=1e-5, accountant="prv", noise_multiplier=1.1, clip=1.0, sample_rate=0.25,
                  steps=12, experts=2, shards=1, train_size=20, opacus_version="1.6.0", stats="class_means",
                  stats_epsilon=0.5, sgd_epsilon=7.5)


def _dp_buffer(root: Path, *, stats: bool = True) -> Path:
    """A tiny buffer (2 experts, 2 classes x 10 images of 8x8) made a DP buffer by its dp.json (and dp_stats.h5)."""
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "tiny.npz", **make_tiny_arrays())
    out = root / "buffer"
    build_buffer(BufferConfig(data=str(root / "tiny.npz"), out=str(out), experts=2, epochs=2, batch_size=5,
                              snapshot_every=2, augment="none", device="cpu"))
    dp_path(out).write_text(RECORD.to_json(), encoding="utf-8")
    if stats:
        means = torch.stack([torch.full((1, 1, TINY_SIZE, TINY_SIZE), v) for v in (-1.0, 1.0)]).numpy()
        with h5py.File(out / DP_STATS_FILE, "w") as f:
            f.attrs["format"], f.attrs["format_version"] = DP_STATS_FORMAT, DP_STATS_VERSION
            f.create_dataset(DP_STATS_CLASS_MEANS, data=means)
    return out


@pytest.fixture(scope="module")
def dp_buffer(tmp_path_factory) -> Path:
    return _dp_buffer(tmp_path_factory.mktemp("dp"))


def _cfg(buffer: Path, out: Path, **kw) -> RunConfig:
    base = dict(buffer=str(buffer), out=str(out), ipc=2, iterations=2, syn_steps=2, expert_epochs=1, max_start_epoch=1,
                hard_labels=False, eval_models=0, checkpoint_every=2, init="noise", device="cpu")
    return RunConfig(**{**base, **kw})


_cli = run_cli  # (monkeypatch, capsys, *args) -> (exit code, stdout, stderr)


def _recorded(rundir: Path) -> dict:
    import tomllib

    from distill.mtt.rundir import CONFIG_FILE

    return tomllib.loads((Path(rundir) / CONFIG_FILE).read_text())


# ----------------------------------------------------------------------------- the run


@pytest.mark.parametrize("init", ["real", "real-or-noise"])
def test_a_dp_run_refuses_to_start_from_real_images(dp_buffer, tmp_path, monkeypatch, capsys, init):
    code, out, err = _cli(monkeypatch, capsys, "run", "--buffer", str(dp_buffer), "--out", str(tmp_path / "r"),
                          "--init", init, "--ipc", "1", "--iterations", "1", "--device", "cpu")
    errors = [line for line in err.splitlines() if line.startswith("Error: ")]
    assert code == 1 and len(errors) == 1, err
    assert "differentially private" in errors[0] and f"--init {init} would start from patient images" in errors[0]
    assert "noise" in errors[0] and "dp-means" in errors[0] and "public:PATH" in errors[0]
    assert "Traceback" not in err and not (tmp_path / "r").exists()


def test_dp_means_needs_the_buffers_dp_statistics(tmp_path):
    bare = _dp_buffer(tmp_path / "bare", stats=False)
    with pytest.raises(DistillError, match=f"released none .{DP_STATS_FILE} is missing"):
        distill_run(_cfg(bare, tmp_path / "run", init="dp-means"))


def test_dp_means_starts_each_image_at_its_class_mean_plus_a_little_noise(dp_buffer, tmp_path, monkeypatch):
    import distill.mtt.distiller as distiller

    seen = {}
    make_state = distiller._make_state

    def spy(cfg, images, *a, **kw):
        seen["images"] = images.detach().cpu().clone()
        return make_state(cfg, images, *a, **kw)

    monkeypatch.setattr(distiller, "_make_state", spy)
    distill_run(_cfg(dp_buffer, tmp_path / "run", init="dp-means", iterations=1))
    x = seen["images"].view(TINY_CLASSES, 2, -1)  # class-major: ipc 2
    for c, mean in enumerate((-1.0, 1.0)):
        assert abs(float(x[c].mean()) - mean) < 0.1  # the DP mean of its class
        assert 0.5 * DP_MEANS_JITTER < float((x[c] - mean).std()) < 2 * DP_MEANS_JITTER
    assert not torch.equal(x[:, 0], x[:, 1])  # the two images of a class differ


def test_public_images_can_start_a_dp_run_and_travel_as_a_hash(dp_buffer, tmp_path):
    np.savez(tmp_path / "public.npz", **make_tiny_arrays(seed=7))
    out = distill_run(_cfg(dp_buffer, tmp_path / "run", init=f"public:{tmp_path / 'public.npz'}"))
    method = read_synset(out).method
    assert len(method["init_public_sha256"]) == 64
    share = load_share(export_share(out, tmp_path / "s.h5", force=True))
    assert share.provenance["method"]["init"] == "public"
    assert share.provenance["method"]["init_public_sha256"] == method["init_public_sha256"]
    assert "public.npz" not in repr(share.provenance)


def test_without_the_private_data_a_dp_run_exports_and_reports(tmp_path, monkeypatch):
    import distill.mtt.distiller as distiller

    buffer = _dp_buffer(tmp_path / "b")
    # Not even an attempt: a run that tried and fell back would pass the file check below.
    monkeypatch.setattr(distiller, "load_real_data", lambda *a, **k: pytest.fail("a DP run tried to load the real data"))
    moved = tmp_path / "elsewhere.npz"
    shutil.move(tmp_path / "b" / "tiny.npz", moved)  # the real data is gone: nothing may need it
    out = distill_run(_cfg(buffer, tmp_path / "run", init="dp-means", eval_models=1, eval_epochs=2, eval_every=1))
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals and all(r["dp"] is True and "skipped" in r["validation"] and "val_acc" not in r for r in evals)
    synset = read_synset(out)
    assert DPRecord(**{k: v for k, v in synset.dp.items() if not k.startswith("format")}) == RECORD
    share_path = export_share(out, tmp_path / "share.h5", force=True)
    page = write_report(out, tmp_path / "review.html", share=share_path).read_text(encoding="utf-8")
    assert RECORD.sentence().split(";")[0] in page
    assert "could not be used" in page  # the real-image panels say why they are missing
    assert not (tmp_path / "b" / "tiny.npz").exists() and moved.exists()


# ----------------------------------------------------------------------------- the share


@pytest.fixture(scope="module")
def dp_share(dp_buffer, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dpshare")
    out = distill_run(_cfg(dp_buffer, root / "run"))
    return export_share(out, root / "share.h5", force=True)


def test_the_dp_record_round_trips_through_the_share(dp_share):
    share = load_share(dp_share)
    assert share.format_version == "1.1"
    assert share.dp_record() == RECORD
    assert share.guarantee() == RECORD.sentence()
    with h5py.File(dp_share, "r") as f:
        stored = json.loads(bytes(f["privacy"].attrs["dp"]).decode())
    assert stored["format"] == "distill-dp-record" and stored["epsilon"] == 8.0 and stored["opacus_version"] == "1.6.0"


def test_a_dp_share_carries_no_statistic_of_the_private_data(dp_share):
    share = load_share(dp_share)
    dataset = share.provenance["dataset"]
    assert dataset["counts"] == {}
    assert "source_sha256_salted" not in dataset and "salt" not in dataset
    assert share.privacy["private_statistics"] == []


def test_a_share_without_dp_lists_the_private_statistics_it_carries(tmp_path):
    np.savez(tmp_path / "tiny.npz", **make_tiny_arrays())
    build_buffer(BufferConfig(data=str(tmp_path / "tiny.npz"), out=str(tmp_path / "buffer"), experts=1, epochs=2,
                              batch_size=5, snapshot_every=2, augment="none", device="cpu"))
    out = distill_run(_cfg(tmp_path / "buffer", tmp_path / "run"))
    share = load_share(export_share(out, tmp_path / "s.h5", force=True))
    assert share.dp_record() is None and share.guarantee() == NO_GUARANTEE
    assert "normalisation mean and std of the training images" in share.privacy["private_statistics"]
    assert any("class counts" in s for s in share.privacy["private_statistics"])
    assert share.provenance["dataset"]["counts"]["train"] == [10, 10]


def test_inspect_prints_the_privacy_status_first(dp_share, monkeypatch, capsys):
    code, out, err = _cli(monkeypatch, capsys, "inspect", str(dp_share))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"privacy: {RECORD.sentence()}"
    assert lines[1].startswith("  audit: missing (export forced).") and "outside the formal guarantee" in lines[1]


def test_a_v1_0_share_still_loads_and_states_no_guarantee(monkeypatch, capsys):
    share = load_share(LEGACY / "share.h5")
    assert share.format_version == "1.0" and share.dp_record() is None
    assert share.guarantee() == NO_GUARANTEE and share.privacy["private_statistics"] is None
    code, out, _ = _cli(monkeypatch, capsys, "inspect", str(LEGACY / "share.h5"))
    assert code == 0 and out.splitlines()[0] == f"privacy: {NO_GUARANTEE}"


def test_a_forged_dp_record_is_refused_in_one_sentence(dp_share, tmp_path):
    bad = tmp_path / "bad.h5"
    shutil.copy(dp_share, bad)
    with h5py.File(bad, "a") as f:
        text = b'{"format": "distill-dp-record", "format_version": "1.0", "epsilon": 1}'
        del f["privacy"].attrs["dp"]
        f["privacy"].attrs.create("dp", data=np.bytes_(text), dtype=h5py.string_dtype("utf-8", len(text)))
    with pytest.raises(DistillError, match="lacks a field"):
        load_share(bad)


def test_the_in_hospital_page_shows_the_audit_figures_the_share_does_not_carry(tmp_path):
    from test_share import make_run

    audit = json.loads((LEGACY / "run" / "audit.json").read_text())
    run = make_run(tmp_path / "run", audit=audit)
    share = export_share(run, tmp_path / "s.h5")
    assert load_share(share).privacy["summary"] == {}
    page = write_report(run, tmp_path / "review.html", share=share).read_text(encoding="utf-8")
    assert "<h3>Membership inference</h3>" in page  # read from the run's audit.json, not from the share
    assert page.index(NO_GUARANTEE) < page.index("<h3>Membership inference</h3>")
    assert "The audit is outside the formal guarantee" in page


# ----------------------------------------------------------------------------- parts A and B together


def test_a_real_dp_buffer_to_a_dp_share_without_the_private_data(tmp_path, monkeypatch, capsys):
    """`distill buffer --dp-epsilon` (real DP-SGD experts and DP class means), then the data moves away, and
    run, export, report and inspect still work; the share carries the buffer's record and its sentence."""
    np.savez(tmp_path / "tiny.npz", **make_tiny_arrays())
    buf = tmp_path / "buffer"
    code, _, err = _cli(monkeypatch, capsys, "buffer", "--data", str(tmp_path / "tiny.npz"), "--out", str(buf),
                        "--experts", "2", "--epochs", "2", "--batch-size", "5", "--snapshot-every", "2",
                        "--augment", "none", "--dp-epsilon", "4", "--dp-init", "class-means", "--device", "cpu")
    assert code == 0, err
    shutil.move(tmp_path / "tiny.npz", tmp_path / "elsewhere.npz")
    record = DPRecord.from_json(dp_path(buf).read_text(encoding="utf-8"))
    assert record.epsilon <= 4.0 + 1e-6 and record.stats == "class_means" and record.experts == 2
    out = distill_run(_cfg(buf, tmp_path / "run", init="dp-means", hard_labels=True))
    # The experts trained at dp.DP_LR with clipped gradients; the student starts at the reference's 0.01.
    from distill.dp import DP_LR
    assert read_buffer_config(buf).lr == pytest.approx(DP_LR) and _recorded(out)["syn_lr_init"] == pytest.approx(0.01)
    share_path = export_share(out, tmp_path / "share.h5", force=True)
    write_report(out, tmp_path / "review.html", share=share_path)
    share = load_share(share_path)
    assert share.dp_record() == record
    assert share.provenance["dataset"]["counts"] == {} and share.privacy["private_statistics"] == []
    # Normalisation is the DP mode's constants, not a statistic of the private images (tiny.npz is not 0.5/0.5).
    from distill.dp import DP_MEAN, DP_STD
    assert torch.equal(share.preprocessing.mean, torch.full_like(share.preprocessing.mean, DP_MEAN))
    assert torch.equal(share.preprocessing.std, torch.full_like(share.preprocessing.std, DP_STD))
    assert not share.preprocessing.zca
    code, text, err = _cli(monkeypatch, capsys, "inspect", str(share_path))
    assert code == 0, err
    assert text.splitlines()[0] == f"privacy: {record.sentence()}"
    assert not (tmp_path / "tiny.npz").exists()


@pytest.mark.parametrize("field,value", [("epsilon", "eight"), ("epsilon", -1), ("delta", 2.0), ("steps", 1.5),
                                         ("accountant", 7), ("epsilon", float("nan"))])
def test_a_hostile_dp_record_is_refused_not_printed(dp_share, tmp_path, monkeypatch, capsys, field, value):
    """A sender could write any JSON there; inspect must refuse it in one sentence, not crash formatting it."""
    bad = tmp_path / "bad.h5"
    shutil.copy(dp_share, bad)
    with h5py.File(bad, "a") as f:
        record = json.loads(bytes(f["privacy"].attrs["dp"]).decode())
        record[field] = value
        text = json.dumps(record).encode()
        del f["privacy"].attrs["dp"]
        f["privacy"].attrs.create("dp", data=np.bytes_(text), dtype=h5py.string_dtype("utf-8", len(text)))
    with pytest.raises(DistillError, match=field):
        load_share(bad)
    code, _, err = _cli(monkeypatch, capsys, "inspect", str(bad))
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("asked", [float("inf"), float("nan"), -3.0, True, "8", None])
def test_the_audit_reads_a_dp_budget_from_elsewhere_only_when_it_is_a_positive_number(asked):
    import dataclasses

    from distill.privacy.subject import _dp_budget

    odd = dataclasses.replace(RECORD, extra={**RECORD.extra, "epsilon_budget": asked})
    assert _dp_budget(odd) == pytest.approx(RECORD.epsilon)  # the accountant's figure, not the odd one
    fine = dataclasses.replace(RECORD, extra={**RECORD.extra, "epsilon_budget": 8})
    assert _dp_budget(fine) == 8.0 and _dp_budget(None) is None
