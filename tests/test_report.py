"""The review page (issue 15): self-contained HTML, checked in a real headless browser.

One tiny run folder (2 classes x 10 8x8 training images, 3 noise-initialised
synthetic images per class) is audited, exported and evaluated once per module;
the tests make pages from it and look at them in Debian's ``chromium``.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill.data import fit_preprocessing, load_data
from distill.errors import DistillError
from distill.evaluate import EvalConfig, evaluate
from distill.export import export_share
from distill.formats.synset import SyntheticSet, write_synset
from distill.privacy import run_audit
from distill.report import HOSPITAL_ONLY, REPORT_FORMAT, REPORT_VERSION, write_report
from test_share import run_cli

XSS = "<script>alert(1)</script>"
CLASS_NAMES = ["<b>benign</b>", "malignant & co"]  # markup in class names must be escaped too
PER_CLASS = 3
DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
# Marks how many images the browser decoded; injected into a copy of the page only (the page itself has no script).
MARKER = ("<script>window.addEventListener('load',function(){var im=document.images,bad=0;"
          "for(var i=0;i<im.length;i++){if(!im[i].complete||im[i].naturalWidth===0)bad++;}"
          "document.body.setAttribute('data-images',im.length);document.body.setAttribute('data-broken',bad);});</script>")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict:
    """A tiny audited run folder, its share (with a hostile description) and an eval report."""
    from conftest import make_tiny_arrays

    root = tmp_path_factory.mktemp("report")
    npz = root / "tiny.npz"
    np.savez(npz, **make_tiny_arrays())
    data = load_data(npz)
    pre = fit_preprocessing(data.train.images)
    g = torch.Generator().manual_seed(0)
    n = PER_CLASS * data.num_classes
    rundir = root / "run"
    rundir.mkdir()
    write_synset(rundir / "synthetic.h5", SyntheticSet(
        images=torch.randn(n, 1, 8, 8, generator=g), labels=torch.arange(2).repeat_interleave(PER_CLASS),
        label_logits=torch.randn(n, 2, generator=g), preprocessing=pre, syn_lr=0.01, label_temperature=1.0,
        model="convnet3", class_names=CLASS_NAMES, model_kwargs={"width": 8}, fingerprint=data.fingerprint(),
        method={"eval_epochs": 3, "augment": "none", "ipc": PER_CLASS}))
    (rundir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        [{"kind": "iteration", "iteration": i, "loss": 1.0 - 0.05 * i, "syn_lr": 0.01 * (1 + 0.1 * i)} for i in range(6)]
        + [{"kind": "eval", "iteration": i, "val_acc_mean": 0.5 + 0.05 * i, "val_majority": 0.5} for i in (0, 5)])))
    run_audit(rundir, npz, device="cpu", networks=1, epochs=2, expert_epochs=1, bootstrap=10, pairs=0)
    share = export_share(rundir, root / "share.h5", description=XSS, citation="Doe & Roe <2026>",
                         force=True)  # 8 held-out images give a coarse threshold; the audit's verdict does not matter here
    eval_json = root / "eval.json"
    evaluate(EvalConfig(shares=(str(share),), test=str(npz), runs=1, epochs=2, device="cpu", json=str(eval_json)))
    return {"root": root, "npz": npz, "data": data, "rundir": rundir, "share": share, "eval": eval_json}


@pytest.fixture(scope="module")
def hospital_page(made) -> Path:
    return write_report(made["rundir"], made["root"] / "hospital.html", share=made["share"], data=made["npz"],
                        eval_json=made["eval"])


@pytest.fixture(scope="module")
def public_page(made) -> Path:
    return write_report(made["share"], made["root"] / "public.html", public=True, eval_json=made["eval"])


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed, but CI must check the page in a browser (.ci/run installs it).")
        pytest.skip("chromium is not installed (apt-get install chromium); CI installs it and runs this test.")
    return exe


def _browse(page: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [_chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr", "--v=0",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", *args, page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def _decoded_images(page: Path) -> list[np.ndarray]:
    """Every embedded PNG, decoded by PIL (float arrays, greyscale images as (H, W))."""
    out = []
    for b64 in DATA_URI.findall(page.read_text(encoding="utf-8")):
        with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
            im.load()
            out.append(np.asarray(im, dtype=np.float64))
    return out


def _max_correlation(images: list[np.ndarray], real: np.ndarray) -> float:
    """Highest Pearson correlation between any embedded image and any real image (N, H, W) of its shape."""
    ref = real.reshape(len(real), -1).astype(np.float64)
    ref = ref - ref.mean(1, keepdims=True)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True).clip(1e-12)
    best = -1.0
    for img in images:
        if img.shape != real.shape[1:]:
            continue
        v = img.ravel() - img.mean()
        v /= max(np.linalg.norm(v), 1e-12)
        best = max(best, float((ref @ v).max()))
    return best


# ----------------------------------------------------------------------------- the browser


def test_browser_check_catches_a_broken_image_and_a_console_error(tmp_path):
    good = _decoded_png_uri()
    page = tmp_path / "broken.html"
    page.write_text(f'<!DOCTYPE html><html><body><img src="{good}"><img src="data:image/png;base64,AAAA">'
                    f"<script>console.error('probe');</script>{MARKER}</body></html>")
    res = _browse(page, tmp_path, "--dump-dom")
    assert 'data-images="2"' in res.stdout and 'data-broken="1"' in res.stdout
    assert "probe" in "".join(_console(res.stderr))


def _decoded_png_uri() -> str:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _console(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.parametrize("which", ["hospital_page", "public_page"])
def test_page_loads_without_console_errors_and_every_image_decodes(which, request, tmp_path):
    page = request.getfixturevalue(which)
    text = page.read_text(encoding="utf-8")
    n_img = text.count("<img ")
    assert n_img > 0 and "<script" not in text.lower() and "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")

    shot = tmp_path / "shot.png"
    res = _browse(page, tmp_path, f"--screenshot={shot}", "--window-size=1200,1600")
    assert res.returncode == 0, res.stderr[-2000:]
    assert _console(res.stderr) == []
    assert shot.stat().st_size > 20_000  # a page of text, tables and images, not a blank one
    with Image.open(shot) as im:
        assert im.size == (1200, 1600) and len(np.unique(np.asarray(im.convert("L")))) > 10

    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", MARKER + "</body>"), encoding="utf-8")
    dom = _browse(probe, tmp_path, "--dump-dom").stdout
    assert f'data-images="{n_img}"' in dom and 'data-broken="0"' in dom
    assert len(_decoded_images(page)) == n_img  # and PIL decodes every one of them as well


# ----------------------------------------------------------------------------- content


def test_hospital_page_pairs_each_synthetic_image_with_its_nearest_training_image(made, hospital_page):
    text = hospital_page.read_text(encoding="utf-8")
    assert HOSPITAL_ONLY in text and f'content="{REPORT_FORMAT} {REPORT_VERSION}"' in text
    assert 'id="pairs"' in text and len(re.findall(r"<tr><td[^>]*><img", text)) == 2 * PER_CLASS
    # The real pixels are on this page: the nearest training images are embedded as they are.
    real = made["data"].train.images[:, 0].numpy()
    assert _max_correlation(_decoded_images(hospital_page), real) > 0.999
    # The audit's thresholds, its verdict sentence, the checksum of the exact file, accuracy and curves.
    audit = json.loads((made["rundir"] / "audit.json").read_text())
    thr = audit["summary"]["nearest_neighbour"]["pixel_correlation"]["threshold"]
    assert f"{thr:.3f}" in text and "An empirical audit is not a proof of privacy." in text
    flagged = audit["summary"]["flagged_synthetic_indices"]
    assert text.count("FLAGGED by the audit") == len(flagged)
    assert all(re.search(rf"#{i} [^<]*FLAGGED by the audit", text) for i in flagged)
    from distill.formats import load_share
    from distill.io import sha256_file

    assert load_share(made["share"]).payload_sha256 in text and sha256_file(made["share"]) in text
    assert "<td>distilled</td>" in text and "<td>random-real</td>" in text and "<td>full</td>" in text
    assert text.count("<polyline") == 3


def test_public_page_holds_no_real_pixels(made, public_page):
    text = public_page.read_text(encoding="utf-8")
    assert 'id="pairs"' not in text and HOSPITAL_ONLY not in text and 'id="curves"' not in text
    images = _decoded_images(public_page)
    assert len(images) == 2 * PER_CLASS  # the share's own images and nothing else
    d = made["data"]
    real = torch.cat([d.train.images, d.val.images, d.test.images])[:, 0].numpy()
    assert _max_correlation(images, real) < 0.99


def test_user_text_is_escaped(hospital_page, public_page):
    for page in (hospital_page, public_page):
        text = page.read_text(encoding="utf-8")
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and XSS not in text
        assert "&lt;b&gt;benign&lt;/b&gt;" in text and "<b>benign" not in text
        assert "Doe &amp; Roe &lt;2026&gt;" in text


def test_run_folder_page_says_the_checksum_comes_with_export(made, tmp_path):
    page = write_report(made["rundir"], tmp_path / "run.html")
    text = page.read_text(encoding="utf-8")
    assert "appears here once it is exported" in text and "No real data was given" in text
    assert text.count("<polyline") == 3 and "Privacy audit: " in text


# ----------------------------------------------------------------------------- command line


_cli = run_cli  # (monkeypatch, capsys, *args) -> (exit code, stdout, stderr)


def test_export_report_writes_the_page_beside_the_share(made, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sent.h5"
    code, stdout, _ = _cli(monkeypatch, capsys, "export", str(made["rundir"]), "--out", str(out), "--report", "--force")
    assert code == 0 and (tmp_path / "sent.html").exists()
    assert f"Review page written to {tmp_path / 'sent.html'}" in stdout
    code, stdout, _ = _cli(monkeypatch, capsys, "export", str(made["rundir"]), "--out", str(tmp_path / "b.h5"), "--force")
    assert code == 0 and "distill report" in stdout and not (tmp_path / "b.html").exists()


@pytest.mark.parametrize("case", ["missing", "not_a_run", "not_a_share", "bad_eval", "public_run", "public_data"])
def test_bad_input_is_one_sentence_and_exit_1(case, made, tmp_path, monkeypatch, capsys):
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    bad_eval = tmp_path / "eval.json"
    bad_eval.write_text("{not json")
    (tmp_path / "empty").mkdir()
    args = {"missing": [str(tmp_path / "nope")], "not_a_run": [str(tmp_path / "empty")], "not_a_share": [str(junk)],
            "bad_eval": [str(made["share"]), "--eval", str(bad_eval)],
            "public_run": [str(made["rundir"]), "--public"],
            "public_data": [str(made["share"]), "--public", "--data", str(made["npz"])]}[case]
    code, _, err = _cli(monkeypatch, capsys, "report", *args, "--out", str(tmp_path / "r.html"))
    assert code == 1 and err.startswith("Error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.html").exists()


def test_a_share_from_another_run_is_refused(made, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(made["rundir"], other)
    from distill.formats.synset import read_synset

    s = read_synset(other)
    s.images = s.images + 1
    write_synset(other / "synthetic.h5", s)
    with pytest.raises(DistillError, match="not exported from"):
        write_report(other, tmp_path / "x.html", share=made["share"])
