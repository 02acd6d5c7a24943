"""The .h5 share (issue 4): writer, validating reader, export gate, interop and anonymity.

Shares are made from a synthetic set built in code (2 classes x 3 images x 1x8x8),
so no test runs MTT.
"""
from __future__ import annotations

import dataclasses
import getpass
import hashlib
import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from distill.cli import main
from distill.config import RunConfig
from distill.data import fit_preprocessing, load_data
from distill.errors import DistillError, FormatError
from distill.export import METHOD_HOME_ONLY, METHOD_KEYS, export_share
from distill.formats import Recipe, load_share, write_share
from distill.formats import share_schema as S
from distill.formats.synset import SyntheticSet, write_synset
from distill.train import EVAL_BATCH, EVAL_MOMENTUM, EVAL_WEIGHT_DECAY, TrainRecipe

REPO = Path(__file__).resolve().parents[1]
N_PER_CLASS, SIZE = 3, 8
AUDIT_PASSED = {"format": "distill-audit", "format_version": "1.0", "passed": True,
                "summary": {"flagged": 0, "auc": 0.51, "verdict": {"passed": True, "reasons": []}},
                "statement": "An empirical audit is not a proof of privacy.", "created": "2025-01-01T00:00:00+00:00"}


def make_synset(seed: int = 0, *, soft: bool = True, zca: bool = False, channels: int = 1,
                method: dict | None = None, fingerprint: dict | None = None, experts: dict | None = None) -> SyntheticSet:
    g = torch.Generator().manual_seed(seed)
    real = torch.randint(0, 256, (20, channels, SIZE, SIZE), generator=g, dtype=torch.uint8)
    n = 2 * N_PER_CLASS
    return SyntheticSet(
        images=torch.randn(n, channels, SIZE, SIZE, generator=g), labels=torch.arange(2).repeat_interleave(N_PER_CLASS),
        label_logits=torch.randn(n, 2, generator=g) if soft else None, preprocessing=fit_preprocessing(real, zca=zca),
        syn_lr=0.0123, label_temperature=2.0, model="convnet3", class_names=["normal", "pneumonia"], iteration=5,
        model_kwargs={}, fingerprint=fingerprint or {"name": "pneumoniamnist", "class_names": ["normal", "pneumonia"],
                                                    "channels": channels, "size": SIZE, "sha256": "ab" * 32,
                                                    "counts": {"train": [10, 10], "val": [2, 2], "test": [4, 4]}},
        method=method if method is not None else dataclasses.asdict(RunConfig(ipc=N_PER_CLASS, eval_epochs=7,
                                                                              augment="color,crop")),
        experts=experts or {"count": 2, "epochs": 3, "snapshot_every": 0, "steps_per_epoch": 1, "snapshots": 4,
                            "train": {"epochs": 3, "lr": 0.01, "augment": "flip", "batch_size": 256}},
        software={"torch": torch.__version__, "distill": "0.1.0"},
    )


def make_run(folder: Path, audit: dict | str | None = AUDIT_PASSED, **synset_kw) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_synset(folder / "synthetic.h5", make_synset(**synset_kw))
    if isinstance(audit, dict):
        (folder / "audit.json").write_text(json.dumps(audit))
    elif isinstance(audit, str):
        (folder / "audit.json").write_text(audit)
    return folder


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> dict[str, Path]:
    """Valid shares to copy and damage: soft labels, and soft labels with ZCA."""
    root = tmp_path_factory.mktemp("templates")
    return {"soft": export_share(make_run(root / "run"), root / "soft.h5"),
            "zca": export_share(make_run(root / "run_zca", zca=True), root / "zca.h5")}


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["distill", *args])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("soft,zca,channels", [(True, False, 1), (False, False, 1), (True, True, 1), (True, False, 3)])
def test_round_trip_is_bit_identical(tmp_path, soft, zca, channels):
    s = make_synset(soft=soft, zca=zca, channels=channels)
    path = export_share(make_run(tmp_path / "run", soft=soft, zca=zca, channels=channels), tmp_path / "x.h5")
    share = load_share(path)
    assert torch.equal(share.images.view(torch.int32), s.images.view(torch.int32))  # bits, not values
    assert torch.equal(share.labels, s.labels) and share.labels.dtype == torch.int64
    if soft:
        assert torch.equal(share.label_logits, s.label_logits) and share.label_temperature == 2.0
        assert share.recipe.loss == "soft_cross_entropy"
    else:
        assert share.label_logits is None and share.recipe.loss == "cross_entropy"
    assert share.class_names == s.class_names
    assert share.preprocessing.same_as(s.preprocessing) is None
    for k, v in s.preprocessing.to_arrays().items():
        assert np.array_equal(share.preprocessing.to_arrays()[k], v)
    assert share.format_version == S.FORMAT_VERSION and re.fullmatch(r"[0-9a-f]{64}", share.payload_sha256)
    assert share.metadata["provenance"]["method"]["ipc"] == N_PER_CLASS


def test_recipe_comes_from_the_run(tmp_path):
    share = load_share(export_share(make_run(tmp_path / "run"), tmp_path / "x.h5"))
    assert share.recipe == Recipe(model="convnet3", model_kwargs={}, lr=0.0123, epochs=7, batch_size=EVAL_BATCH,
                                  momentum=EVAL_MOMENTUM, weight_decay=EVAL_WEIGHT_DECAY, lr_decay="half",
                                  augment="color,crop", loss="soft_cross_entropy")
    assert TrainRecipe.following(share.recipe).augment.transforms == ("color", "crop")


def test_expert_augmentation_is_resolved(tmp_path):
    run = make_run(tmp_path / "run", method=dataclasses.asdict(RunConfig(augment="expert")))
    share = load_share(export_share(run, tmp_path / "x.h5"))
    assert share.recipe.augment == "flip" and share.provenance["method"]["augment"] == "flip"


def test_datasets_are_chunked_and_filtered(templates):
    with h5py.File(templates["zca"], "r") as f:
        names = []
        f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        assert len(names) == 9  # images, labels, logits, class names, mean, std and the three ZCA arrays
        for name in names:
            ds = f[name]
            assert ds.chunks is not None and ds.compression == "gzip" and ds.shuffle and ds.fletcher32, name


def test_payload_sha256_follows_the_documented_bytes(templates):
    with h5py.File(templates["zca"], "r") as f:
        h = hashlib.sha256()
        for key in ("images", "labels", "label_logits", "preprocessing/mean", "preprocessing/std",
                    "preprocessing/zca_matrix", "preprocessing/zca_inverse", "preprocessing/zca_mean"):
            a = f[key][()]
            h.update(a.astype(a.dtype.newbyteorder("<")).tobytes(order="C"))
        assert f.attrs["payload_sha256"].decode() == h.hexdigest()


def test_dataset_gives_images_and_probabilities(templates):
    share = load_share(templates["soft"])
    ds = share.dataset()
    x, t = ds[4]
    assert len(ds) == 2 * N_PER_CLASS and x.shape == (1, SIZE, SIZE)
    assert t.shape == (2,) and torch.allclose(t.sum(), torch.tensor(1.0))
    assert torch.allclose(t, torch.softmax(share.label_logits[4] / 2.0, 0))


# ----------------------------------------------------------------------------- malformed corpus


def _text(obj, key: str, value: str) -> None:
    b = value.encode()
    obj.attrs.create(key, data=np.bytes_(b), dtype=h5py.string_dtype("utf-8", max(1, len(b))))


def restamp(path: Path) -> None:
    """Recompute both checksums after an edit, as a newer writer (or an attacker) would: a checksum
    is no signature, and the limits must hold for a share whose checksums match."""
    from distill.formats.share import _walk, content_sha256, payload_sha256

    with h5py.File(path, "r+") as f:
        objs = _walk(f, str(path))
        _text(f, "payload_sha256", payload_sha256({k: objs[k][()] for k in S.PAYLOAD_ORDER if k in objs}))
        _text(f, "content_sha256", content_sha256(f, _walk(f, str(path))))


def _replace(f, key: str, data=None, **kw) -> None:
    del f[key]
    f.create_dataset(key, data=data, **kw)


def _bytes(fn):
    def mutate(path: Path) -> None:
        path.write_bytes(fn(path.read_bytes()))
    return mutate


def _h5(fn, **open_kw):
    def mutate(path: Path) -> None:
        with h5py.File(path, "r+", **open_kw) as f:
            fn(f, path)
    return mutate


def _set(key, index, value):
    def fn(f, _):
        a = f[key][()]
        a[index] = value
        f[key][...] = a
    return fn


def _external_storage(f, path: Path) -> None:
    raw = path.parent / "pixels.bin"
    data = f["images"][()]
    raw.write_bytes(data.tobytes())
    _replace(f, "images", shape=data.shape, dtype=np.float32, external=[(str(raw), 0, data.nbytes)])


def _virtual(f, path: Path) -> None:
    layout = h5py.VirtualLayout(shape=(2 * N_PER_CLASS,), dtype=np.int64)
    layout[:] = h5py.VirtualSource(str(path.parent / "elsewhere.h5"), "labels", shape=(2 * N_PER_CLASS,))
    del f["labels"]
    f.create_virtual_dataset("labels", layout)


def _fletcher_damage(path: Path) -> None:
    with h5py.File(path, "r") as f:
        info = f["images"].id.get_chunk_info(0)
    raw = bytearray(path.read_bytes())
    raw[info.byte_offset + info.size // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _many_objects(f, _):
    for i in range(S.MAX_OBJECTS + 1):
        f.create_group(f"extra/g{i}")


N = 2 * N_PER_CLASS
MALFORMED = {
    # name: (template, mutation, expected words in the sentence)
    "not_hdf5": ("soft", _bytes(lambda b: b"This is a CSV file, not HDF5.\n1,2,3\n"), "not a readable HDF5"),
    "empty_file": ("soft", _bytes(lambda b: b""), "not a readable HDF5"),
    "truncated": ("soft", _bytes(lambda b: b[: len(b) // 2]), "not a readable HDF5"),
    "other_format": ("soft", _h5(lambda f, p: _text(f, "format", "distill-synthetic")), "not a distill share"),
    "no_format": ("soft", _h5(lambda f, p: f.attrs.__delitem__("format")), "not a distill share"),
    "major_version_2": ("soft", _h5(lambda f, p: _text(f, "format_version", "2.0")), "not supported"),
    "garbled_version": ("soft", _h5(lambda f, p: _text(f, "format_version", "one")), "MAJOR.MINOR"),
    "missing_images": ("soft", _h5(lambda f, p: f.__delitem__("images")), "/images is missing"),
    "missing_labels": ("soft", _h5(lambda f, p: f.__delitem__("labels")), "/labels is missing"),
    "missing_class_names": ("soft", _h5(lambda f, p: f.__delitem__("class_names")), "/class_names is missing"),
    "missing_preprocessing": ("soft", _h5(lambda f, p: f.__delitem__("preprocessing")), "/preprocessing is missing"),
    "missing_recipe_lr": ("soft", _h5(lambda f, p: f["recipe"].attrs.__delitem__("lr")), "'lr' is missing"),
    "missing_privacy": ("soft", _h5(lambda f, p: f.__delitem__("privacy")), "/privacy is missing"),
    "images_float64": ("soft", _h5(lambda f, p: _replace(f, "images", f["images"][()].astype(np.float64))),
                       "dtype float64"),
    "images_3d": ("soft", _h5(lambda f, p: _replace(f, "images", f["images"][()][:, 0])), "4-D"),
    "labels_float": ("soft", _h5(lambda f, p: _replace(f, "labels", f["labels"][()].astype(np.float32))),
                     "expected int64"),
    "labels_too_few": ("soft", _h5(lambda f, p: _replace(f, "labels", f["labels"][()][:-1])), "/labels has shape"),
    "label_out_of_range": ("soft", _h5(_set("labels", 0, 2)), "class ids in 0..1"),
    "negative_label": ("soft", _h5(_set("labels", 0, -1)), "class ids in 0..1"),
    "class_names_not_text": ("soft", _h5(lambda f, p: _replace(f, "class_names", np.arange(2))), "UTF-8 text"),
    "nan_image": ("soft", _h5(_set("images", (0, 0, 0, 0), np.nan)), "images contain NaN"),
    "inf_logit": ("soft", _h5(_set("label_logits", (1, 1), np.inf)), "label_logits contain NaN"),
    "nan_zca": ("zca", _h5(_set("preprocessing/zca_matrix", (0, 0), np.nan)), "ZCA transform contains NaN"),
    "zero_std": ("soft", _h5(_set("preprocessing/std", 0, 0.0)), "std > 0"),
    "zca_wrong_shape": ("zca", _h5(lambda f, p: _replace(f, "preprocessing/zca_matrix",
                                                         f["preprocessing/zca_matrix"][()][:-1, :-1])),
                        "zca_matrix has shape"),
    "num_images_disagree": ("soft", _h5(lambda f, p: f.attrs.__setitem__("num_images", np.int64(N + 1))),
                            "num_images says"),
    "num_classes_disagree": ("soft", _h5(lambda f, p: f.attrs.__setitem__("num_classes", np.int64(3))),
                             "num_classes says"),
    "num_images_as_text": ("soft", _h5(lambda f, p: _text(f, "num_images", str(N))), "not a single int value"),
    "per_class_disagree": ("soft", _h5(lambda f, p: f["labels"].attrs.__setitem__(
        "images_per_class", np.array([N_PER_CLASS + 1, N_PER_CLASS - 1], dtype=np.int64))), "images_per_class says"),
    "three_names_two_logit_columns": ("soft", _h5(lambda f, p: _replace(
        f, "class_names", np.array([b"a", b"b", b"c"], dtype=h5py.string_dtype("utf-8", 1)))), "label_logits has shape"),
    "geometry_disagrees": ("soft", _h5(lambda f, p: f["preprocessing"].attrs.__setitem__("size", np.int64(16))),
                           "preprocessing is for 1x16x16"),
    "insane_image_count": ("soft", _h5(lambda f, p: _replace(f, "images", shape=(10 ** 9, 1, SIZE, SIZE),
                                                            dtype=np.float32, chunks=(1, 1, SIZE, SIZE),
                                                            compression="gzip")), "sane limits"),
    "insane_bytes_within_limits": ("soft", _h5(lambda f, p: _replace(
        f, "images", shape=(S.MAX_IMAGES, S.MAX_CHANNELS, S.MAX_SIDE, S.MAX_SIDE), dtype=np.float32,
        chunks=(1, 1, 64, 64), compression="gzip")), "GiB"),
    "soft_link": ("soft", _h5(lambda f, p: (f.__delitem__("labels"), f.__setitem__("labels", h5py.SoftLink("/images")))),
                  "soft link"),
    "external_link": ("soft", _h5(lambda f, p: f.__setitem__("extra", h5py.ExternalLink("/etc/other.h5", "/x"))),
                      "external link"),
    "external_storage": ("soft", _h5(_external_storage), "external files"),
    "virtual_dataset": ("soft", _h5(_virtual), "virtual dataset"),
    "too_many_objects": ("soft", _h5(_many_objects), "more than 256 objects"),
    "variable_length_attribute": ("soft", _h5(lambda f, p: f.attrs.__setitem__("description", "vlen text")),
                                  "unsupported type"),
    # (dense attribute storage, which large attributes need, comes with a new object in a "latest" file)
    "huge_attribute": ("soft", _h5(lambda f, p: _text(f.create_group("notes"), "text", "x" * (2 << 20)),
                                   libver="latest"),
                       "larger than 1 MiB"),
    "invalid_json": ("soft", _h5(lambda f, p: _text(f["recipe"], "model_kwargs", "{not json")), "not valid JSON"),
    "unknown_loss": ("soft", _h5(lambda f, p: _text(f["recipe"], "loss", "mse")), "loss 'mse'"),
    "negative_lr": ("soft", _h5(lambda f, p: f["recipe"].attrs.__setitem__("lr", -1.0)), "learning rate -1.0"),
    "soft_loss_without_soft_labels": ("soft", _h5(lambda f, p: f.__delitem__("label_logits")), "no soft labels"),
    "unknown_audit_status": ("soft", _h5(lambda f, p: _text(f["privacy"], "audit_status", "maybe")), "audit_status"),
    "payload_altered": ("soft", _h5(_set("images", (0, 0, 0, 0), 0.5)), "payload checksum does not match"),
    "fletcher32_damage": ("soft", _fletcher_damage, "damaged"),
}


def test_corpus_is_large_enough():
    assert len(MALFORMED) >= 20


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_share_is_refused_with_one_sentence(case, templates, tmp_path, monkeypatch, capsys):
    template, mutate, expected = MALFORMED[case]
    path = tmp_path / "bad.h5"
    shutil.copyfile(templates[template], path)
    mutate(path)
    with pytest.raises(FormatError, match=re.escape(expected)):
        load_share(path)
    code, out, err = run_cli(monkeypatch, capsys, "inspect", str(path))
    assert code == 1 and out == ""
    assert err.startswith("Error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(FormatError, match="is not a file"):
        load_share(tmp_path)


def test_shapes_are_checked_before_any_data_is_read(templates, tmp_path, monkeypatch):
    path = tmp_path / "bad.h5"
    shutil.copyfile(templates["soft"], path)
    MALFORMED["insane_image_count"][1](path)

    def no_reading(*args, **kwargs):
        raise AssertionError("data was read before the declared shapes were checked")

    monkeypatch.setattr(h5py.Dataset, "__getitem__", no_reading)
    monkeypatch.setattr(h5py.Dataset, "read_direct", no_reading)
    with pytest.raises(FormatError, match="sane limits"):
        load_share(path)


def test_newer_minor_version_is_read_with_a_warning(templates, tmp_path):
    path = tmp_path / "newer.h5"
    shutil.copyfile(templates["soft"], path)
    with h5py.File(path, "r+") as f:
        _text(f, "format_version", "1.9")
        f.create_group("from_the_future").attrs["x"] = np.int64(1)  # a newer minor may add objects
    restamp(path)  # as the newer writer would
    with pytest.warns(UserWarning, match="newer than this reader"):
        share = load_share(path)
    assert share.format_version == "1.9" and share.num_images == N


# ----------------------------------------------------------------------------- writer refusals


def test_writer_refuses_nan_and_leaves_no_file(tmp_path, templates):
    share = load_share(templates["soft"])
    share.images[0, 0, 0, 0] = float("nan")
    with pytest.raises(FormatError, match="NaN"):
        write_share(tmp_path / "x.h5", share)
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_a_license_that_is_not_spdx(tmp_path, templates):
    share = load_share(templates["soft"])
    share.license = "use it however; see /home/me/LICENSE"
    with pytest.raises(DistillError, match="SPDX"):
        write_share(tmp_path / "x.h5", share)


# ----------------------------------------------------------------------------- export and the privacy gate


@pytest.mark.parametrize("audit,words", [
    (None, "has no privacy audit"),
    ({**AUDIT_PASSED, "passed": False}, "audit of"),
    ("{this is not json", "privacy audit in .* is not readable"),
    ({**AUDIT_PASSED, "format_version": "2.0"}, "privacy audit in .* is not readable"),
])
def test_export_refuses_without_a_passed_audit(tmp_path, audit, words):
    run = make_run(tmp_path / "run", audit=audit)
    with pytest.raises(DistillError, match=words) as e:
        export_share(run, tmp_path / "x.h5")
    assert "distill audit" in str(e.value) and "--force" in str(e.value)
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.parametrize("audit,status", [(None, "missing"), ({**AUDIT_PASSED, "passed": False}, "failed"),
                                          ("[]", "invalid"), (AUDIT_PASSED, "passed")])
def test_forced_export_is_recorded(tmp_path, audit, status):
    share = load_share(export_share(make_run(tmp_path / "run", audit=audit), tmp_path / "x.h5", force=True))
    assert share.privacy["audit_status"] == status
    assert share.privacy["forced"] is (status != "passed")


def test_the_share_carries_the_audit_verdict_but_not_its_figures(tmp_path):
    # Issue 23: the audit's figures are computed from the private images, so only the verdict travels.
    audit = {**AUDIT_PASSED, "summary": {"flagged": 0, "auc": 0.51, "data": {"source": "/srv/ward7/scans.npz"},
                                         "verdict": {"reasons": ["Nothing near /srv/ward7/scans.npz was found."]}}}
    share = load_share(export_share(make_run(tmp_path / "run", audit=audit), tmp_path / "x.h5"))
    assert share.privacy["summary"] == {} and share.privacy["audit_status"] == "passed"
    assert "0.51" not in repr(share.privacy) and "ward7" not in repr(share.privacy)
    statement = share.privacy["statement"]
    assert "verdict: passed" in statement and "outside the formal guarantee" in statement


def test_every_run_setting_is_reviewed():
    names = {f.name for f in dataclasses.fields(RunConfig)}
    assert set(METHOD_KEYS) | set(METHOD_HOME_ONLY) == names, "decide whether a new RunConfig field may travel"
    assert not set(METHOD_KEYS) & set(METHOD_HOME_ONLY)


def test_share_holds_no_path_file_name_user_or_host(tmp_path, tiny_arrays):
    """Data at a distinctive path: neither the path nor the file name may reach the share's bytes."""
    home = tmp_path / "hospital_zeta_radiology"
    home.mkdir()
    source = home / "zeta_cohort_2031.npz"
    np.savez(source, **tiny_arrays())
    data = load_data(source)
    assert data.fingerprint()["name"] == "zeta_cohort_2031"  # the fingerprint does carry it: the share must not
    method = dataclasses.asdict(RunConfig(buffer=str(home / "buffers"), out=str(home / "runs" / "r1"), data=str(source)))
    experts = {"count": 2, "epochs": 3, "folder": str(home / "buffers"),
               "train": {"epochs": 3, "lr": 0.01, "augment": "none", "data": source.name}}
    run = make_run(home / "runs" / "r1", method=method, fingerprint=data.fingerprint(), experts=experts,
                   audit={**AUDIT_PASSED, "summary": {"data": source.name, "folder": str(home)},
                          "statement": f"Audited against {source}."})
    out = export_share(run, tmp_path / "share.h5", description="PneumoniaMNIST demo")
    raw = out.read_bytes()
    secrets_ = [str(home), home.name, source.name, source.stem, str(tmp_path)]
    secrets_ += [s for s in (getpass.getuser(), socket.gethostname()) if len(s) >= 6]  # short names occur by chance
    for s in secrets_:
        assert s.encode() not in raw, s
    dataset = load_share(out).provenance["dataset"]
    assert dataset["name"] == "custom" and dataset["counts"]["train"] == [10, 10]
    salted = hashlib.sha256(bytes.fromhex(dataset["salt"]) + data.source_sha256.encode()).hexdigest()
    assert dataset["source_sha256_salted"] == salted and data.source_sha256 not in json.dumps(dataset)


def test_two_exports_do_not_share_a_salt(tmp_path):
    run = make_run(tmp_path / "run")
    a, b = (load_share(export_share(run, tmp_path / f"{k}.h5")).provenance["dataset"] for k in "ab")
    assert a["name"] == "pneumoniamnist" and a["salt"] != b["salt"]
    assert a["source_sha256_salted"] != b["source_sha256_salted"]


# ----------------------------------------------------------------------------- CLI


def test_export_and_inspect_commands(tmp_path, monkeypatch, capsys):
    run = make_run(tmp_path / "run")
    code, out, err = run_cli(monkeypatch, capsys, "export", str(run), "--out", str(tmp_path / "x.h5"),
                             "--license", "CC0-1.0", "--description", "Ten chest X-rays.", "--cite", "Doe 2025")
    assert code == 0, err
    share = load_share(tmp_path / "x.h5")
    assert (share.license, share.description, share.citation) == ("CC0-1.0", "Ten chest X-rays.", "Doe 2025")

    code, out, err = run_cli(monkeypatch, capsys, "inspect", str(tmp_path / "x.h5"), "--json",
                             "--grid", str(tmp_path / "grid.png"))
    assert code == 0, err
    summary = json.loads(out)  # stdout is pure JSON even with --grid
    assert [c["images"] for c in summary["classes"]] == [N_PER_CLASS, N_PER_CLASS]
    assert summary["payload_sha256"] == share.payload_sha256 and summary["labels"]["temperature"] == 2.0
    from PIL import Image

    with Image.open(tmp_path / "grid.png") as im:  # one row per class, one column per image, 2-pixel padding,
        images_width = N_PER_CLASS * (SIZE + 2) + 2  # and a strip naming the classes on the left (issue 17)
        assert im.size[1] == 2 * (SIZE + 2) + 2 and im.size[0] > images_width

    code, out, err = run_cli(monkeypatch, capsys, "inspect", str(tmp_path / "x.h5"))
    assert code == 0 and "pneumonia (3 images)" in out and "verified" in out


def test_export_command_refuses_in_one_sentence(tmp_path, monkeypatch, capsys):
    run = make_run(tmp_path / "run", audit=None)
    code, out, err = run_cli(monkeypatch, capsys, "export", str(run), "--out", str(tmp_path / "x.h5"))
    assert code == 1 and err.startswith("Error: ") and err.count("\n") == 1 and "--force" in err


# ----------------------------------------------------------------------------- interop


def test_plain_h5py_snippet_in_the_docs_reads_a_share(templates, tmp_path):
    doc = (REPO / "docs" / "share-format.md").read_text()
    snippet = re.search(r"<!-- snippet: plain-h5py.*?```python\n(.*?)```", doc, re.S).group(1)
    assert len(snippet.strip().splitlines()) <= 10
    env: dict = {}
    exec(snippet.replace('"share.h5"', repr(str(templates["soft"]))), env)  # noqa: S102 - our own documentation
    share = load_share(templates["soft"])
    assert np.array_equal(env["images"], share.images.numpy()) and np.array_equal(env["labels"], share.labels.numpy())
    assert env["class_names"] == share.class_names
    assert np.allclose(env["probs"], share.targets().numpy(), atol=1e-6)


@pytest.mark.skipif(shutil.which("h5dump") is None or shutil.which("h5ls") is None,
                    reason="HDF5 command-line tools not installed (Debian package hdf5-tools)")
def test_hdf5_command_line_tools_read_a_share(templates):
    ls = subprocess.run(["h5ls", "-r", str(templates["soft"])], capture_output=True, text=True, check=True).stdout
    for key in ("/images", "/labels", "/label_logits", "/class_names", "/preprocessing/mean", "/recipe"):
        assert key in ls
    dump = subprocess.run(["h5dump", "-A", str(templates["soft"])], capture_output=True, text=True, check=True).stdout
    assert "distill-share" in dump and "soft_cross_entropy" in dump
    labels = subprocess.run(["h5dump", "-d", "/labels", str(templates["soft"])], capture_output=True, text=True,
                            check=True).stdout
    assert re.search(r"0,\s*0,\s*0,\s*1,\s*1,\s*1", labels)


def test_to_npz_is_medmnist_layout(templates, tmp_path):
    share = load_share(templates["soft"])
    assert share.to_npz(tmp_path / "plain") == tmp_path / "plain" and (tmp_path / "plain").exists()  # no ".npz" added
    path = share.to_npz(tmp_path / "syn.npz")
    with np.load(path, allow_pickle=False) as npz:
        assert npz["train_images"].dtype == np.uint8 and npz["train_images"].shape == (N, SIZE, SIZE)
        assert npz["train_labels"].shape == (N, 1) and npz["train_labels"][:, 0].tolist() == share.labels.tolist()
        assert npz["val_images"].shape == (0, SIZE, SIZE) and npz["test_labels"].shape == (0, 1)
        assert np.array_equal(npz["train_images"], share.pixels()[:, 0].numpy())
        assert np.allclose(npz["train_soft_labels"], share.targets().numpy())
    real = load_data(path)  # distill's own MedMNIST reader accepts it
    assert real.train.labels.tolist() == share.labels.tolist()


def test_to_npz_keeps_rgb_channels_last(tmp_path):
    share = load_share(export_share(make_run(tmp_path / "run", channels=3), tmp_path / "x.h5"))
    with np.load(share.to_npz(tmp_path / "x.npz")) as npz:
        assert npz["train_images"].shape == (N, SIZE, SIZE, 3)


def test_to_folder_writes_pngs_per_class(templates, tmp_path):
    from PIL import Image

    share = load_share(templates["soft"])
    folder = share.to_folder(tmp_path / "pngs")
    dirs = sorted(p.name for p in folder.iterdir())
    assert dirs == ["0_normal", "1_pneumonia"]
    files = sorted((folder / "1_pneumonia").iterdir())
    assert len(files) == N_PER_CLASS
    with Image.open(files[0]) as im:
        assert np.array_equal(np.asarray(im), share.pixels()[N_PER_CLASS, 0].numpy())
    with pytest.raises(DistillError, match="not an empty folder"):
        share.to_folder(folder)


def test_the_recipe_vocabulary_is_what_the_trainer_interprets():
    """formats/ holds the augmentation names as data (it imports no training code); they must stay augment's."""
    from distill.augment import TRANSFORMS, Augment
    from distill.formats.share_schema import AUGMENT_TRANSFORMS, augment_transforms

    assert AUGMENT_TRANSFORMS == TRANSFORMS
    assert augment_transforms("color_crop") == ("color", "crop") == Augment.parse("color_crop").transforms
    assert augment_transforms("none") is None is Augment.parse("none")
    with pytest.raises(ValueError, match="Unknown augmentation"):
        augment_transforms("color,blur")
