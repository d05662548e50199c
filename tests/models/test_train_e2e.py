"""A tiny end-to-end run of the real commands: train -> export -> eval, on real digits."""

from __future__ import annotations

import json
import subprocess
import sys

from service.manifest import Manifest


def run(*args: str, cwd) -> str:
    res = subprocess.run([sys.executable, "-m", "models.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_train_export_eval(tmp_path):
    out = run("train", "mnist-multiple-flip", "--steps", "12", "--level-steps", "60", "--out", str(tmp_path / "runs"),
              "--repo", str(tmp_path / "repo"), "--name", "tiny", cwd=tmp_path)  # fmt: skip
    bundle = tmp_path / "repo" / "tiny" / "1"
    assert str(bundle) in out
    m = Manifest.load(bundle)
    assert m.dataset.name == "mnist-multiple-flip" and m.classes == [str(c) for c in range(10)]
    assert m.equivariance_error["rot90"] < 1e-5 and m.equivariance_error["flip"] < 1e-5
    for key in ("ood_accuracy", "ood_auroc", "level_mae_deg", "false_alarm_rate", "reflection_auroc"):
        assert key in m.metrics

    # bundles are immutable: exporting the same run again makes version 2 beside version 1
    run("export", str(tmp_path / "runs" / "mnist-multiple-flip" / "ckpt.pt"), "--repo", str(tmp_path / "repo"), "--name", "tiny", cwd=tmp_path)
    assert (tmp_path / "repo" / "tiny" / "2" / "manifest.json").is_file()
    assert Manifest.load(tmp_path / "repo" / "tiny" / "2").version == 2

    report = json.loads(run("eval", str(bundle), "--json", "--out", str(tmp_path / "eval"), cwd=tmp_path))
    for key in ("ood_accuracy", "ood_auroc", "level_mae_deg", "false_alarm_rate"):
        assert 0.0 <= report[key] <= 180.0
    assert 0.0 <= report["ood_accuracy"] <= 1.0 and 0.0 <= report["false_alarm_rate"] <= 1.0
    assert len(report["per_class"]) == 10
    for key in ("ood_accuracy_rule_true_level", "ood_accuracy_rule_true_pose", "ood_auroc_rotation_score",
                "false_alarm_rate_hard_rule", "ood_accuracy_score_at_rule_far"):  # fmt: skip
        assert 0.0 <= report[key] <= 1.0
    assert (tmp_path / "eval" / "levels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "OOD accuracy" in (tmp_path / "eval" / "eval.txt").read_text()


def test_train_on_an_unlabelled_folder(tmp_path, digits):
    """A user's own folder (no spec, no labels) is a dataset too: its images are the draws as they are."""
    from PIL import Image

    folder = tmp_path / "my-images"
    folder.mkdir()
    for i, img in enumerate(digits[0][:60]):
        Image.fromarray((img[0, :28, :28].numpy() * 255).astype("uint8")).save(folder / f"{i:03d}.png")
    out = run("train", str(folder), "--steps", "4", "--level-steps", "20", "--out", str(tmp_path / "runs"),
              "--repo", str(tmp_path / "repo"), cwd=tmp_path)  # fmt: skip
    m = Manifest.load(tmp_path / "repo" / "my-images" / "1")
    assert str(tmp_path / "repo" / "my-images" / "1") in out
    assert m.classes is None and m.calibration.group_by == "cluster"
    assert m.equivariance_error["rot90"] < 1e-5
