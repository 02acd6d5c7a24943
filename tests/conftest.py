"""Shared fixtures: device/dtype (as in kornia's conftest), the real MedMNIST files, tiny synthetic data.

Unit tests use 2 classes x 10 images x 1x8x8 so the whole suite runs on a shared CPU.
``pytest --device cuda`` or ``--dtype float64`` reruns the tensor tests elsewhere.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# The project's machines keep the MedMNIST releases beside the checkout, never inside it.
SHARED_DATA = (REPO_ROOT / ".." / "shared" / "data").resolve()

TINY_CLASSES = 2
TINY_SIZE = 8  # the smallest size a depth-3 ConvNet accepts (it halves the image 3 times)
TINY_COUNTS = {"train": 10, "val": 4, "test": 4}  # images per class


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="Torch device for tensor tests (cpu, cuda, cuda:1...).")
    parser.addoption("--dtype", default="float32", choices=["float32", "float64"], help="Float dtype for tensor tests.")


@pytest.fixture
def device(request) -> torch.device:
    dev = torch.device(request.config.getoption("--device"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda was asked for but no CUDA GPU is available.")
    return dev


@pytest.fixture
def dtype(request) -> torch.dtype:
    return getattr(torch, request.config.getoption("--dtype"))


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """Environment for running ``python -m distill.cli`` in a child: the repository importable, one thread."""
    # The repository first, then the caller's own path (extra packages on a GPU machine, say).
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


@pytest.fixture
def shared_data() -> Path:
    """The folder holding pneumoniamnist.npz, breastmnist.npz and retinamnist.npz, or a skip."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real MedMNIST data not found at {SHARED_DATA} (expected ../shared/data beside the repository)")
    return SHARED_DATA


def make_tiny_arrays(seed: int = 0, per_class: dict[str, int] | None = None, rgb: bool = False,
                     size: int = TINY_SIZE) -> dict[str, np.ndarray]:
    """MedMNIST-layout arrays: uint8 images (N,H,W) or (N,H,W,3), uint8 labels (N,1).

    Class 1 is brighter than class 0, so a network can learn the task in one epoch.
    """
    per_class = per_class or TINY_COUNTS
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in per_class.items():
        labels = np.repeat(np.arange(TINY_CLASSES), n)
        shape = (len(labels), size, size, 3) if rgb else (len(labels), size, size)
        images = rng.integers(0, 120, size=shape).astype(np.uint8)
        images[labels == 1] += 120
        out[f"{split}_images"] = images
        out[f"{split}_labels"] = labels.reshape(-1, 1).astype(np.uint8)
    return out


@pytest.fixture
def tiny_arrays():
    """The :func:`make_tiny_arrays` factory, for tests that vary the layout (RGB, flat labels, counts)."""
    return make_tiny_arrays


@pytest.fixture
def tiny_npz(tmp_path) -> Path:
    """A MedMNIST-layout .npz: 2 classes x 10 train (4 val, 4 test) images of 8x8 grey."""
    path = tmp_path / "tiny.npz"
    np.savez(path, **make_tiny_arrays())
    return path


def benchmark_module(file: str, as_name: str):
    """Import benchmarks/FILE as module AS_NAME for a module-scoped fixture (``yield from`` this), then forget it.

    The benchmarks are scripts, not a package; their pure table-writing functions are tested on invented numbers.
    """
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(as_name, REPO_ROOT / "benchmarks" / file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[as_name] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    yield mod
    del sys.modules[as_name]
