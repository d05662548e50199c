"""How well a checkpoint's pose finds "up", on upright test digits of the mnist spec (any encoder: the D4
autoencoder's or the pose posterior's).

    python -m models.pose_diagnostic runs/mnist/ckpt.pt

Two tables (models/RESULTS.md quotes them): for the first 400 test digits turned by δ, the median |error| of the
pose angle and how often it is within 45° of δ ("up found"); and, over all test digits upright, the same per
digit class.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from models.datasets import apply_pose, load_source, load_spec
from models.train import load_checkpoint


def angle_errors(enc: torch.nn.Module, x: torch.Tensor, delta_deg: float) -> np.ndarray:
    n = len(x)
    with torch.no_grad():
        pose = enc(apply_pose(x, torch.full((n,), delta_deg), torch.zeros(n, dtype=torch.bool)))[1]
    angle = torch.rad2deg(torch.atan2(pose[:, 1], pose[:, 0])).numpy()
    return np.abs((angle - delta_deg + 180) % 360 - 180)


def main(argv: list[str] | None = None) -> int:
    ckpt = (argv if argv is not None else sys.argv[1:])[0]
    torch.set_num_threads(1)
    enc = load_checkpoint(ckpt)[0]
    test = load_source(load_spec("mnist")).test

    print("δ     up found  |error| median")
    for d in (0, 10, 20, 30, 40, 90, 180):
        err = angle_errors(enc, test.images[:400], float(d))
        print(f"{d:3d}  {np.mean(err < 45):9.0%}  {np.median(err):8.1f}°")

    err = angle_errors(enc, test.images, 0.0)
    labels = np.asarray(test.labels)
    print(f"\nupright: up found for {np.mean(err < 45):.1%} of {len(err)} test digits, "
          f"median |error| {np.median(err):.1f}°")
    for c in range(10):
        m = labels == c
        print(f"digit {c}: n={m.sum():3d} up found {np.mean(err[m] < 45):.0%}  "
              f"median |error| {np.median(err[m]):.1f}°")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
