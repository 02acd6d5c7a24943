"""The pipeline of one RMIA reference: ``distill buffer`` and ``distill run`` on half the candidate pool, then a
network trained on that reference share with its own recipe (issue 24; the cache is
:mod:`distill.privacy.references`). It lives outside :mod:`distill.privacy` because it needs the
buffer and the distiller, which the audit package does not import.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .buffer import build_buffer
from .config import BufferConfig, RunConfig
from .formats.synset import SYNSET_FILE
from .io import atomic_path
from .models import create_model
from .mtt import distill_run
from .mtt.rundir import restartable
from .privacy.references import ReferenceSettings
from .privacy.rmia import class_probs
from .privacy.streams import REFERENCE
from .privacy.subject import load_subject
from .seeding import derive_seed, generator, seeded
from .train import train_network


def train_reference(ref: Path, r: int, pool_u8: torch.Tensor, pool_y: torch.Tensor, half: np.ndarray,
                     class_names: list[str], s: ReferenceSettings, device: torch.device) -> np.ndarray:
    """One reference pipeline in ``ref``; returns its network's class probabilities on the whole pool, (P, K)."""
    ref.mkdir(parents=True, exist_ok=True)
    npz = ref / "data.npz"
    if not npz.exists():
        inside, outside = torch.from_numpy(half), torch.from_numpy(~half)
        arrays = {"train_images": pool_u8[inside], "train_labels": pool_y[inside],
                  # The other half validates the experts: points this reference never trained on.
                  "val_images": pool_u8[outside], "val_labels": pool_y[outside],
                  "test_images": pool_u8[outside][:0], "test_labels": pool_y[outside][:0]}
        with atomic_path(npz) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **{k: (v.permute(0, 2, 3, 1).numpy() if v.ndim == 4 else v[:, None].numpy())
                                 .astype(np.uint8) for k, v in arrays.items()})
    seed = derive_seed(s.seed, REFERENCE, 1000 + r) % (2 ** 31)
    dev = str(device)
    dp = {} if s.dp_epsilon is None else {"dp_epsilon": s.dp_epsilon,
                                          "dp_init": "class-means" if s.init == "dp-means" else "none"}
    build_buffer(BufferConfig(data=str(npz), out=str(ref / "buffer"), model=s.model, experts=s.experts,
                              epochs=s.epochs, augment=s.augment, seed=seed, device=dev, **dp))
    run = ref / "run"
    if not (run / SYNSET_FILE).exists():
        cfg = RunConfig(buffer=str(ref / "buffer"), out=str(run), ipc=s.ipc, iterations=s.iterations,
                        syn_steps=s.syn_steps, expert_epochs=s.expert_epochs, init=s.init, hard_labels=s.hard_labels,
                        eval_models=0, seed=seed, device=dev)
        distill_run(cfg, resume=run.exists() and not restartable(run))
    subject = load_subject(run)
    with seeded(seed, REFERENCE, 2):
        net = create_model(subject.model, len(class_names), subject.images.shape[1], subject.images.shape[-1],
                           **subject.model_kwargs)
    net.to(device)
    train_network(net, subject.images.to(device), subject.targets.to(device), subject.recipe,
                  generator(seed, REFERENCE, 3))
    x = subject.preprocessing(pool_u8).to(device)
    return class_probs([net], x).numpy()
