from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models.datasets import SPECS_DIR, draw_poses, load_folder, load_source, load_spec, true_levels
from service.manifest import InputSpec


@pytest.mark.parametrize("name", sorted(p.stem for p in SPECS_DIR.glob("*.yaml")))
def test_builtin_specs_load(name):
    spec = load_spec(name)
    assert spec.name == name


def test_split_is_fixed_and_disjoint():
    a, b = load_source(load_spec("mnist")), load_source(load_spec("mnist"))
    assert torch.equal(a.test.images, b.test.images)
    assert len(a.train.images) + len(a.calib.images) + len(a.test.images) == 5000
    flat = lambda s: {bytes(x.numpy().tobytes()) for x in s.images}  # noqa: E731
    assert not (flat(a.train) & flat(a.test)) and not (flat(a.calib) & flat(a.test))
    assert a.test.images.shape[1:] == (1, 29, 29)


def test_poses_follow_the_flip_spec():
    spec = load_spec("mnist-multiple-flip")
    classes = [str(c) for c in range(10)]
    labels = torch.arange(10).repeat(400)
    angle, mirrored = draw_poses(spec, labels, classes, torch.Generator().manual_seed(0))
    for c in range(10):
        sel = labels == c
        assert angle[sel].abs().max() <= 18 * c + 1e-4
        if c > 0:
            assert angle[sel].abs().max() > 0.8 * 18 * c
        rate = mirrored[sel].float().mean().item()
        assert (abs(rate - 0.5) < 0.1) if c in (0, 1, 5, 6, 8) else rate == 0.0
    w, r = true_levels(spec, labels, classes)
    assert w[labels.numpy() == 9][0] == 162 and r[labels.numpy() == 2][0] == 0.0


def test_cyclic_spec_draws_group_elements():
    spec = load_spec("mnist-c2c4")
    labels = torch.tensor([0] * 200 + [7] * 200)
    angle, _ = draw_poses(spec, labels, [str(c) for c in range(10)], torch.Generator().manual_seed(0))
    assert set(np.round(angle[:200].numpy()).tolist()) <= {0.0, -180.0, 180.0}
    assert set(np.round(angle[200:].numpy()).tolist()) <= {0.0, 90.0, -90.0, -180.0, 180.0}


def test_a_folder_with_class_subfolders_is_a_dataset(tmp_path):
    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(np.full((40, 30), 40 * i, np.uint8)).save(tmp_path / cls / f"{i}.png")
    x, y, classes = load_folder(tmp_path, InputSpec(size=29))
    assert classes == ["cats", "dogs"] and x.shape == (6, 1, 29, 29) and y.tolist() == [0, 0, 0, 1, 1, 1]
    spec = load_spec(str(tmp_path))
    assert spec.source == "folder" and not spec.augment
