"""The anchor's "standardized dataset": every image turned to its canonical pose. Torch-free (ONNX Runtime only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

from models.datasets import IMAGE_SUFFIXES
from service.geometry import canonicalize
from service.manifest import Manifest
from service.preprocess import to_model_input


def standardize(src: Path, dst: Path, bundle: Path, batch: int = 256) -> int:
    """Mirror src's tree into dst with each image replaced by M^m R_{-φ} x. Returns the number written."""
    m = Manifest.load(bundle)
    sess = ort.InferenceSession(str(bundle / m.graph), providers=["CPUExecutionProvider"])
    files = sorted(f for f in Path(src).rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
    for i in range(0, len(files), batch):
        chunk = files[i : i + batch]
        imgs = []
        for f in chunk:
            with Image.open(f) as im:
                imgs.append(ImageOps.exif_transpose(im).copy())
        x = np.stack([to_model_input(im, m.input) for im in imgs])
        pose, logit = sess.run([m.outputs.pose, m.outputs.reflection_logit], {m.input.name: x})
        angles = np.degrees(np.arctan2(pose[:, 1], pose[:, 0]))
        for f, im, a, l in zip(chunk, imgs, angles, logit):
            out = dst / f.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            canonicalize(im, float(a), bool(l > 0)).save(out.with_suffix(".png"))
    return len(files)
