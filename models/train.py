"""Learn per-input pose ψ(x) and symmetry level Θ(x) from unlabelled images. Reads top to bottom:

  1. data      upright sources + a symmetry spec; poses are drawn afresh every step (infinite augmented stream)
  2. autoencoder  invariant embedding + equivariant pose; reconstruct x from the embedding, put back by the pose,
                  with a small L1 pull of the pose toward the identity that centres every orbit at 0, plus
                  group-respecting pretext terms on a rotated copy (pose consistency, invariant contrast)
  3. pseudo-labels  spread of poses among each input's k nearest neighbours in the embedding (chunked, O(N·k))
  4. level head     invariant MLP on the embedding regresses (width, reflection rate)
  5. group head     classes when the data has labels (only for per-class views), else k-means clusters
Labels, when present, are never used by steps 2-4. Export and calibration live in models/export.py.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from models.datasets import Source, load_source, load_spec, repeat, sample
from models.networks import Decoder, Encoder, LevelHead, mirror, rotate
from models.pseudolabels import knn_pseudo_labels
from service.manifest import DatasetSpec


@dataclass
class TrainConfig:
    dataset: str = "mnist-multiple-flip"  # built-in spec name, spec YAML path, or image folder
    out: str = "runs"  # checkpoints go to out/<dataset name>/
    steps: int = 1000  # autoencoder steps
    batch: int = 64  # (each step also runs a rotated copy of the batch)
    lr: float = 2e-3
    pose_prior: float = 1.0  # weight of the pull of the fine pose toward the identity (and of R_δx toward δ)
    pull_order: int = 0  # the pull is 1 - cos(order·(ψ - target)); 0: 4 for cyclic specs, else 1 (see gauge_pull)
    mirror_prior: float = 0.1  # weight of the pull of P(mirrored) toward 0
    prior_steps: int = 300  # first steps train only the identity prior (the gauge learns fastest alone)
    symmetry_breaking: float = 1.0  # cross-entropy toward the identity of D4, annealed over the first 30% ...
    symmetry_breaking_final: float = 1.0  # ... down to this
    align: float = 0.3  # weight of the fine angle following the coarse one
    consistency: float = 1.0  # weight of ψ(R_δ x) = R_δ ψ(x)
    contrast: float = 0.05  # weight of the InfoNCE invariance term
    temperature: float = 0.2
    warmup: float = 0.1  # fraction of steps spent warming up the learning rate
    channels: tuple[int, int, int] = (8, 16, 24)
    pose_hidden: int = 32  # fields in the equivariant MLP that reads the pose off the pooled fields (0: linear)
    embed_dim: int = 32
    knn: int = 32
    level_steps: int = 2000
    clusters: int = 10  # groups for the per-group view when the data has no labels
    seed: int = 0
    threads: int = 0  # 0: all cores
    checkpoint_every: int = 250
    extra: dict = field(default_factory=dict)


def train(cfg: TrainConfig, resume: bool = True) -> Path:
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()

    # ------------------------------------------------------------------ 1. data
    spec: DatasetSpec = load_spec(cfg.dataset)
    src: Source = load_source(spec)
    run_dir = Path(cfg.out) / spec.name
    run_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(spec.seed)
    family = spec.default.rotation if not spec.classes else next(iter(spec.classes.values())).rotation
    order = cfg.pull_order or (4 if family == "cyclic" else 1)
    print(f"[train] {spec.name}: {len(src.train.images)} train / {len(src.calib.images)} calib / {len(src.test.images)} test sources")

    # ------------------------------------------------------------------ 2. autoencoder
    enc = Encoder(cfg.channels, cfg.embed_dim, src.input.channels, cfg.pose_hidden)
    dec = Decoder(cfg.embed_dim, src.input.size, src.input.channels)
    params = list(enc.parameters()) + list(dec.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=cfg.warmup)
    step = 0
    ckpt_path = run_dir / "ckpt.pt"
    if resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False)
        same = lambda c: {k: v for k, v in c.items() if k not in ("out", "threads")}  # noqa: E731
        if same(ck.get("config", {})) == same(asdict(cfg)):
            enc.load_state_dict(ck["encoder"]), dec.load_state_dict(ck["decoder"])
            opt.load_state_dict(ck["opt"]), sched.load_state_dict(ck["sched"])
            step, gen = ck["step"], _gen_from(ck["gen"])
            print(f"[train] resumed at step {step}")
        else:
            print("[train] existing checkpoint has other settings: starting fresh")

    def save(stage: str, **extra):
        state = dict(config=asdict(cfg), spec=spec.model_dump(), encoder=enc.state_dict(), decoder=dec.state_dict(),
                     opt=opt.state_dict(), sched=sched.state_dict(), step=step, gen=gen.get_state(), stage=stage, **extra)
        torch.save(state, ckpt_path.with_suffix(".tmp"))
        ckpt_path.with_suffix(".tmp").replace(ckpt_path)  # atomic: a killed run never leaves a torn checkpoint

    enc.train(), dec.train()
    n_train = len(src.train.images)
    bar = tqdm(total=cfg.steps, initial=step, desc="autoencoder", dynamic_ncols=True)
    while step < cfg.steps:
        idx = torch.randint(0, n_train, (cfg.batch,), generator=gen)
        batch = type(src.train)(src.train.images[idx], src.train.labels[idx])
        x, _, _ = sample(spec, batch, src.classes, gen)
        frac = min(1.0, step / (0.3 * cfg.steps))
        breaking = cfg.symmetry_breaking + (cfg.symmetry_breaking_final - cfg.symmetry_breaking) * frac
        if step < cfg.prior_steps:
            loss, parts = prior_loss(enc, x, cfg, order)
        else:
            loss, parts = autoencoder_loss(enc, dec, x, cfg, breaking, order)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        if step % 25 == 0:
            bar.set_postfix({k: f"{v:.4f}" for k, v in parts.items()})
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save("autoencoder")
    bar.close()
    enc.eval()

    # ------------------------------------------------------------------ 3. pseudo-labels from neighbours
    pool = repeat(src.train, spec.copies if spec.augment else 1)
    x_pool, true_angle, true_mirror = sample(spec, pool, src.classes, gen)
    emb, angle, logit = embed_all(enc, x_pool)
    labels, mask = knn_pseudo_labels(emb, angle, logit, k=cfg.knn, family=family)
    print(f"[train] pseudo-labels on {len(emb)} inputs, {int(mask.sum())} kept ({(~mask).sum()} outliers masked)")

    # ------------------------------------------------------------------ 4. level head (invariant: reads the embedding)
    level = LevelHead(cfg.embed_dim)
    fit_head(level, emb[mask], labels[mask], cfg.level_steps, loss_fn=_level_loss, desc="level head")

    # ------------------------------------------------------------------ 5. group head: classes if labelled, else clusters
    class_head, centroids = None, None
    if src.classes is not None and (pool.labels >= 0).all():
        class_head = nn.Linear(cfg.embed_dim, len(src.classes))
        fit_head(class_head, emb, pool.labels, cfg.level_steps, loss_fn=F.cross_entropy, desc="class head")
    else:
        from sklearn.cluster import KMeans

        k = min(cfg.clusters, len(emb))
        centroids = KMeans(n_clusters=k, n_init=4, random_state=cfg.seed).fit(emb.numpy()).cluster_centers_.tolist()

    save("done", level=level.state_dict(), class_head=None if class_head is None else class_head.state_dict(),
         centroids=centroids, classes=src.classes, family=family, input=src.input.model_dump(),
         train_seconds=time.time() - t0)
    print(f"[train] done in {time.time() - t0:.0f}s -> {ckpt_path}")
    return ckpt_path


def prior_loss(enc: Encoder, x: torch.Tensor, cfg: TrainConfig, order: int = 1):
    """Warm-up: only the identity prior (coarse D4 distribution, mirror, and the fine pull on x and on a rotated
    copy). Alone it finds "which way is up" within a few hundred steps; mixed with the other terms from step 0 it
    did not move in 1,000 (models/RESULTS.md)."""
    n = len(x)
    delta = (torch.rand(n) * 2 - 1) * torch.pi
    _, _, logit, z, w, logits, _, _ = enc(torch.cat([x, rotate(x, torch.cos(delta), torch.sin(delta))]))
    p = torch.sigmoid(logit)
    ce = F.cross_entropy(logits[:n], torch.zeros(n, dtype=torch.long))
    mirror_pull = F.binary_cross_entropy_with_logits(logit[:n], torch.zeros(n))
    pull = gauge_pull(z, w, p, delta, order)
    loss = ce + cfg.mirror_prior * mirror_pull + cfg.pose_prior * pull
    return loss, {"ce": ce.item(), "pull": pull.item(), "p_mirror": p[:n].mean().item()}


def gauge_pull(z: torch.Tensor, w: torch.Tensor, p: torch.Tensor, delta: torch.Tensor, order: int = 1) -> torch.Tensor:
    """1 − cos(ψ − target) for a batch [x; R_δ x]: the pose of x is pulled toward the identity and that of its
    rotated copy toward δ. This is the anchor's pull (centre every orbit at 0); the copy carries it to the angles
    between the exact 90° steps. Each hypothesis (unmirrored z, mirrored w) is weighted by its probability.

    order k > 1 pulls ψ toward the target modulo 360°/k. Cyclic data needs it: when the inputs like x come in
    every quarter turn, the exactly equivariant network gives them ψ + 90°·j, and Σ_j cos(ψ + 90°·j) = 0, so the
    plain pull has no gradient at all and the pose within the period is never anchored; cos(4(ψ + 90°·j)) is
    the same for every j, so order 4 can anchor C1, C2 and C4 data (needed, not sufficient: models/RESULTS.md)."""
    target = torch.cat([torch.zeros_like(delta), delta])
    if order != 1:
        angle = lambda v: torch.atan2(v[:, 1], v[:, 0] + 1e-12)  # noqa: E731
        miss = lambda v: 1 - torch.cos(order * (angle(v) - target))  # noqa: E731
        return ((1 - p) * miss(z) + p * miss(w)).mean()
    d = torch.stack([torch.cos(target), torch.sin(target)], 1)
    unit = lambda v: v / (v.norm(dim=1, keepdim=True) + 1e-6)  # noqa: E731
    return ((1 - p) * (1 - (unit(z) * d).sum(1)) + p * (1 - (unit(w) * d).sum(1))).mean()


def autoencoder_loss(
    enc: Encoder, dec: Decoder, x: torch.Tensor, cfg: TrainConfig, symmetry_breaking: float, order: int = 1
):
    """The anchor's autoencoder loss plus two group-respecting pretext terms on a copy x' = R_δ x with known δ.

    recon        x from the canonical decoding of the invariant embedding, put back under both pose hypotheses
                 (unmirrored: x = R_φ c, mirrored: x = R_φ M c), weighted by P(mirrored)
    pull         pull of the angle toward 0 on x and toward δ on x' (and of P(mirrored) toward 0): centres
                 every orbit at 0
    consistency  ψ(x') = R_δ ψ(x): the network is exact for 90° steps, this teaches the angles in between
    contrast     InfoNCE between embeddings of x and x': an invariant embedding whose neighbours share a shape
    """
    n = len(x)
    delta = (torch.rand(n) * 2 - 1) * torch.pi
    cos_d, sin_d = torch.cos(delta), torch.sin(delta)
    x2 = rotate(x, cos_d, sin_d)
    emb, _, logit, z, w, logits, zc, wc = enc(torch.cat([x, x2]))
    logit_all = logit
    (emb, emb2), (logit, _), (z, z2), (w, w2) = emb.split(n), logit.split(n), z.split(n), w.split(n)

    unit = lambda v: v / (v.norm(dim=1, keepdim=True) + 1e-6)  # noqa: E731
    zu, wu, z2u, w2u = unit(z), unit(w), unit(z2), unit(w2)  # zu: pose if not mirrored; wu: pose if mirrored
    canon = dec(emb)
    rec0 = ((rotate(canon, zu[:, 0], zu[:, 1]) - x) ** 2).flatten(1).mean(1)
    rec1 = ((rotate(mirror(canon), wu[:, 0], wu[:, 1]) - x) ** 2).flatten(1).mean(1)
    p = torch.sigmoid(logit)
    recon = ((1 - p) * rec0 + p * rec1).mean()

    pull = gauge_pull(torch.cat([z, z2]), torch.cat([w, w2]), torch.sigmoid(logit_all), delta, order)
    # the same pull for the mirror: most training data is unmirrored, so "unmirrored" is the canonical side
    mirror_pull = F.binary_cross_entropy_with_logits(logit, torch.zeros_like(logit))
    # the identity prior on the coarse D4 distribution (prior-regularised canonicalisation) sets the gauge; the
    # fine angle is tied to it (no gradient into the coarse field), so |ψ| is measured from "how the data looks"
    ce = F.cross_entropy(logits[:n], torch.zeros(n, dtype=torch.long))
    zcu, wcu = unit(zc[:n]).detach(), unit(wc[:n]).detach()
    align = (((zu - zcu) ** 2).sum(1) + ((wu - wcu) ** 2).sum(1)).mean()

    rot = lambda u: torch.stack([cos_d * u[:, 0] - sin_d * u[:, 1], sin_d * u[:, 0] + cos_d * u[:, 1]], 1)  # noqa: E731
    consistency = (((z2u - rot(zu)) ** 2).sum(1) + ((w2u - rot(wu)) ** 2).sum(1)).mean()

    a, b = F.normalize(emb, dim=1), F.normalize(emb2, dim=1)
    sim = a @ b.T / cfg.temperature
    target = torch.arange(n)
    contrast = 0.5 * (F.cross_entropy(sim, target) + F.cross_entropy(sim.T, target))

    loss = (recon + cfg.pose_prior * pull + cfg.mirror_prior * mirror_pull + symmetry_breaking * ce
            + cfg.align * align + cfg.consistency * consistency + cfg.contrast * contrast)
    return loss, {"recon": recon.item(), "ce": ce.item(), "cons": consistency.item(), "align": align.item(), "pull": pull.item(), "p_mirror": p.mean().item()}


@torch.no_grad()
def embed_all(enc: Encoder, x: torch.Tensor, batch: int = 512):
    """-> embedding [N,D], pose angle in degrees [N], reflection logit [N]."""
    embs, angles, logits = [], [], []
    for i in range(0, len(x), batch):
        e, pose, logit, *_ = enc(x[i : i + batch])
        embs.append(e), angles.append(torch.rad2deg(torch.atan2(pose[:, 1], pose[:, 0]))), logits.append(logit)
    return torch.cat(embs), torch.cat(angles), torch.cat(logits)


def _level_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # width in degrees and reflection rate in [0,1]: scale the rate so both matter
    return F.smooth_l1_loss(pred[:, 0], target[:, 0], beta=2.0) + 90.0 * F.l1_loss(pred[:, 1], target[:, 1])


def fit_head(head: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, loss_fn, desc: str, batch: int = 256):
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(0)
    head.train()
    for _ in tqdm(range(steps), desc=desc, dynamic_ncols=True, mininterval=1.0):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        loss = loss_fn(head(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    head.eval()


def _gen_from(state: torch.Tensor) -> torch.Generator:
    g = torch.Generator()
    g.set_state(state)
    return g


def load_checkpoint(path: Path):
    """-> (encoder, level head, class head or None, checkpoint dict) from a finished run."""
    ck = torch.load(path, weights_only=False)
    if ck.get("stage") != "done":
        raise RuntimeError(f"{path} is an unfinished run (stage {ck.get('stage')!r}); run `symguard train` again to resume")
    cfg = ck["config"]
    enc = Encoder(tuple(cfg["channels"]), cfg["embed_dim"], ck["input"]["channels"], cfg.get("pose_hidden", 0))
    enc.load_state_dict(ck["encoder"])
    level = LevelHead(cfg["embed_dim"])
    level.load_state_dict(ck["level"])
    head = None
    if ck["class_head"] is not None:
        head = nn.Linear(cfg["embed_dim"], len(ck["classes"]))
        head.load_state_dict(ck["class_head"])
    return enc.eval(), level.eval(), None if head is None else head.eval(), ck

