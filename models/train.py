"""Learn per-input pose ψ(x) and symmetry level Θ(x) from unlabelled images. Reads top to bottom:

  1. data        upright sources + a symmetry spec; poses are drawn afresh every step (infinite augmented stream)
                 and read off the sources at turned polar grid points, each on a pixel lattice turned at random
  2. pose posterior  an exactly equivariant polar network learns p(pose | x) by cross-entropy toward the identity
                 on draws of the data (and toward δ on a copy turned by δ): the identity pull of the anchor, made a
                 distribution. Its circular mean is ψ(x); an InfoNCE term on an elastically deformed copy makes
                 the invariant embedding group inputs by shape
  3. pseudo-labels  spread of poses among each input's k nearest neighbours in the embedding (chunked, O(N·k))
  4. level head     invariant MLP on the embedding regresses (width, reflection rate)
  5. group head     classes when the data has labels (only for per-class views), else k-means clusters
Labels, when present, are never used by steps 2-4. Export and calibration live in models/export.py.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from models.datasets import Source, Split, draw_poses, elastic, load_source, load_spec, repeat
from models.networks import Encoder, LevelHead
from models.polar import PolarEncoder, pose_target
from models.pseudolabels import knn_pseudo_labels
from service.manifest import DatasetSpec


@dataclass
class TrainConfig:
    dataset: str = "mnist-multiple-flip"  # built-in spec name, spec YAML path, or image folder
    out: str = "runs"  # checkpoints go to out/<dataset name>/
    steps: int = 1750  # pose-posterior steps (844 s in all on the 2-core machine: inside the 15-min budget)
    batch: int = 64  # (each step also runs a turned, deformed copy of the batch)
    lr: float = 2e-3
    contrast: float = 0.5  # weight of the InfoNCE term that shapes the invariant embedding
    temperature: float = 0.2
    elastic: float = 2.0  # elastic deformation of the copy: displacement scale in pixels (0: none)
    lattice: bool = True  # turn each draw's pixel lattice at random, apart from its content (sample_polar_posed)
    warmup: float = 0.1  # fraction of steps spent warming up the learning rate
    channels: tuple[int, int, int, int] = (16, 32, 32, 48)
    hidden: int = 32  # fields of the head on the angle ring
    angles: int = 32  # pose bins on the ring (360°/32 = 11.25°; 64 was slower to train and to serve, and no better)
    radii: int = 16
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
    print(f"[train] {spec.name}: {len(src.train.images)} train / {len(src.calib.images)} calib / {len(src.test.images)} test sources")

    # ------------------------------------------------------------------ 2. pose posterior
    enc = PolarEncoder(cfg.channels, cfg.hidden, cfg.embed_dim, src.input.channels, src.input.size, cfg.radii,
                       cfg.angles)  # fmt: skip
    enc.pose_at_mode = family == "cyclic"
    params = list(enc.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=cfg.warmup)
    step = 0
    ckpt_path = run_dir / "ckpt.pt"
    if resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False)
        same = lambda c: {k: v for k, v in c.items() if k not in ("out", "threads")}  # noqa: E731
        if same(ck.get("config", {})) == same(asdict(cfg)):
            enc.load_state_dict(ck["encoder"])
            opt.load_state_dict(ck["opt"]), sched.load_state_dict(ck["sched"])
            step, gen = ck["step"], _gen_from(ck["gen"])
            print(f"[train] resumed at step {step}")
        else:
            print("[train] existing checkpoint has other settings: starting fresh")

    def save(stage: str, **extra):
        state = dict(config=asdict(cfg), spec=spec.model_dump(), encoder=enc.state_dict(), opt=opt.state_dict(),
                     sched=sched.state_dict(), step=step, gen=gen.get_state(), stage=stage, **extra)  # fmt: skip
        torch.save(state, ckpt_path.with_suffix(".tmp"))
        ckpt_path.with_suffix(".tmp").replace(ckpt_path)  # atomic: a killed run never leaves a torn checkpoint

    enc.train()
    n_train = len(src.train.images)
    bar = tqdm(total=cfg.steps, initial=step, desc="pose posterior", dynamic_ncols=True)
    while step < cfg.steps:
        idx = torch.randint(0, n_train, (cfg.batch,), generator=gen)
        batch = type(src.train)(src.train.images[idx], src.train.labels[idx])
        loss, parts = posterior_loss(enc, spec, batch, src.classes, cfg, gen)
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
            save("posterior")
    bar.close()
    enc.eval()

    # ------------------------------------------------------------------ 3. pseudo-labels from neighbours
    pool = repeat(src.train, spec.copies if spec.augment else 1)
    emb, angle, logit = embed_all(enc, polar_draw(enc, pool.images, *draw(spec, pool, src.classes, gen), cfg, gen))
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


def draw(spec: DatasetSpec, split: Split, classes: list[str] | None, gen: torch.Generator):
    """Poses (angle in degrees, mirrored) of one draw of the training distribution over `split`. The network
    then sees each source at its pose through polar_draw."""
    if spec.augment:
        return draw_poses(spec, split.labels, classes, gen)
    n = len(split.images)  # a folder used as-is: its images are the draws
    return torch.zeros(n), torch.zeros(n, dtype=torch.bool)


def posterior_loss(enc: PolarEncoder, spec: DatasetSpec, batch: Split, classes: list[str] | None,
                   cfg: TrainConfig, gen: torch.Generator):
    """Cross-entropy of p(pose | ·) toward the identity on draws x of the data, and toward δ on a copy
    x' = R_δ(elastic(x)), plus InfoNCE between the invariant embeddings of x and x'. Both are sampled at turned
    polar grid points (polar_draw), so neither resampling artifacts nor the pixel lattice tell a draw's pose.

    posterior  the data's own poses are the target: trained on draws, the network learns how the data poses
               inputs like x (a class turned by up to ±θ gets a posterior ±θ wide), so the identity pull of the
               anchor needs no weight and |ψ| is measured from where the data is centred. The copy carries the
               target to angles between the polar bins and teaches robustness to the resampling.
    contrast   the embedding is invariant by construction; InfoNCE against the deformed copy makes its nearest
               neighbours share a shape, which is what the pseudo-labels of step 3 rely on
    """
    n = len(batch.images)
    delta = (torch.rand(n, generator=gen) * 2 - 1) * torch.pi
    angle, mirrored = draw(spec, batch, classes, gen)
    deformed = elastic(batch.images, cfg.elastic, gen=gen) if cfg.elastic else batch.images
    p = polar_draw(enc, batch.images, angle, mirrored, cfg, gen)
    p2 = polar_draw(enc, deformed, angle + torch.rad2deg(delta), mirrored, cfg, gen)  # x turned by δ more
    emb, _, logit, logp = enc.forward_polar(torch.cat([p, p2]))
    target = pose_target(torch.cat([torch.zeros(n), delta]), enc.angles)
    posterior = -(target * logp.flatten(1)).sum(1).mean()
    a, b = F.normalize(emb[:n], dim=1), F.normalize(emb[n:], dim=1)
    sim = a @ b.T / cfg.temperature
    labels = torch.arange(n)
    contrast = 0.5 * (F.cross_entropy(sim, labels) + F.cross_entropy(sim.T, labels))
    loss = posterior + cfg.contrast * contrast
    p = torch.sigmoid(logit[:n])
    return loss, {"posterior": posterior.item(), "contrast": contrast.item(), "p_mirror": p.mean().item()}


def polar_draw(enc: PolarEncoder, images: torch.Tensor, angle: torch.Tensor, mirrored: torch.Tensor,
               cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """Polar samples of the images at their poses, each on a pixel lattice turned at random (cfg.lattice): a
    served image's lattice is always upright whatever its content's turn, so in training the lattice must not
    turn with the content either, or the network reads the pose off the lattice (it did, on C2/C4 data, where
    every draw is a quarter turn: models/RESULTS.md)."""
    beta = (torch.rand(len(images), generator=gen) * 2 - 1) * 180.0 if cfg.lattice else None
    return enc.sample_polar_posed(images, angle, mirrored, beta)


@torch.no_grad()
def embed_all(enc: PolarEncoder, p: torch.Tensor, batch: int = 512):
    """Polar samples -> embedding [N,D], pose angle in degrees [N], reflection logit [N]."""
    embs, angles, logits = [], [], []
    for i in range(0, len(p), batch):
        e, pose, logit, *_ = enc.forward_polar(p[i : i + batch])
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
    cfg, inp = ck["config"], ck["input"]
    if "angles" in cfg:
        enc: nn.Module = PolarEncoder(tuple(cfg["channels"]), cfg["hidden"], cfg["embed_dim"], inp["channels"],
                                      inp["size"], cfg["radii"], cfg["angles"])  # fmt: skip
        enc.pose_at_mode = ck["family"] == "cyclic"
    else:  # runs up to mnist-multiple-flip/4: the D4 autoencoder's encoder
        enc = Encoder(tuple(cfg["channels"]), cfg["embed_dim"], inp["channels"], cfg.get("pose_hidden", 0))
    enc.load_state_dict(ck["encoder"])
    level = LevelHead(cfg["embed_dim"])
    level.load_state_dict(ck["level"])
    head = None
    if ck["class_head"] is not None:
        head = nn.Linear(cfg["embed_dim"], len(ck["classes"]))
        head.load_state_dict(ck["class_head"])
    return enc.eval(), level.eval(), None if head is None else head.eval(), ck

