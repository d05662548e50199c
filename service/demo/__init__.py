"""A demo upstream: an ordinary digit classifier (ONNX Runtime, no torch) for symguard's guard to sit in front of.

classifier.onnx is trained by `python -m models.demo_classifier` on upright digits only; classifier.json describes
its input and records the upright test accuracy it was measured at. `python -m service.demo.upstream` serves it.
"""

from pathlib import Path

DEMO_DIR = Path(__file__).parent
