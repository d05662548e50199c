"""Turn a decoded Pillow image into the model input the manifest describes. Shared by server, CLI and training."""

from __future__ import annotations

import numpy as np
from PIL import Image

from service.manifest import InputSpec


def fit_pad(img: Image.Image, size: int, background: float = 0.0) -> Image.Image:
    """Shrink to fit inside size x size (keeping aspect) if larger, then centre-pad to exactly size x size.

    Padding puts the odd pixel on the right/bottom, so a 28x28 MNIST digit lands at the top-left of a 29x29 canvas.
    """
    w, h = img.size
    if w > size or h > size:
        scale = size / max(w, h)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
        w, h = img.size
    if (w, h) == (size, size):
        return img
    fill = round(background * 255)
    canvas = Image.new(img.mode, (size, size), fill if img.mode == "L" else (fill,) * len(img.getbands()))
    canvas.paste(img, ((size - w) // 2, (size - h) // 2))
    return canvas


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert to 8-bit grayscale or RGB, flattening transparency onto black (the background of digit data)."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(base, rgba)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size and arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8))
    want = "L" if channels == 1 else "RGB"
    return img if img.mode == want else img.convert(want)  # convert() to its own mode would copy


def prepare(img: Image.Image, spec: InputSpec) -> Image.Image:
    """Channels and size, before normalisation: the picture the model sees."""
    return fit_pad(to_mode(img, spec.channels), spec.size, spec.background)


def normalise(img: Image.Image, spec: InputSpec) -> np.ndarray:
    """Pillow image already at the model's size and mode -> float32 [C, S, S]."""
    return normalise_many([img], spec)[0]


def normalise_many(images: list[Image.Image], spec: InputSpec) -> np.ndarray:
    """Pillow images already at the model's size and mode -> float32 [N, C, S, S], in one vectorised pass."""
    arr = np.stack([np.asarray(img) for img in images]).astype(np.float32) / 255.0
    arr = arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)
    return ((arr - spec.mean) / spec.std).astype(np.float32, copy=False)


def to_model_input(img: Image.Image, spec: InputSpec) -> np.ndarray:
    return normalise(prepare(img, spec), spec)
