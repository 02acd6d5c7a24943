"""Checks that several stages run before any training, so a mistake costs seconds, not hours."""
from __future__ import annotations

from .errors import DistillError
from .models import create_model


def check_model_builds(name: str, num_classes: int, channels: int, size: int, model_kwargs: dict | None = None, *,
                       what: str | None = None) -> None:
    """Build the model once and throw it away; an unknown name, bad arguments or too small images
    raise :class:`DistillError` with one sentence, prefixed by ``what`` (default: the model's name)."""
    try:
        create_model(name, num_classes, channels, size, **(model_kwargs or {}))
    except (ValueError, TypeError) as e:
        raise DistillError(f"{what or f'Model {name}'} cannot be built for these images: {e}") from None
