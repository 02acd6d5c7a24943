"""Data loading (MedMNIST npz, names, image folders) and preprocessing (mean/std, kornia ZCA)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from distill.data import MEDMNIST, SPLITS, fit_preprocessing, load_data, stratified_split
from distill.errors import DataError
from distill.formats.trajectory import read_buffer_preprocessing, write_buffer_preprocessing

# float32 arithmetic on 8-bit images: the round trip keeps well under half a grey level (1/510).
ROUND_TRIP_ATOL = 1e-4

# ----------------------------------------------------------------------------- real MedMNIST files


@pytest.mark.parametrize("name", sorted(MEDMNIST))
def test_shared_npz_by_name_matches_raw_arrays(shared_data, monkeypatch, name):
    monkeypatch.setenv("DISTILL_DATA", str(shared_data))
    data = load_data(name)
    raw = np.load(shared_data / MEDMNIST[name].file)
    assert data.class_names == list(MEDMNIST[name].classes)
    for s in SPLITS:
        images, labels = raw[f"{s}_images"], raw[f"{s}_labels"].reshape(-1)
        split = data.split(s)
        assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
        expect = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
        assert np.array_equal(split.images.numpy(), expect)
        assert np.array_equal(split.labels.numpy(), labels)
    assert data.channels == (3 if raw["train_images"].ndim == 4 else 1)
    fp = data.fingerprint()
    assert fp["counts"]["train"] == np.bincount(raw["train_labels"].reshape(-1), minlength=data.num_classes).tolist()
    assert len(fp["sha256"]) == 64 and fp["name"] == name


def test_shared_npz_by_path_keeps_class_names(shared_data):
    data = load_data(shared_data / "breastmnist.npz")
    assert data.class_names == list(MEDMNIST["breastmnist"].classes)


def test_medmnist_name_rejects_a_modified_file(shared_data, tmp_path, monkeypatch):
    raw = dict(np.load(shared_data / "breastmnist.npz"))
    raw["train_labels"] = raw["train_labels"].copy()
    raw["train_labels"][0] ^= 1
    np.savez(tmp_path / "breastmnist.npz", **raw)
    monkeypatch.setenv("DISTILL_DATA", str(tmp_path))
    with pytest.raises(DataError, match="MD5"):
        load_data("breastmnist")


def test_medmnist_name_missing_file_names_the_env_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_DATA", str(tmp_path))
    with pytest.raises(DataError, match="DISTILL_DATA"):
        load_data("pneumoniamnist")


# ----------------------------------------------------------------------------- npz layouts and errors


@pytest.mark.parametrize("rgb", [False, True])
@pytest.mark.parametrize("flat_labels", [False, True])
def test_npz_layouts(tmp_path, tiny_arrays, rgb, flat_labels):
    arrays = tiny_arrays(rgb=rgb)
    if flat_labels:
        arrays = {k: (v.reshape(-1) if k.endswith("labels") else v) for k, v in arrays.items()}
    np.savez(tmp_path / "x.npz", **arrays)
    data = load_data(tmp_path / "x.npz")
    assert data.channels == (3 if rgb else 1) and data.size == 8 and data.num_classes == 2
    assert data.class_names == ["0", "1"]
    n = {s: len(arrays[f"{s}_labels"]) // 2 for s in SPLITS}
    assert data.fingerprint()["counts"] == {s: [n[s], n[s]] for s in SPLITS}
    first = arrays["train_images"][0]
    assert np.array_equal(data.train.images[0].numpy(), first.transpose(2, 0, 1) if rgb else first[None])


def test_npz_resize(tiny_npz):
    data = load_data(tiny_npz, size=16)
    assert all(data.split(s).images.shape[-2:] == (16, 16) for s in SPLITS)
    assert data.train.images.dtype == torch.uint8


def _npz(tmp_path, arrays, **changes):
    for k, v in changes.items():
        if v is None:
            del arrays[k]
        else:
            arrays[k] = v
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("changes, message", [
    ({"val_labels": None}, "lacks the MedMNIST keys val_labels"),
    ({"train_labels": np.zeros((5, 1), np.uint8)}, "20 images but 5 labels"),
    ({"train_images": np.zeros((20, 8, 8), np.float32)}, "dtype float32"),
    ({"train_images": np.zeros((20, 2, 8, 8), np.uint8)}, "expected"),
    ({"train_labels": -np.ones((20, 1), np.int64)}, "non-negative"),
    ({"train_labels": np.zeros((20, 1), np.uint8)}, "only one class"),
    ({"train_images": np.zeros((0, 8, 8), np.uint8), "train_labels": np.zeros((0, 1), np.uint8)},
     "empty training split"),
    ({"train_images": np.array([None] * 20, dtype=object)}, "object arrays"),
    ({"test_labels": np.full((8, 1), 7, np.uint8)}, "class\\(es\\) 2, 3, 4, 5, 6, 7 have no training images"),
])
def test_npz_errors_are_one_sentence(tmp_path, tiny_arrays, changes, message):
    with pytest.raises(DataError, match=message) as err:
        load_data(_npz(tmp_path, tiny_arrays(), **changes))
    assert "\n" not in str(err.value) and str(err.value).endswith(".")


def test_missing_path_and_non_npz_file(tmp_path):
    with pytest.raises(DataError, match="neither an existing path nor a known MedMNIST name"):
        load_data(tmp_path / "nope.npz")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match="not a .npz file"):
        load_data(tmp_path / "x.txt")
    (tmp_path / "y.npz").write_text("not a zip")
    with pytest.raises(DataError, match="cannot be read"):
        load_data(tmp_path / "y.npz")


# ----------------------------------------------------------------------------- image folders


def _write_pngs(root, per_class=10, size=8, mode="L", classes=("benign", "malignant"), seed=0):
    rng = np.random.default_rng(seed)
    for c_idx, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = (size, size, 3) if mode == "RGB" else (size, size)
            arr = (rng.integers(0, 120, size=shape) + 120 * c_idx).astype(np.uint8)
            Image.fromarray(arr, mode=mode).save(root / c / f"img{i:03d}.png")


def test_folder_unsplit_is_stratified_and_seeded(tmp_path):
    _write_pngs(tmp_path / "ds", per_class=10)
    a = load_data(tmp_path / "ds", split_seed=1)
    assert a.class_names == ["benign", "malignant"] and a.channels == 1 and a.size == 8
    counts = a.fingerprint()["counts"]
    assert counts == {"train": [7, 7], "val": [1, 1], "test": [2, 2]}  # 10 per class, 10 % val, 20 % test
    b = load_data(tmp_path / "ds", split_seed=1)
    assert torch.equal(a.test.images, b.test.images)
    c = load_data(tmp_path / "ds", split_seed=2)
    assert not torch.equal(a.test.images, c.test.images)
    # Every image lands in exactly one split.
    total = torch.cat([a.split(s).images for s in SPLITS]).flatten(1)
    assert len({tuple(r.tolist()) for r in total}) == 20


def test_folder_pixels_and_hash_do_not_depend_on_location(tmp_path):
    _write_pngs(tmp_path / "one" / "ds")
    shutil.copytree(tmp_path / "one" / "ds", tmp_path / "two" / "ds")
    a, b = load_data(tmp_path / "one" / "ds"), load_data(tmp_path / "two" / "ds")
    assert a.source_sha256 == b.source_sha256
    img = np.asarray(Image.open(tmp_path / "one" / "ds" / "benign" / "img000.png"))
    everything = torch.cat([a.split(s).images for s in SPLITS])[:, 0].numpy()
    assert any(np.array_equal(img, x) for x in everything)


def test_folder_presplit_mixed_modes_and_resize(tmp_path):
    root = tmp_path / "ds"
    _write_pngs(root / "train", per_class=4, size=12)
    _write_pngs(root / "val", per_class=1, size=12, mode="RGB")
    _write_pngs(root / "test", per_class=2, size=10)  # another size: --size makes them agree
    data = load_data(root, size=8)
    assert data.channels == 3  # one RGB image makes the whole set RGB; grey is repeated
    assert {s: len(data.split(s)) for s in SPLITS} == {"train": 8, "val": 2, "test": 4}
    assert data.train.images.shape[1:] == (3, 8, 8)
    g = data.train.images[0]
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])


def test_folder_with_train_and_test_only_carves_val_from_train(tmp_path):
    root = tmp_path / "ds"
    _write_pngs(root / "train", per_class=10)
    _write_pngs(root / "test", per_class=3, seed=1)
    data = load_data(root, split_seed=0)
    counts = data.fingerprint()["counts"]
    assert counts == {"train": [9, 9], "val": [1, 1], "test": [3, 3]}
    (root / "test" / "extra").mkdir()
    with pytest.raises(DataError, match="class folder\\(s\\) extra that"):
        load_data(root)


def test_folder_empty_val_folder_keeps_image_geometry(tmp_path):
    root = tmp_path / "ds"
    _write_pngs(root / "train", per_class=3)
    _write_pngs(root / "test", per_class=1)
    for c in ("benign", "malignant"):
        (root / "val" / c).mkdir(parents=True)
    data = load_data(root)
    assert len(data.val) == 0 and data.val.images.shape[1:] == data.train.images.shape[1:]
    assert fit_preprocessing(data.train.images)(data.val.images).shape == (0, 1, 8, 8)


def test_folder_sixteen_bit_png_keeps_its_contrast(tmp_path):
    root = tmp_path / "ds"
    for c, level in (("a", 1000), ("b", 60000)):
        (root / c).mkdir(parents=True)
        for i in range(5):
            arr = np.full((8, 8), level + i, dtype=np.uint16)
            Image.fromarray(arr).save(root / c / f"{i}.png")
    data = load_data(root)
    pixels = torch.cat([data.split(s).images for s in SPLITS]).float()
    labels = torch.cat([data.split(s).labels for s in SPLITS])
    # 16-bit values scale to 8 bits; clipping would make both classes saturate at 255.
    assert pixels[labels == 0].max() < 10 and pixels[labels == 1].min() > 200


@pytest.mark.parametrize("setup, message", [
    ("one_class", "at least two class sub-folders"),
    ("no_images", "no PNG or JPEG"),
    ("sizes", "different sizes"),
    ("corrupt", "cannot be read as an image"),
])
def test_folder_errors(tmp_path, setup, message):
    root = tmp_path / "ds"
    if setup == "one_class":
        _write_pngs(root, classes=("only",))
    elif setup == "no_images":
        for c in ("a", "b"):
            (root / c).mkdir(parents=True)
            (root / c / "notes.txt").write_text("x")
    elif setup == "sizes":
        _write_pngs(root, per_class=2, size=8)
        _write_pngs(root, per_class=1, size=9, classes=("c",))
    else:
        _write_pngs(root, per_class=2)
        (root / "benign" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=message):
        load_data(root)


def test_stratified_split_keeps_class_balance():
    from distill.data import Split

    labels = torch.tensor([0] * 30 + [1] * 10)
    data = Split(torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1), labels)
    train, val, test = stratified_split(data, seed=0, val_fraction=0.1, test_fraction=0.2)
    assert torch.bincount(test.labels).tolist() == [6, 2] and torch.bincount(val.labels).tolist() == [3, 1]
    assert sorted(torch.cat([train.images, val.images, test.images]).flatten().tolist()) == list(range(40))


# ----------------------------------------------------------------------------- preprocessing


def test_mean_std_come_from_train_only(tiny_npz):
    data = load_data(tiny_npz)
    pre = fit_preprocessing(data.train.images)
    x = pre(data.train.images)
    assert x.dtype == torch.float32
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(1), atol=1e-5)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(1), atol=1e-4)
    pre2 = fit_preprocessing(torch.cat([data.train.images, data.val.images]))
    assert pre.same_as(pre2) is not None


@pytest.mark.parametrize("zca", [False, True])
def test_invert_undoes_preprocessing(tiny_arrays, zca):
    arrays = tiny_arrays(rgb=True)
    images = torch.from_numpy(arrays["train_images"]).permute(0, 3, 1, 2).contiguous()
    pre = fit_preprocessing(images, zca=zca)
    assert pre.zca == zca
    back = pre.invert(pre(images))
    assert torch.allclose(back, images.float() / 255, atol=ROUND_TRIP_ATOL, rtol=0)


def test_zca_matches_kornia_and_whitens(tiny_npz):
    import kornia

    from distill.data import ZCA_EPS

    images = load_data(tiny_npz).train.images
    pre = fit_preprocessing(images, zca=True)
    plain = fit_preprocessing(images)
    kz = kornia.enhance.ZCAWhitening(eps=ZCA_EPS).fit(plain(images).double())
    assert torch.allclose(pre(images).double(), kz(plain(images).double()), atol=1e-4)
    # Whitening must decorrelate: off-diagonal covariance shrinks towards zero.
    def offdiag(x):
        c = torch.cov(x.flatten(1).T.double())
        return (c - torch.diag(torch.diag(c))).abs().mean()
    assert offdiag(pre(images)) < 0.5 * offdiag(plain(images))


def test_preprocessing_refuses_images_of_another_geometry(tiny_npz):
    pre = fit_preprocessing(load_data(tiny_npz).train.images, zca=True)
    with pytest.raises(DataError, match="1x16x16 do not fit preprocessing fitted on 1x8x8"):
        pre(load_data(tiny_npz, size=16).train.images)


def test_buffer_preprocessing_file_round_trips_zca(tiny_npz, tmp_path):
    data = load_data(tiny_npz)
    pre = fit_preprocessing(data.train.images, zca=True)
    write_buffer_preprocessing(tmp_path, pre, data.fingerprint())
    back, fingerprint, sha = read_buffer_preprocessing(tmp_path)
    assert back.same_as(pre) is None and back.zca and back.zca_eps == pytest.approx(pre.zca_eps)
    assert torch.equal(back(data.test.images), pre(data.test.images))
    assert torch.equal(back.invert(pre(data.test.images)), pre.invert(pre(data.test.images)))
    assert fingerprint == data.fingerprint() and len(sha) == 64
    assert pre.same_as(fit_preprocessing(data.train.images)) == "one uses ZCA whitening and the other does not"
