"""``distill export --format folder|npz``: a share as plain files that code without distill can train on."""
from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill.evaluate import evaluate
from distill.formats.plain import display_values, read_folder_recipe, write_folder, write_plain

from test_evaluate import cfg, make_share


# ----------------------------------------------------------------------------- plain torch, no distill import


def _plain_train_and_score(folder: Path, test_npz: Path, seed: int) -> float:
    """What a recipient's own code does: read the folder with PIL/numpy/json, train with torch, score."""
    recipe = json.loads((folder / "recipe.json").read_text())
    px, norm, r = recipe["pixels"], recipe["normalisation"], recipe["recipe"]
    with open(folder / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    raw = np.stack([np.asarray(Image.open(folder / row["path"]), dtype=np.float64) for row in rows])
    x = px["low"] + raw / (2 ** px["bits"] - 1) * (px["high"] - px["low"])
    x = torch.tensor(x, dtype=torch.float32)[:, None]  # grey: (N, 1, H, W)
    mean, std = torch.tensor(norm["mean"]).view(1, -1, 1, 1), torch.tensor(norm["std"]).view(1, -1, 1, 1)
    x = (x - mean) / std
    y = torch.tensor(np.load(folder / "soft_labels.npy"))

    test = np.load(test_npz)
    xt = (torch.tensor(test["test_images"], dtype=torch.float32)[:, None] / 255.0 - mean) / std
    yt = torch.tensor(test["test_labels"][:, 0].astype(np.int64))

    assert r["model"] == "convnet3" and r["augment"] == "none"
    width, k = r["model_kwargs"].get("width", 128), y.shape[1]
    torch.manual_seed(seed)
    layers, ch = [], 1
    for _ in range(3):  # ConvNet: conv3x3 -> instance norm (affine) -> ReLU -> avgpool2, three times
        layers += [torch.nn.Conv2d(ch, width, 3, padding=1), torch.nn.GroupNorm(width, width, affine=True),
                   torch.nn.ReLU(), torch.nn.AvgPool2d(2)]
        ch = width
    size = norm["size"] // 8
    net = torch.nn.Sequential(*layers, torch.nn.Flatten(), torch.nn.Linear(width * size * size, k))
    opt = torch.optim.SGD(net.parameters(), lr=r["lr"], momentum=r["momentum"], weight_decay=r["weight_decay"])
    for epoch in range(r["epochs"]):
        if r["lr_decay"] == "half" and epoch == r["epochs"] // 2:
            for g in opt.param_groups:
                g["lr"] *= 0.1
        order = torch.randperm(len(x))
        for i in range(0, len(x), r["batch_size"]):
            b = order[i:i + r["batch_size"]]
            loss = -(y[b] * torch.log_softmax(net(x[b]), 1)).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return float((net(xt).argmax(1) == yt).float().mean())


def test_a_network_trained_from_the_folder_matches_distill_eval(tiny_npz, tmp_path):
    share = make_share(tiny_npz, per_class=5, soft=True, epochs=100, lr=0.05, augment="none")
    folder = write_folder(share, tmp_path / "share")
    doc = read_folder_recipe(folder)
    assert doc["recipe"] == asdict(share.recipe)  # the same recipe
    assert sorted(p.name for p in folder.iterdir()) == ["images", "labels.csv", "recipe.json", "soft_labels.npy"]
    plain = np.mean([_plain_train_and_score(folder, tiny_npz, seed) for seed in range(3)])
    ours = evaluate(cfg(tiny_npz, baselines=("none",), runs=3), shares=[("s.h5", share)])
    acc = ours["results"][0]["mean"]["accuracy"]
    # Tiny test split (8 images): "within noise" is a couple of images.
    assert abs(plain - acc) <= 0.25, (plain, acc)
    assert plain > 0.6  # and both learned the task


def test_pixels_outside_0_1_go_to_16_bit_without_clipping(tiny_npz, tmp_path):
    share = make_share(tiny_npz, per_class=2)
    share.images = share.images * 3.0  # push display values past [0, 1], as distillation can
    x = display_values(share)
    assert x.min() < 0 or x.max() > 1
    folder = write_folder(share, tmp_path / "wide")
    px = read_folder_recipe(folder)["pixels"]
    assert px["bits"] == 16
    with Image.open(folder / "images" / "00000.png") as im:
        raw = np.asarray(im, dtype=np.float64)
    back = px["low"] + raw / 65535 * (px["high"] - px["low"])
    assert np.abs(back - x[0, 0].numpy()).max() <= (px["high"] - px["low"]) / 65535
    # In range: 8-bit, as a normal PNG.
    assert read_folder_recipe(write_folder(make_share(tiny_npz), tmp_path / "narrow"))["pixels"]["bits"] == 8


def test_npz_form_and_refusals(tiny_npz, tmp_path):
    share = make_share(tiny_npz, soft=True)
    path = write_plain(share, tmp_path / "s.npz", "npz")
    with np.load(path) as z:
        assert z["train_images"].dtype == np.uint8 and z["train_labels"].shape == (len(share.labels), 1)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    from distill.errors import DistillError

    with pytest.raises(DistillError, match="not an empty folder"):
        write_plain(share, tmp_path / "full", "folder")
