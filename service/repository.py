"""The model repository on disk: REPO/NAME/VERSION/{manifest.json, model.onnx}, Triton-style.

Finding bundles and proving they are intact is all this module does; loading them into ONNX Runtime is runtime.py.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from service.errors import BundleError, IntegrityError, ModelNotFound
from service.manifest import MANIFEST_FILE, Manifest, is_safe_name, sha256_file

DEFAULT_MODEL = "mnist-multiple-flip"  # the shipped default bundle, preferred when several are served


def default_repository() -> Path:
    """This project's models/repository, found without importing the (torch-using) training package."""
    spec = importlib.util.find_spec("models")
    if spec is None or not spec.submodule_search_locations:
        return Path.cwd() / "models" / "repository"
    return Path(next(iter(spec.submodule_search_locations))) / "repository"


@dataclass(frozen=True)
class ModelRef:
    """NAME or NAME:VERSION, as given in ?model= or --model."""

    name: str
    version: int | None = None

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        name, sep, version = text.strip().partition(":")
        if not is_safe_name(name) or (sep and not version.isdigit()) or (version and int(version) < 1):
            raise ModelNotFound(f"{text[:100]!r} is not a model reference; expected NAME or NAME:VERSION")
        return cls(name, int(version) if version else None)

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}:{self.version}"


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its folder and parsed manifest."""

    path: Path
    manifest: Manifest

    @property
    def graph(self) -> Path:
        return self.path / self.manifest.graph


class Repository:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and is_safe_name(p.name) and self.versions(p.name)
        )

    def versions(self, name: str) -> list[int]:
        d = self.root / name
        if not is_safe_name(name) or not d.is_dir():
            return []
        # Dot-prefixed temp folders of an export in progress are not digits, so they are never picked up.
        return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) >= 1)

    def resolve(self, ref: ModelRef) -> Path:
        versions = self.versions(ref.name)
        if not versions:
            raise ModelNotFound(f"no model named {ref.name!r} in {self.root}")
        version = versions[-1] if ref.version is None else ref.version
        if version not in versions:
            raise ModelNotFound(f"model {ref.name!r} has no version {version} (has {versions})")
        return self.root / ref.name / str(version)

    def open(self, ref: ModelRef) -> Bundle:
        return verify(self.resolve(ref))


def verify(bundle_dir: Path) -> Bundle:
    """Parse the manifest and check that it names this folder and that every file matches its sha256."""
    try:
        manifest = Manifest.load(bundle_dir)
    except FileNotFoundError:
        raise BundleError(f"{bundle_dir} has no {MANIFEST_FILE}") from None
    except (ValidationError, ValueError) as e:
        raise BundleError(f"{bundle_dir / MANIFEST_FILE} is not a valid manifest: {e}") from None
    if manifest.name != bundle_dir.parent.name or str(manifest.version) != bundle_dir.name:
        raise BundleError(
            f"manifest says {manifest.name}:{manifest.version} but lives in {bundle_dir.parent.name}/{bundle_dir.name}"
        )
    listed = {f.path: f.sha256 for f in manifest.files}
    if manifest.graph not in listed:
        raise IntegrityError(f"manifest lists no sha256 for its graph {manifest.graph!r}")
    for rel, expected in listed.items():
        path = (bundle_dir / rel).resolve()
        if bundle_dir.resolve() not in path.parents:
            raise IntegrityError(f"manifest file {rel!r} points outside the bundle")
        if not path.is_file():
            raise IntegrityError(f"{rel} is missing from {bundle_dir}")
        actual = sha256_file(path)
        if actual != expected:
            raise IntegrityError(f"{rel} sha256 {actual[:12]}… does not match the manifest's {expected[:12]}…")
    return Bundle(bundle_dir, manifest)
