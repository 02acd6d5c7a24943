"""Run to share: the share a run folder's synthetic set becomes, with its provenance scrubbed.

Both ``distill export`` (which writes it) and ``distill audit`` (which trains on
exactly the recipe a recipient will get) build the share here.

Provenance goes through whitelists, not blacklists: a field the run record
gains later (a path, a host name) stays home until someone reviews it and adds
it here. Strings that survive the whitelist are still dropped when they look
like a path or a file name.
"""
from __future__ import annotations

import hashlib
import logging
import math
import re
import secrets
from typing import Any

from .config import RunConfig
from .data import MEDMNIST, SPLITS
from .errors import DistillError
from .formats.share import Recipe, Share
from .formats.share_schema import LOSS_HARD, LOSS_SOFT, Attr
from .formats.synset import SyntheticSet
from .io import software_versions
from .train import EVAL_BATCH, EVAL_MOMENTUM, EVAL_WEIGHT_DECAY

log = logging.getLogger(__name__)

METHOD_NAME = "mtt"  # Matching Training Trajectories (Cazenavette et al. 2022)
# The run settings that travel. Every RunConfig field is in exactly one of these two lists
# (a test checks it), so a new field stays home until someone decides where it belongs.
METHOD_KEYS = ("ipc", "iterations", "syn_steps", "expert_epochs", "min_start_epoch", "max_start_epoch",
               "trajectories_per_iter", "init", "init_correct_only", "hard_labels", "label_temperature",
               "label_snapshot", "lr_img", "lr_lr", "lr_label", "syn_lr_init", "max_log_lr_step", "min_syn_lr_fraction", "momentum", "batch_syn", "augment", "gradient", "eval_every",
               "eval_models", "eval_epochs", "checkpoint_every", "seed",
               "precision")  # bf16 changes the numbers, as the gradient mode does
METHOD_HOME_ONLY = ("buffer", "out", "data", "device", "fast",
                    "max_memory")  # paths, the hospital's data name, its hardware (its memory) and how it ran there
EXPERT_KEYS = ("count", "epochs", "snapshot_every", "snapshot_dtype", "steps_per_epoch", "snapshots", "model",
               "model_kwargs", "seed", "zca", "train")
EXPERT_TRAIN_KEYS = ("epochs", "lr", "momentum", "weight_decay", "batch_size", "augment", "decay_at_half")
SOFTWARE_KEYS = ("distill", "python", "torch", "numpy", "h5py", "kornia", "torchvision", "scipy", "cuda", "cudnn")
# The split's description, not its members: hashes of the members would link shares of one buffer.
SPLIT_KEYS = ("method", "pool", "seed", "carved", "val_fraction", "test_fraction", "patient_grouped", "read")
SALT_BYTES = 16  # 128 bits: no two shares ever share a salt, so their hashes cannot be matched up

_MAX_TEXT = 200  # a provenance value longer than this is not a setting
_MAX_DEPTH = 8  # nesting of the audit summary (summary > membership > share > attack > metric > ...)
_MAX_STATEMENT = 4000  # characters; an audit statement is a paragraph
# Extensions of the files a hospital's data or runs live in: a word ending in one is a file name.
_EXT = r"\.(?:npz|npy|h5|hdf5|png|jpe?g|dcm|dicom|nii|gz|zip|tiff?|bmp|csv|json|toml|ya?ml|txt|pt|pth)"
_FILE_LIKE = re.compile(_EXT + r"$", re.IGNORECASE)
_PATHLIKE_WORD = re.compile(r"\S*[/\\]\S*|\S+" + _EXT + r"\b", re.IGNORECASE)
DROP = object()


def scrub(value: Any, *, redact: bool = False, depth: int = 0) -> Any:
    """A strict-JSON copy of ``value`` (``DROP`` if nothing is left).

    Strings that could be paths or file names are dropped; with ``redact`` (free
    text such as the audit's reasons) only their path-like words are replaced.
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None  # strict JSON has no NaN; other languages must read it
    if isinstance(value, str):
        return scrub_sentence(value) if redact else value if is_plain(value) else DROP
    if depth >= _MAX_DEPTH:
        return DROP
    if isinstance(value, dict):
        out = {str(k): scrub(v, redact=redact, depth=depth + 1) for k, v in value.items() if is_plain(str(k))}
        return {k: v for k, v in out.items() if v is not DROP}
    if isinstance(value, (list, tuple)):
        return [v for v in (scrub(x, redact=redact, depth=depth + 1) for x in value) if v is not DROP]
    return DROP


def is_plain(s: str) -> bool:
    return len(s) <= _MAX_TEXT and "/" not in s and "\\" not in s and not _FILE_LIKE.search(s)


def scrub_sentence(text: str) -> str:
    """Free text from the audit, with any path-like or file-name-like word replaced."""
    return _PATHLIKE_WORD.sub("[removed]", text)[:_MAX_STATEMENT]


def _pick(record: dict, keys: tuple[str, ...]) -> dict:
    out = {}
    for k in keys:
        if k in record:
            v = scrub(record[k])
            if v is not DROP:
                out[k] = v
    dropped = sorted(set(record) - set(out))
    if dropped:
        log.debug("Provenance fields kept at home: %s", ", ".join(dropped))
    return out


def dataset_fingerprint(fp: dict, salt: bytes, *, dp: bool = False) -> dict:
    """The source dataset as a share may describe it: a MedMNIST name or "custom", geometry,
    per-class counts per split, how the split came about (:data:`SPLIT_KEYS`), and a salted
    hash in place of the source's SHA-256.

    With ``dp`` (a DP run) the counts and the hash are left out: both are computed from
    the private images outside the DP record, so a DP share carries neither.

    ``source_sha256_salted`` is SHA-256(salt || the 64 lowercase hex characters of the
    source's SHA-256). The salt stops anyone linking two shares of one source by their
    hashes; a holder of the source file (and only they) can still confirm the link.
    """
    name = fp.get("name")
    out: dict = {"name": name if name in MEDMNIST else "custom"}
    for k in ("channels", "size"):
        if isinstance(fp.get(k), int):
            out[k] = fp[k]
    counts = {} if dp else fp.get("counts") or {}
    out["counts"] = {s: [int(c) for c in counts[s]] for s in SPLITS if isinstance(counts.get(s), list)}
    split = fp.get("split")
    if isinstance(split, dict):  # how val/test came about, so an audit of the share can redo the carve
        out["split"] = scrub({k: split[k] for k in SPLIT_KEYS if k in split})
    sha = fp.get("sha256")
    if isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha) and not dp:
        out["salt"] = salt.hex()
        out["source_sha256_salted"] = hashlib.sha256(salt + sha.encode("ascii")).hexdigest()
    return out


def private_statistics(s: SyntheticSet) -> list[str]:
    """The statistics of the private images that the share of ``s`` carries beside the synthetic images.

    A DP run's share carries none outside its DP record: its normalisation is fixed, and
    :func:`dataset_fingerprint` leaves out the counts and the hash.
    """
    if s.dp is not None:
        return []
    out = ["normalisation mean and std of the training images"]
    if s.preprocessing.zca:
        out.append("ZCA whitening transform of the training images")
    counts = (s.fingerprint or {}).get("counts")
    if isinstance(counts, dict) and counts:
        out.append("class counts of the training, validation and test splits")
    if isinstance((s.fingerprint or {}).get("sha256"), str):
        out.append("salted SHA-256 of the source data file")
    return out


def guarantee_record(s: SyntheticSet) -> dict:
    """The privacy group's statement of the guarantee: the DP record (or none) and the private statistics carried."""
    if s.dp is not None and s.preprocessing.zca:
        raise DistillError("This run is differentially private but its preprocessing holds a ZCA transform computed "
                           "from the private images; rebuild the buffer without --zca.")
    return {Attr.DP: s.dp, Attr.PRIVATE_STATISTICS: private_statistics(s)}


def _method_provenance(method: dict, augment: str) -> dict:
    """The run's settings that travel; a public start travels as "public" and its SHA-256, never its path."""
    out = _pick(method, METHOD_KEYS) | {"name": METHOD_NAME, "augment": augment}
    init = str(method.get("init", ""))
    if ":" in init:
        out["init"] = init.partition(":")[0]
    sha = method.get("init_public_sha256")
    if isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha):
        out["init_public_sha256"] = sha
    return out


def share_from_synset(s: SyntheticSet, privacy: dict, *, license: str, description: str, citation: str) -> Share:
    """The share of a synthetic set, with scrubbed provenance, the recipient's training recipe and the
    statement of its privacy guarantee (:func:`guarantee_record`) added to ``privacy``."""
    method = s.method or {}
    augment = str(method.get("augment") or "none")
    expert_train = (s.experts or {}).get("train")
    if augment == "expert":  # RunConfig's "the buffer's own augmentation"
        augment = str((expert_train if isinstance(expert_train, dict) else {}).get("augment") or "none")
    model_kwargs = scrub(s.model_kwargs)
    if model_kwargs != s.model_kwargs:
        raise DistillError(f"The model arguments {s.model_kwargs} cannot travel in a share (paths or non-JSON values).")
    recipe = Recipe(model=s.model, model_kwargs=model_kwargs, lr=float(s.syn_lr),
                    epochs=int(method.get("eval_epochs", RunConfig().eval_epochs)), batch_size=EVAL_BATCH,
                    momentum=EVAL_MOMENTUM, weight_decay=EVAL_WEIGHT_DECAY, lr_decay="half", augment=augment,
                    loss=LOSS_HARD if s.label_logits is None else LOSS_SOFT)
    experts = _pick(s.experts or {}, EXPERT_KEYS)
    if isinstance(experts.get("train"), dict):
        experts["train"] = _pick(experts["train"], EXPERT_TRAIN_KEYS)
    provenance = {
        Attr.METHOD: _method_provenance(method, augment),
        Attr.EXPERTS: experts,
        Attr.DATASET: dataset_fingerprint(s.fingerprint or {}, secrets.token_bytes(SALT_BYTES), dp=s.dp is not None),
        Attr.SOFTWARE: _pick(s.software or {}, SOFTWARE_KEYS),
        Attr.EXPORTED_WITH: _pick(software_versions(), SOFTWARE_KEYS),
    }
    return Share(images=s.images, labels=s.labels, label_logits=s.label_logits,
                 label_temperature=float(s.label_temperature), class_names=list(s.class_names),
                 preprocessing=s.preprocessing, recipe=recipe, provenance=provenance,
                 privacy={**privacy, **guarantee_record(s)},
                 license=license, description=description, citation=citation)
