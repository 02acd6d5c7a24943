"""What a share's provenance may hold: the whitelists of the ``provenance`` group (docs/share-format.md).

The share's ``provenance`` group carries JSON attributes (:class:`.share_schema.Attr`): ``method`` (the run's
settings in :data:`METHOD_KEYS`, plus ``name`` = :data:`METHOD_NAME`), ``experts`` (:data:`EXPERT_KEYS`, its
``train`` record :data:`EXPERT_TRAIN_KEYS`), ``dataset`` (a MedMNIST name or "custom", geometry, per-class counts,
the split's description :data:`SPLIT_KEYS`, a salted hash of the source), ``software`` and ``exported_with``
(:data:`SOFTWARE_KEYS`). :mod:`distill.runshare` fills them from a run; nothing outside these lists travels.

The ``privacy`` group's keys (audit status, forced, statement, audit time, guarantee, DP record, private
statistics) are :class:`.share_schema.Attr` too; the audit's figures stay home (share 1.1).
"""
from __future__ import annotations

METHOD_NAME = "mtt"  # Matching Training Trajectories (Cazenavette et al. 2022)
# The run settings that travel. Every RunConfig field is in exactly one of these two lists
# (a test checks it), so a new field stays home until someone decides where it belongs.
METHOD_KEYS = ("ipc", "iterations", "syn_steps", "expert_epochs", "min_start_epoch", "max_start_epoch",
               "trajectories_per_iter", "init", "init_correct_only", "hard_labels", "label_temperature",
               "label_snapshot", "lr_img", "lr_lr", "lr_label", "syn_lr_init", "max_log_lr_step", "min_syn_lr_fraction", "momentum", "batch_syn", "augment", "gradient", "eval_every",
               "eval_models", "eval_epochs", "checkpoint_every", "seed",
               "precision")  # bf16 changes the numbers, as the gradient mode does
METHOD_HOME_ONLY = ("buffer", "out", "data", "device", "fast", "max_memory",
                    "workers")  # paths, the hospital's data name, its hardware (memory, cores) and how it ran there
EXPERT_KEYS = ("count", "epochs", "snapshot_every", "snapshot_dtype", "steps_per_epoch", "snapshots", "model",
               "model_kwargs", "seed", "zca", "train")
EXPERT_TRAIN_KEYS = ("epochs", "lr", "momentum", "weight_decay", "batch_size", "augment", "decay_at_half")
SOFTWARE_KEYS = ("distill", "python", "torch", "numpy", "h5py", "kornia", "torchvision", "scipy", "cuda", "cudnn")
# The split's description, not its members: hashes of the members would link shares of one buffer.
SPLIT_KEYS = ("method", "pool", "seed", "carved", "val_fraction", "test_fraction", "patient_grouped", "read")
# dataset: the salted hash of the source; both are drawn at export, so a page made before export omits them.
SALT = "salt"
SALTED_SHA256 = "source_sha256_salted"
SALT_BYTES = 16  # 128 bits: no two shares ever share a salt, so their hashes cannot be matched up
