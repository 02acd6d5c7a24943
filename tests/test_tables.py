"""Hospital data in: labels tables (CSV/TSV), patient-grouped carves, DICOM and NIfTI, MedMNIST+ sizes."""
from __future__ import annotations

import csv
import sys
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill import data as data_mod
from distill.data import grouped_indices, load_data
from distill.errors import DataError
from distill.sites import split_indices

from test_cli_errors import _buffer, assert_one_sentence, run_main

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")


def _write_table(root: Path, rows: list[list[str]], header=("path", "label", "patient"), name="labels.csv") -> Path:
    with open(root / name, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t" if name.endswith(".tsv") else ",")
        if header:
            w.writerow(header)
        w.writerows(rows)
    return root / name


def _png_patients(root: Path, patients: int = 20, per_patient: int = 5, size: int = 8) -> list[list[str]]:
    """Patient p has per_patient PNGs; odd patients are 'pneumonia' (brighter), even ones 'normal'."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for p in range(patients):
        for k in range(per_patient):
            a = rng.integers(0, 120, (size, size)).astype(np.uint8) + (120 if p % 2 else 0)
            Image.fromarray(a.astype(np.uint8)).save(root / "img" / f"p{p}_{k}.png")
            rows.append([f"img/p{p}_{k}.png", "pneumonia" if p % 2 else "normal", f"PAT{p:03d}"])
    return rows


# ----------------------------------------------------------------------------- tables and patients


def test_patients_never_on_both_sides_of_the_carve(tmp_path, caplog):
    table = _write_table(tmp_path, _png_patients(tmp_path))
    with caplog.at_level(logging.WARNING):
        d = load_data(table)
    assert d.class_names == ["normal", "pneumonia"]
    assert (len(d.train), len(d.val), len(d.test)) != (100, 0, 0) and len(d.train) + len(d.val) + len(d.test) == 100
    sides = {s: set(d.groups[s].tolist()) for s in ("train", "val", "test")}
    assert sides["val"] and sides["test"]
    assert not (sides["train"] & sides["val"]) and not (sides["train"] & sides["test"]) and not (sides["val"] & sides["test"])
    assert d.split_record["patient_grouped"] is True
    assert "patient-grouped" in caplog.text
    # No patient string reaches what later stages may know about the source.
    assert "PAT0" not in repr(d.fingerprint())


def test_grouped_indices_keep_patients_whole():
    labels = torch.arange(100) // 5 % 2
    groups = torch.arange(100) // 5
    parts = grouped_indices(labels, groups, seed=3, val_fraction=0.1, test_fraction=0.2)
    assert sorted(torch.cat(list(parts.values())).tolist()) == list(range(100))
    owner = {}
    for s, idx in parts.items():
        for g in groups[idx].tolist():
            assert owner.setdefault(g, s) == s
    assert len(parts["test"]) == 20 and len(parts["val"]) == 10  # fractions met in whole patients of 5


def test_sites_keep_patients_whole():
    labels = torch.arange(100) // 5 % 2
    groups = torch.arange(100) // 5
    parts = split_indices(labels, 3, 0.5, seed=1, groups=groups)
    assert sorted(torch.cat(parts).tolist()) == list(range(100))
    seen = [set(groups[p].tolist()) for p in parts]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])


def test_given_split_integer_labels_and_tsv(tmp_path):
    rows = _png_patients(tmp_path, patients=6, per_patient=2)
    split = {0: "train", 1: "train", 2: "train", 3: "train", 4: "val", 5: "test"}
    body = [[f, "1" if lab == "pneumonia" else "0", split[int(pat[3:])], pat] for f, lab, pat in rows]
    d = load_data(_write_table(tmp_path, body, header=("path", "label", "split", "patient"), name="t.tsv"))
    assert d.class_names == ["0", "1"] and (len(d.train), len(d.val), len(d.test)) == (8, 2, 2)
    assert d.split_record["method"] == "official" and d.split_record["patient_grouped"] is True


def test_medmnist_save_layout(tmp_path):
    # medmnist's save(): a header-less SPLIT,file,label CSV beside a folder named after it.
    folder = tmp_path / "pneumoniamnist"
    folder.mkdir()
    rows = []
    for i in range(12):
        split = "TRAIN" if i < 8 else ("VALIDATION" if i < 10 else "TEST")
        Image.fromarray(np.full((8, 8), 40 + 160 * (i % 2), np.uint8)).save(folder / f"{split.lower()}{i}_{i % 2}.png")
        rows.append([split, f"{split.lower()}{i}_{i % 2}.png", str(i % 2)])
    d = load_data(_write_table(tmp_path, rows, header=None, name="pneumoniamnist.csv"))
    assert (len(d.train), len(d.val), len(d.test)) == (8, 2, 2)


def test_bad_tables_through_the_cli(tmp_path, monkeypatch, capsys):
    rows = _png_patients(tmp_path, patients=4, per_patient=2)
    cases = {
        "missing": (rows + [["img/gone.png", "normal", "PAT999"]], ("path", "label", "patient"), "gone.png"),
        "one-class": ([[f, "normal", p] for f, _, p in rows], ("path", "label", "patient"), "only one class"),
        "two-splits": ([[f, lab, "train" if i == 0 else ("test" if i == 1 else "train"), p]
                        for i, (f, lab, p) in enumerate(rows)], ("path", "label", "split", "patient"),
                       "both train and test"),
    }
    for name, (body, header, fragment) in cases.items():
        table = _write_table(tmp_path, body, header=header, name=f"{name}.csv")
        code, _, err = run_main(_buffer(table, tmp_path / f"out-{name}"), monkeypatch, capsys)
        assert_one_sentence(code, err, fragment)


# ----------------------------------------------------------------------------- DICOM


def _dicom_copy(dst: Path, patient: str, pid: str, date: str, source: str = "CT_small.dcm") -> Path:
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file(source))
    ds.PatientName, ds.PatientID, ds.StudyDate, ds.SeriesDate, ds.PatientBirthDate = patient, pid, date, date, date
    ds.save_as(dst)
    return dst


def test_dicom_intensity_pipeline(tmp_path):
    from pydicom.data import get_testdata_file
    from pydicom.pixels import apply_modality_lut

    from distill.medical import read_dicom

    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    img = read_dicom(Path(path), "CT_small.dcm")
    assert img.dtype == np.uint8 and img.shape == ds.pixel_array.shape
    hu = apply_modality_lut(ds.pixel_array, ds)
    # The modality LUT (slope/intercept) is applied before the min..max mapping: order is kept.
    assert np.corrcoef(hu.ravel(), img.ravel().astype(float))[0, 1] > 0.99
    # MONOCHROME1 inverts: the same pixels read as 255 - x.
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "m1.dcm")
    assert np.array_equal(read_dicom(tmp_path / "m1.dcm", "m1.dcm"), 255 - img)
    # A window maps [c - w/2, c + w/2] to the full range: values below are black, above white.
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.WindowCenter, ds.WindowWidth = float(np.median(hu)), 50.0
    ds.save_as(tmp_path / "w.dcm")
    windowed = read_dicom(tmp_path / "w.dcm", "w.dcm")
    assert windowed[hu < np.median(hu) - 30].max() == 0 and windowed[hu > np.median(hu) + 30].min() == 255


def test_dicom_refusals(tmp_path):
    from pydicom.data import get_testdata_file

    from distill.medical import BadFile, read_dicom

    with pytest.raises(DataError, match="without pixel data"):
        read_dicom(Path(get_testdata_file("rtplan.dcm")), "rtplan.dcm")
    with pytest.raises(DataError, match="multi-frame"):
        read_dicom(Path(get_testdata_file("SC_rgb_rle_2frame.dcm")), "two.dcm")
    (tmp_path / "junk.dcm").write_bytes(b"not a dicom file at all" * 10)
    with pytest.raises(BadFile, match="junk.dcm"):
        read_dicom(tmp_path / "junk.dcm", "junk.dcm")
    # JPEG 2000 decodes through Pillow; JPEG-LS needs a plugin, which these machines lack.
    assert read_dicom(Path(get_testdata_file("JPEG2000.dcm")), "j2k.dcm").dtype == np.uint8
    try:
        import jpeg_ls  # noqa: F401  (pyjpegls)
    except ImportError:
        with pytest.raises(DataError, match="pip install pyjpegls"):
            read_dicom(Path(get_testdata_file("MR_small_jpeg_ls_lossless.dcm")), "jls.dcm")


def test_dicom_cli_errors_and_skip(tmp_path, monkeypatch, capsys, caplog):
    from pydicom.data import get_testdata_file

    rows = []
    for i in range(8):
        _dicom_copy(tmp_path / f"im{i}.dcm", f"Doe^Jane{i}", f"ID{i}", "20200101")
        rows.append([f"im{i}.dcm", str(i % 2)])
    (tmp_path / "rt.dcm").write_bytes(Path(get_testdata_file("rtplan.dcm")).read_bytes())
    table = _write_table(tmp_path, rows + [["rt.dcm", "0"]], header=("path", "label"), name="nopix.csv")
    code, _, err = run_main(_buffer(table, tmp_path / "o1", "--size", "8"), monkeypatch, capsys)
    assert_one_sentence(code, err, "rt.dcm", "without pixel data")
    (tmp_path / "bad.dcm").write_bytes(b"\x00" * 200)
    table = _write_table(tmp_path, rows + [["bad.dcm", "1"]], header=("path", "label"), name="bad.csv")
    code, _, err = run_main(_buffer(table, tmp_path / "o2", "--size", "8"), monkeypatch, capsys)
    assert_one_sentence(code, err, "bad.dcm", "--on-bad-file skip")
    with caplog.at_level(logging.WARNING):
        d = load_data(table, size=8, read={"on_bad_file": "skip"})
    assert len(d.train) + len(d.val) + len(d.test) == 8 and "skipped 1 unreadable file" in caplog.text


def test_no_dicom_tag_or_path_reaches_the_share(tmp_path, subprocess_env):
    """A tiny CSV+DICOM dataset through buffer -> run -> export; the share's bytes hold no tag or path."""
    import subprocess
    import sys

    src = tmp_path / "pacs_export_Hospital"
    src.mkdir()
    secrets = []
    rows = []
    for i in range(12):
        name, pid, date = f"Secretname^Pat{i:02d}", f"MRN77{i:04d}", f"1987{(i % 9) + 1:02d}1{i % 10}"
        _dicom_copy(src / f"scan_{pid}.dcm", name, pid, date)
        rows.append([f"scan_{pid}.dcm", "effusion" if i % 2 else "clear", f"pt-{pid}"])
        secrets += [name, name.replace("^", " "), pid, date, f"scan_{pid}.dcm", f"pt-{pid}"]
    table = _write_table(src, rows, header=("path", "label", "patient"))
    secrets += [str(src), src.name, str(table)]
    py = [sys.executable, "-m", "distill.cli"]
    steps = [
        ["buffer", "--data", str(table), "--out", str(tmp_path / "buf"), "--experts", "1", "--epochs", "2",
         "--size", "8", "--device", "cpu", "--batch-size", "4"],
        ["run", "--buffer", str(tmp_path / "buf"), "--out", str(tmp_path / "run"), "--ipc", "1", "--iterations", "2",
         "--syn-steps", "2", "--expert-epochs", "1", "--max-start-epoch", "1", "--init", "noise", "--device", "cpu",
         "--eval-every", "0"],
        ["export", str(tmp_path / "run"), "--out", str(tmp_path / "share.h5"), "--force"],
        ["export", str(tmp_path / "run"), "--out", str(tmp_path / "plain"), "--force", "--format", "folder"],
        ["export", str(tmp_path / "run"), "--out", str(tmp_path / "plain.npz"), "--force", "--format", "npz"],
    ]
    for args in steps:
        r = subprocess.run(py + args, env=subprocess_env, capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0, (args[0], r.stderr[-2000:])
    blob = (tmp_path / "share.h5").read_bytes() + _h5_contents(tmp_path / "share.h5")
    found = [s for s in secrets if s.encode() in blob]
    assert not found, found
    assert b"effusion" in blob  # the scan sees inside compressed datasets: the class names are there
    # The plain forms too: every file of the folder, and the npz's arrays (compressed inside the zip).
    plain = b"".join(p.read_bytes() + p.name.encode() for p in (tmp_path / "plain").rglob("*") if p.is_file())
    with np.load(tmp_path / "plain.npz") as z:
        plain += b"".join(z[k].tobytes() + k.encode() for k in z.files)
    found = [s for s in secrets if s.encode() in plain]
    assert not found, found
    assert b"effusion" in plain


def _h5_contents(path: Path) -> bytes:
    """Every attribute and dataset of an HDF5 file, decompressed, as bytes (raw bytes miss gzip'd data)."""
    import h5py

    out = []

    def add(value):
        arr = np.asarray(value)
        out.append(arr.tobytes() if arr.dtype.kind not in "OSU" else repr(arr.tolist()).encode())
        if arr.dtype.kind == "O":
            out.append(b"".join(v if isinstance(v, bytes) else str(v).encode() for v in arr.ravel()))

    def visit(name, obj):
        out.append(name.encode())
        for k, v in obj.attrs.items():
            out.append(k.encode())
            add(v)
        if isinstance(obj, h5py.Dataset):
            add(obj[()])

    with h5py.File(path, "r") as f:
        for k, v in f.attrs.items():
            out.append(k.encode())
            add(v)
        f.visititems(visit)
    return b"\n".join(out)


# ----------------------------------------------------------------------------- NIfTI


def _nifti(path: Path, arr: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(arr.astype(np.float32), np.eye(4)), str(path))
    return path


def test_nifti_slices_and_axis_errors(tmp_path, monkeypatch, capsys):
    from distill.medical import ReadOptions, read_nifti

    vol = np.zeros((6, 7, 5), np.float32)
    vol[:, :, 3] = np.arange(42).reshape(6, 7)  # only axial slice 3 has content
    path = _nifti(tmp_path / "v.nii.gz", vol)
    img = read_nifti(path, "v.nii.gz", ReadOptions(nifti_axis="axial", nifti_slice=3))
    assert img.shape == (7, 6) and img.max() == 255 and img.min() == 0
    assert read_nifti(path, "v", ReadOptions(nifti_axis="axial", nifti_slice=0)).max() == 0
    with pytest.raises(DataError, match="--nifti-axis"):
        read_nifti(path, "v", ReadOptions())
    flat = _nifti(tmp_path / "flat.nii", np.arange(64).reshape(8, 8))
    assert read_nifti(flat, "flat.nii", ReadOptions()).shape == (8, 8)
    # Through the CLI: a slice outside the volume, and an axis a 2-D image lacks.
    rows = [[f"v{i}.nii.gz", str(i % 2)] for i in range(6)]
    for i in range(6):
        _nifti(tmp_path / f"v{i}.nii.gz", vol + i)
    table = _write_table(tmp_path, rows, header=("path", "label"), name="vols.csv")
    code, _, err = run_main(_buffer(table, tmp_path / "o", "--nifti-axis", "axial", "--nifti-slice", "9"), monkeypatch, capsys)
    assert_one_sentence(code, err, "v0.nii.gz", "--nifti-slice 9")
    table2 = _write_table(tmp_path, [["flat.nii", "0"], ["flat.nii", "1"]], header=("path", "label"), name="flat.csv")
    code, _, err = run_main(_buffer(table2, tmp_path / "o2", "--nifti-axis", "axial"), monkeypatch, capsys)
    assert_one_sentence(code, err, "flat.nii", "axis")


# ----------------------------------------------------------------------------- MedMNIST+ sizes


def test_medmnist_plus_sizes(tmp_path, tiny_arrays, monkeypatch):
    arrays = tiny_arrays(size=64)
    path = tmp_path / "pneumoniamnist_64.npz"
    np.savez(path, **arrays)
    monkeypatch.setenv("DISTILL_DATA", str(tmp_path))
    # A generated file is not the official release: refused by name, naming the expected MD5 ...
    with pytest.raises(DataError, match="8f4eceb4ccffa70c672198ea285246c6"):
        load_data("pneumoniamnist", size=64)
    # ... and read once its MD5 is the one listed (as the real file's is).
    from distill.io import md5_file

    monkeypatch.setitem(data_mod.MEDMNIST_PLUS_MD5, "pneumoniamnist_64.npz", md5_file(path))
    d = load_data("pneumoniamnist", size=64)
    assert d.size == 64 and d.class_names == ["normal", "pneumonia"]
    with pytest.raises(DataError, match="pneumoniamnist_128.npz"):
        load_data("pneumoniamnist", size=128)
    # Usable by path, as any MedMNIST-layout file.
    assert load_data(path).size == 64


def test_convnet_depth_follows_the_size_unless_given(tmp_path, tiny_arrays, monkeypatch, capsys):
    from distill.formats.trajectory import read_expert
    from distill.models import create_model, resolve_model

    assert [resolve_model("convnet", s) for s in (28, 64, 128, 224)] == ["convnet3", "convnet4", "convnet5", "convnet5"]
    assert resolve_model("convnet3", 128) == "convnet3"  # a named depth is kept
    assert len(create_model("convnet", 2, 1, 64, width=4).features) == 4 * 4  # 4 blocks of conv, norm, relu, pool
    path = tmp_path / "pneumoniamnist_64.npz"
    np.savez(path, **tiny_arrays(size=64, per_class={"train": 4, "val": 2, "test": 2}))
    code, out, err = run_main(_buffer(path, tmp_path / "buf", "--batch-size", "8"), monkeypatch, capsys)
    assert code == 0, err
    assert read_expert(next((tmp_path / "buf").glob("expert_*.h5"))).attrs["model"] == "convnet4"


def test_without_the_medical_extra_one_sentence_says_how_to_install(tmp_path, monkeypatch, capsys):
    rows = []
    for i in range(4):
        _dicom_copy(tmp_path / f"im{i}.dcm", "A^B", "1", "20200101")
        rows.append([f"im{i}.dcm", str(i % 2)])
    table = _write_table(tmp_path, rows, header=("path", "label"), name="t.csv")
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom now raises ImportError
    code, _, err = run_main(_buffer(table, tmp_path / "o"), monkeypatch, capsys)
    assert_one_sentence(code, err, "pip install 'distill[medical]'")
