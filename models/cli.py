"""Training-side subcommands of `symguard`: train, export, eval, eval-guard, standardize. Imported lazily by service/cli.py."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPOSITORY = Path(__file__).parent / "repository"
DEFAULT_MODEL = "mnist-multiple-flip"


def newest_bundle(repo: Path, name: str) -> Path:
    versions = sorted((int(p.name) for p in (repo / name).iterdir() if p.name.isdigit()), reverse=True)
    if not versions:
        raise FileNotFoundError(f"no versions of {name!r} under {repo}")
    return repo / name / str(versions[0])


def resolve_bundle(ref: str | None) -> Path:
    """None -> the shipped default; a folder with manifest.json; or NAME[:VERSION] in the default repository."""
    if ref is None:
        return newest_bundle(REPOSITORY, DEFAULT_MODEL)
    p = Path(ref)
    if (p / "manifest.json").is_file():
        return p
    name, _, version = ref.partition(":")
    return REPOSITORY / name / version if version else newest_bundle(REPOSITORY, name)


def cmd_train(a: argparse.Namespace) -> int:
    from models.export import export_run
    from models.train import TrainConfig, train

    cfg = TrainConfig(
        dataset=a.dataset, out=a.out, steps=a.steps, level_steps=a.level_steps, seed=a.seed, threads=a.threads,
        contrast=a.contrast, elastic=a.elastic, lattice=not a.no_lattice,
    )
    ckpt = train(cfg, resume=not a.fresh)
    if a.no_export:
        print(ckpt)
        return 0
    bundle = export_run(ckpt, Path(a.repo), name=a.name, alpha=a.alpha)
    print(f"[export] wrote {bundle}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from models.export import export_run

    print(export_run(Path(a.checkpoint), Path(a.repo), name=a.name, version=a.version, alpha=a.alpha))
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from models.eval import dump, evaluate_path

    bundle = resolve_bundle(a.bundle)
    out = Path(a.out) if a.out else Path("runs") / "eval" / f"{bundle.parent.name}-{bundle.name}"
    out.mkdir(parents=True, exist_ok=True)
    report = evaluate_path(bundle, dataset=a.dataset, seed=a.seed, plot=out / "levels.png")
    (out / "eval.json").write_text(dump(report) + "\n")
    (out / "eval.txt").write_text(report.table() + "\n")
    print(dump(report) if a.json else report.table() + f"\n\n  wrote {out}/eval.json, eval.txt, levels.png")
    return 0


def cmd_eval_guard(a: argparse.Namespace) -> int:
    from models.guard_eval import evaluate

    report = evaluate(model=a.model, repository=a.repository, n=a.n, seed=a.seed, via=a.via, concurrency=a.concurrency)
    print(report.model_dump_json(indent=2) if a.json else report.table())
    return 0


def cmd_standardize(a: argparse.Namespace) -> int:
    from models.standardize import standardize

    n = standardize(Path(a.src), Path(a.dst), resolve_bundle(a.bundle))
    print(f"[standardize] wrote {n} canonical images to {a.dst}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from models.train import TrainConfig as C  # one home for the training defaults (torch: training commands only)

    p = argparse.ArgumentParser(prog="symguard", description="Learn and evaluate per-input symmetry levels.")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="learn pose and symmetry level from a dataset spec or an image folder, then export a bundle")
    t.add_argument("dataset", nargs="?", default=DEFAULT_MODEL, help="built-in spec (models/specs/*.yaml), a spec YAML, or an image folder")
    t.add_argument("--steps", type=int, default=C.steps, help="pose-posterior steps (each: a batch and a turned copy)")
    t.add_argument("--contrast", type=float, default=C.contrast, help="weight of the embedding's InfoNCE term")
    t.add_argument("--elastic", type=float, default=C.elastic, help="elastic deformation of the copy, pixels (0: none)")
    t.add_argument("--no-lattice", action="store_true",
                   help="keep each draw's pixel lattice turned with its content (the recipe of mnist-multiple-flip/7)")
    t.add_argument("--level-steps", type=int, default=C.level_steps, help="steps for the level and group heads")
    t.add_argument("--out", default=C.out, help="checkpoint folder (resumable)")
    t.add_argument("--repo", default=str(REPOSITORY), help="model repository to export into")
    t.add_argument("--name", default=None, help="bundle name (default: the dataset name)")
    t.add_argument("--alpha", type=float, default=0.01, help="false-alarm rate to calibrate for")
    t.add_argument("--seed", type=int, default=C.seed)
    t.add_argument("--threads", type=int, default=C.threads, help="torch threads (0: all cores)")
    t.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    t.add_argument("--no-export", action="store_true", help="stop after training")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("export", help="export a finished training run as a new bundle version")
    e.add_argument("checkpoint")
    e.add_argument("--repo", default=str(REPOSITORY))
    e.add_argument("--name", default=None)
    e.add_argument("--version", type=int, default=None)
    e.add_argument("--alpha", type=float, default=0.01)
    e.set_defaults(fn=cmd_export)

    v = sub.add_parser("eval", help="evaluate a bundle (default: the shipped one) on held-out test digits")
    v.add_argument("bundle", nargs="?", default=None, help="bundle folder or NAME[:VERSION]")
    v.add_argument("--dataset", default=None, help="evaluate against another spec than the bundle's own")
    v.add_argument("--json", action="store_true", help="print JSON instead of the table")
    v.add_argument("--out", default=None, help="where eval.json, eval.txt and levels.png go")
    v.add_argument("--seed", type=int, default=0)
    v.set_defaults(fn=cmd_eval)

    g = sub.add_parser("eval-guard", help="the demo classifier's accuracy on posed test digits, direct and through `symguard guard`")
    g.add_argument("--model", default=None, help="bundle NAME[:VERSION] for the guard (default: mnist if present, else the default)")
    g.add_argument("--repository", type=Path, default=None, help="model repository (default: models/repository)")
    g.add_argument("--n", type=int, default=500, help="test digits per row (at most the test split's size)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--via", choices=["guard", "serve"], default="guard",
                   help="guard: `symguard guard` processes; serve: client-side /v1/canonicalize and /v1/score")  # fmt: skip
    g.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    g.add_argument("--json", action="store_true", help="print JSON instead of the markdown table")
    g.set_defaults(fn=cmd_eval_guard)

    s = sub.add_parser("standardize", help="write de-rotated, de-mirrored copies of a folder of images")
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--bundle", default=None)
    s.set_defaults(fn=cmd_standardize)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return a.fn(a)


if __name__ == "__main__":
    raise SystemExit(main())
