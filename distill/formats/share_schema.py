"""The share's HDF5 names and sanity limits, in one place (spec: docs/share-format.md).

Both the writer and the validating reader in :mod:`.share` import these, so a
key cannot drift between them; the document describes the same names for
people without Python.
"""
from __future__ import annotations

SHARE_FORMAT = "distill-share"
# 1.1: content_sha256 over every field; the privacy group states the guarantee (guarantee, dp,
# private_statistics) and no longer carries the audit's figures (summary is written empty); 1.0 files still load.
VERSION_MAJOR, VERSION_MINOR = 1, 1
FORMAT_VERSION = f"{VERSION_MAJOR}.{VERSION_MINOR}"


class Key:
    """Paths of groups and datasets, relative to the file's root."""

    IMAGES = "images"
    LABELS = "labels"
    LABEL_LOGITS = "label_logits"
    CLASS_NAMES = "class_names"
    PREPROCESSING = "preprocessing"
    RECIPE = "recipe"
    PROVENANCE = "provenance"
    PRIVACY = "privacy"


class Attr:
    """Attribute names, grouped by the object that carries them."""

    # root
    FORMAT = "format"
    FORMAT_VERSION = "format_version"
    CREATED = "created"
    PAYLOAD_SHA256 = "payload_sha256"
    CONTENT_SHA256 = "content_sha256"  # 1.1: every group, dataset and attribute but itself (content_sha256())
    NUM_IMAGES = "num_images"
    NUM_CLASSES = "num_classes"
    LICENSE = "license"
    DESCRIPTION = "description"
    CITATION = "citation"
    # images / labels / label_logits
    SPACE = "space"
    IMAGES_PER_CLASS = "images_per_class"
    KIND = "kind"
    TEMPERATURE = "temperature"
    TARGET = "target"
    # preprocessing (names shared with distill.data.Preprocessing.to_attrs)
    SIZE = "size"
    CHANNELS = "channels"
    ZCA = "zca"
    ZCA_EPS = "zca_eps"
    PIPELINE = "pipeline"
    # recipe: one attribute per distill.formats.share.Recipe field; model_kwargs is JSON
    MODEL_KWARGS = "model_kwargs"
    # provenance: JSON text each
    METHOD = "method"
    EXPERTS = "experts"
    DATASET = "dataset"
    SOFTWARE = "software"
    EXPORTED_WITH = "exported_with"
    # privacy
    AUDIT_STATUS = "audit_status"
    FORCED = "forced"
    SUMMARY = "summary"
    STATEMENT = "statement"
    AUDIT_CREATED = "audit_created"
    # privacy, v1.1 (optional when reading: a v1.0 share lacks them)
    GUARANTEE = "guarantee"  # the one sentence a data-protection officer signs, or "No formal privacy guarantee: ..."
    DP = "dp"  # JSON: the buffer's distill.formats.dp_record.DPRecord, every field; absent without DP
    PRIVATE_STATISTICS = "private_statistics"  # JSON list: statistics of the private images the share carries


PRE_ARRAYS = ("mean", "std", "zca_matrix", "zca_inverse", "zca_mean")
PROVENANCE_KEYS = (Attr.METHOD, Attr.EXPERTS, Attr.DATASET, Attr.SOFTWARE, Attr.EXPORTED_WITH)

# The payload hash covers these datasets, in this order, each as its raw little-endian
# C-order bytes (absent optional ones are skipped). They are everything a recipient
# trains on: pixels, targets and the transform it applies to its own data.
PAYLOAD_ORDER = (Key.IMAGES, Key.LABELS, Key.LABEL_LOGITS) + tuple(f"{Key.PREPROCESSING}/{a}" for a in PRE_ARRAYS)
# What a share without content_sha256 (format 1.0) leaves unchecked: everything but the payload.
UNVERIFIED_IN_1_0 = ("class names", "recipe", "preprocessing attributes", "provenance", "privacy record",
                     "licence, description, citation and creation time")
CONTENT_SINCE = (1, 1)  # the first version whose shares must carry content_sha256

LOSS_SOFT = "soft_cross_entropy"  # targets softmax(label_logits / temperature)
LOSS_HARD = "cross_entropy"  # targets the class ids
LOSSES = (LOSS_SOFT, LOSS_HARD)
LR_DECAYS = ("half", "none")
# The recipe's augmentation: a comma- (or underscore-) joined list of these names, or none/off/empty for none.
# They are the transforms distill.augment interprets (tests/test_share.py checks the two lists agree).
AUGMENT_TRANSFORMS = ("color", "crop", "cutout", "flip", "scale", "rotate")
NO_AUGMENT = ("", "none", "off")


def augment_transforms(text: str | None) -> tuple[str, ...] | None:
    """The transforms a recipe's ``augment`` names, or None for none; ``ValueError`` for an unknown name."""
    if text is None or text.strip().lower() in NO_AUGMENT:
        return None
    parts = tuple(p.strip() for p in text.replace("_", ",").split(",") if p.strip())
    bad = [t for t in parts if t not in AUGMENT_TRANSFORMS]
    if bad:
        raise ValueError(f"Unknown augmentation {', '.join(bad)}; choose from {', '.join(AUGMENT_TRANSFORMS)}.")
    return parts
AUDIT_STATUSES = ("passed", "failed", "missing", "invalid")
# The privacy group's sentences (v1.1). A DP share's guarantee is DPRecord.sentence() of its ``dp`` record.
NO_GUARANTEE = ("No formal privacy guarantee: the synthetic images were distilled from the private images without "
                "differential privacy; an empirical audit is the only evidence.")
AUDIT_OUTSIDE = ("The audit is an empirical test run inside the hospital; its verdict is outside the formal guarantee, "
                 "and its figures, computed from the private images, stay there.")
LOGITS_KIND = "logits"
IMAGE_SPACE = "preprocessed"
SOFT_TARGET = "softmax(label_logits / temperature)"
PIPELINE = "x = uint8 / 255; x = (x - mean[c]) / std[c]; if zca: x = (flatten(x) - zca_mean) @ zca_matrix"

# Sanity limits. The reader checks declared shapes and attribute sizes against
# them before it reads any data, so a hostile or damaged file cannot make it
# allocate memory it does not have (a gzip'ed dataset can declare 1e12 elements
# in a few bytes).
MAX_IMAGES = 100_000  # distilled sets are IPC x classes; IPC 50 x 1000 classes is 50,000
MAX_CHANNELS = 16  # greyscale, RGB, or a handful of MR sequences
MAX_SIDE = 1024  # pixels; distillation above 512 x 512 is not practical today
MAX_CLASSES = 10_000
MAX_CLASS_NAME_BYTES = 1024
MAX_ARRAY_BYTES = 2 << 30  # one dataset; also bounds the ZCA matrix to D <= ~23,000 (3 x 64 x 64 is 12,288)
MAX_TOTAL_BYTES = 4 << 30  # every dataset the reader loads, together
MAX_ATTR_BYTES = 1 << 20  # provenance JSON is a few kB; a description longer than 1 MiB is not a description
MAX_ATTRS = 64  # per object; v1 has at most 14
MAX_OBJECTS = 256  # links in the whole file; v1 has at most 14
