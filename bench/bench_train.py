"""Benchmark: wall time and peak memory of reproducing the default bundle from scratch (`symguard train`).

    python bench/bench_train.py [--steps N] [--dataset mnist-multiple-flip]

Runs training + export in a child process and samples its RSS; prints one line per stage and a summary.
The budget from the learning issue: <= 15 min and <= 4 GB on the 2-core CPU machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except FileNotFoundError:
        pass
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="mnist-multiple-flip")
    ap.add_argument("--steps", type=int, default=None, help="default: the train command's default")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "models.cli", "train", a.dataset, "--out", f"{tmp}/runs", "--repo", f"{tmp}/repo", "--fresh"]
        if a.steps:
            cmd += ["--steps", str(a.steps)]
        t0 = time.time()
        proc = subprocess.Popen(cmd)
        peak = 0.0

        def watch() -> None:
            nonlocal peak
            while proc.poll() is None:
                peak = max(peak, rss_mb(proc.pid))
                time.sleep(0.5)

        th = threading.Thread(target=watch, daemon=True)
        th.start()
        rc = proc.wait()
        th.join()
        wall = time.time() - t0
    print(f"\ncommand: {' '.join(cmd[1:])}")
    print(f"exit {rc}  wall {wall / 60:.1f} min  peak RSS {peak:.0f} MB")
    sys.exit(rc)


if __name__ == "__main__":
    main()
