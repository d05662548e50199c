"""How well a checkpoint's pose network finds "up", on upright test digits of the mnist spec.

    python -m models.pose_diagnostic runs/mnist/ckpt.pt

Two tables (the ones in models/RESULTS.md): for the first 400 test digits turned by δ, how often the coarse D4 head
picks the element δ/90 and the fine angle's median |error|; and, over all test digits upright, how often the coarse
head picks the identity, per digit class, with what it picks instead.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from models.datasets import apply_pose, load_source, load_spec
from models.train import load_checkpoint


def main(argv: list[str] | None = None) -> int:
    ckpt = (argv if argv is not None else sys.argv[1:])[0]
    torch.set_num_threads(1)
    enc = load_checkpoint(ckpt)[0]
    test = load_source(load_spec("mnist")).test

    x = test.images[:400]
    n = len(x)
    print("δ    coarse right  fine |error| median")
    for d in (0, 10, 20, 30, 40):
        with torch.no_grad():
            _, pose, _, _, _, logits, _, _ = enc(apply_pose(x, torch.full((n,), float(d)), torch.zeros(n, dtype=torch.bool)))
        angle = torch.rad2deg(torch.atan2(pose[:, 1], pose[:, 0])).numpy()
        err = (angle - d + 180) % 360 - 180
        right = np.mean(logits.argmax(1).numpy() == round(d / 90) % 4)
        print(f"{d:3d}  {right:11.0%}  {np.median(np.abs(err)):8.1f}°")

    with torch.no_grad():
        picks = enc(test.images)[5].argmax(1).numpy()
    labels = np.asarray(test.labels)
    print(f"\ncoarse head picks the identity: {np.mean(picks == 0):.1%} of {len(picks)} upright test digits")
    for c in range(10):
        m = labels == c
        vals, counts = np.unique(picks[m], return_counts=True)
        print(f"digit {c}: n={m.sum():3d} identity {np.mean(picks[m] == 0):.0%}  picks {dict(zip(vals.tolist(), counts.tolist()))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
