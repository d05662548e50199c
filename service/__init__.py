"""symguard runtime: serve per-input symmetry OOD scores from ONNX bundles. No torch here."""

__version__ = "0.1.0"
