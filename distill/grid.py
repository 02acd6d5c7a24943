"""The PNG grid of images, one row per class, that both a share (``distill inspect --grid``) and a run folder
(``grid_NNNNN.png``) draw. Pixels only: it knows neither the share's schema nor the method."""
from __future__ import annotations

import numpy as np
import torch

GRID_LABEL_CHARS = 24  # a class name longer than this is cut in the grid's label strip


def labelled_grid(images01: torch.Tensor, per_row: int, class_names: list[str] | None, *, padding: int = 2,
                  pad_value: float = 0.0):
    """A PIL image of ``images01`` (N, C, H, W) in [0, 1], ``per_row`` per row, row k being class k.

    With ``class_names``, a white strip on the left names each row's class (PIL's built-in
    font, so no font file is needed).
    """
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.utils import make_grid

    grid = make_grid(images01.float().clamp(0, 1), nrow=per_row, padding=padding, pad_value=pad_value)
    img = Image.fromarray(np.ascontiguousarray(grid.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()))
    if not class_names:
        return img
    font = ImageFont.load_default()
    names = [n if len(n) <= GRID_LABEL_CHARS else n[:GRID_LABEL_CHARS - 3] + "..." for n in map(str, class_names)]
    if not isinstance(font, ImageFont.FreeTypeFont):  # Pillow without FreeType: a Latin-1 bitmap font
        names = [n.encode("latin-1", "replace").decode("latin-1") for n in names]
    measure = ImageDraw.Draw(img)
    boxes = [measure.textbbox((0, 0), n, font=font) for n in names]
    strip = max(b[2] - b[0] for b in boxes) + 2 * padding + 2
    canvas = Image.new("RGB", (strip + img.width, img.height), "white")
    canvas.paste(img, (strip, 0))
    draw = ImageDraw.Draw(canvas)
    row_h = images01.shape[-2] + padding
    for r, (name, box) in enumerate(zip(names, boxes)):
        y = padding + r * row_h + (images01.shape[-2] - (box[3] - box[1])) // 2 - box[1]
        draw.text((padding, y), name, fill="black", font=font)
    return canvas
