"""How well can the encoder learn "which way is up" from the identity prior alone? A quick probe of pose heads.

    python -m models.prior_probe --pose-hidden 0 --steps 600      # linear read-out of the pooled fields
    python -m models.prior_probe --pose-hidden 32 --steps 600     # the equivariant MLP pose head (the default)

Trains only the coarse D4 cross-entropy toward the identity on upright training digits of the mnist spec (optionally
turned by up to --jitter-deg, so the pixel grid is not the cue) and prints, every 100 steps, the share of upright
test digits whose coarse head picks the identity, overall and per digit. RESULTS.md quotes its output.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from models.datasets import load_source, load_spec
from models.networks import Encoder, rotate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pose-hidden", type=int, default=32)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--jitter-deg", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    src = load_source(load_spec("mnist"))
    test_labels = src.test.labels.numpy()

    enc = Encoder(pose_hidden=a.pose_hidden)
    opt = torch.optim.AdamW(enc.parameters(), lr=a.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=a.steps, pct_start=0.1)
    t0 = time.time()
    for step in range(1, a.steps + 1):
        x = src.train.images[torch.randint(0, len(src.train.images), (a.batch,))]
        if a.jitter_deg:
            d = (torch.rand(a.batch) * 2 - 1) * math.radians(a.jitter_deg)
            x = rotate(x, torch.cos(d), torch.sin(d))
        loss = F.cross_entropy(enc(x)[5], torch.zeros(a.batch, dtype=torch.long))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == a.steps:
            enc.eval()
            with torch.no_grad():
                picks = enc(src.test.images)[5].argmax(1).numpy()
            enc.train()
            per = " ".join(f"{np.mean(picks[test_labels == c] == 0):.2f}" for c in range(10))
            print(f"step {step:4d}  loss {loss.item():.3f}  identity {np.mean(picks == 0):.1%}  per digit 0-9: {per}"
                  f"  ({time.time() - t0:.0f} s)", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
