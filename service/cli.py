"""`symguard` console entry point.

serve and score live here and never import torch. train, export, eval and standardize belong to the training
side and are imported only when asked for, so a serving install does not need torch at all.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TRAINING = ("train", "export", "eval", "eval-guard", "standardize")

USAGE = """usage: symguard COMMAND [ARGS...]

serving (no torch):
  serve            HTTP server; `symguard serve --help` lists every setting (also SYMGUARD_* env vars)
  guard            the server as a proxy in front of a classifier: --upstream URL --mode monitor|annotate|gate|
                   canonicalize; `symguard guard --help` lists every setting (also SYMGUARD_GUARD_* env vars)
  score IMAGE...   print the server's /v1/score JSON for local images, no server needed
  bench            side-by-side serving benchmark (bench/compare.py of a source checkout; --help for options)

training (needs the [train] extra):
  train            learn pose and symmetry level from a dataset spec or image folder, export a bundle
  export           export a finished run as a new bundle version
  eval             quality table for a bundle
  eval-guard       demo classifier accuracy on rotated/mirrored test digits, direct and through the guard
  standardize      write de-rotated, de-mirrored copies of a folder
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "serve":
        return cmd_serve(rest)
    if cmd == "score":
        return cmd_score(rest)
    if cmd == "guard":
        return cmd_guard(rest)
    if cmd in TRAINING:
        try:
            from models.cli import main as training_main  # lazy: this is where torch comes in
        except ImportError as e:
            print(f"symguard {cmd} needs the training extra (pip install 'symguard[train]'): {e}", file=sys.stderr)
            return 2
        return int(training_main([cmd, *rest]) or 0)
    if cmd == "bench":
        return cmd_bench(rest)
    print(f"symguard: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr, end="")
    return 2


def cmd_serve(args: list[str]) -> int:
    from pydantic_settings import CliApp

    from service.config import Settings
    from service.server import serve

    settings = CliApp.run(Settings, cli_args=args)
    return serve(settings)


def cmd_bench(args: list[str]) -> int:
    """bench/compare.py, run by this Python. The benchmark is a repository tool, not package code: it starts a
    naive torch server, BentoML from its own venv and symguard side by side (BENCHMARKS.md)."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "bench" / "compare.py"
    if not script.is_file():
        print("symguard bench runs bench/compare.py from a source checkout of symguard (git clone, then "
              "pip install -e '.[train,dev]'); this install has no bench/ folder", file=sys.stderr)  # fmt: skip
        return 2
    return subprocess.call([sys.executable, str(script), *args])


def cmd_guard(args: list[str]) -> int:
    from pydantic import ValidationError
    from pydantic_settings import CliApp

    from service.guard_config import GuardSettings
    from service.server import serve

    try:
        settings = CliApp.run(GuardSettings, cli_args=args)
    except ValidationError as e:  # e.g. no --upstream: say which setting, not a traceback
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg']}" for err in e.errors())
        print(f"symguard guard: {problems} (see symguard guard --help)", file=sys.stderr)
        return 2
    return serve(settings, "service.guard_app:create_guard_app")


def cmd_score(args: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="symguard score", description="Score image files with a bundle, locally; prints the /v1/score JSON."
    )
    p.add_argument(
        "images", nargs="+", type=Path, help="image files (PNG, JPEG, ...); EXIF orientation is applied first"
    )
    p.add_argument("--model", help="NAME or NAME:VERSION (default: the newest version of the default model)")
    p.add_argument(
        "--repository",
        type=Path,
        help="model repository (default: SYMGUARD_REPOSITORY or this project's models/repository)",
    )
    p.add_argument("--bundle", type=Path, help="a bundle folder (REPO/NAME/VERSION) instead of --repository/--model")
    a = p.parse_args(args)

    from service import runtime
    from service.config import Settings
    from service.errors import SymguardError
    from service.inputs import Encoded, prepare_batch
    from service.repository import DEFAULT_MODEL, ModelRef, Repository, default_repository, verify
    from service.schemas import ScoreResponse

    settings = Settings()
    try:
        if a.bundle:
            bundle = verify(a.bundle.resolve())
        else:
            repo = Repository(a.repository or settings.repository or default_repository())
            names = repo.names()
            ref = ModelRef.parse(
                a.model or settings.model or (DEFAULT_MODEL if DEFAULT_MODEL in names or not names else names[0])
            )
            bundle = repo.open(ref)
        rt = runtime.load(bundle, settings.intra_op_threads * settings.workers)  # one process, every core
        encoded = []
        for path in a.images:
            try:
                encoded.append(Encoded(path.read_bytes(), str(path)))
            except OSError as e:
                print(f"symguard score: cannot read {path}: {e.strerror}", file=sys.stderr)
                return 1
        # The server's batch size bounds one session.run here too.
        rows = []
        for i in range(0, len(encoded), settings.max_batch):
            rows += rt.score(
                prepare_batch(encoded[i : i + settings.max_batch], rt.manifest.input, settings.max_pixels)
            )[1]
    except SymguardError as e:
        print(f"symguard score: {e.message}", file=sys.stderr)
        return 1
    print(
        ScoreResponse(model=rt.name, version=rt.version, provider=rt.provider, results=rows).model_dump_json(indent=2)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
