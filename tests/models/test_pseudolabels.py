from __future__ import annotations

import torch

from models.pseudolabels import cyclic_order, knn, knn_pseudo_labels


def test_chunked_knn_matches_dense():
    torch.manual_seed(0)
    x = torch.randn(700, 8)
    idx, dist = knn(x, 5, chunk=64)
    dense = torch.cdist(x, x)
    ref_d, ref_i = torch.topk(dense, 5, largest=False)
    assert torch.allclose(dist, ref_d, atol=1e-4)
    assert (idx[:, 0] == torch.arange(700)).all()  # each point is its own nearest neighbour
    assert (idx == ref_i).float().mean() > 0.99  # ties aside, the same neighbours


def test_uniform_and_reflection_levels_are_recovered_per_cluster():
    """Two well-separated shapes: one rotated U(-20, 20) and never mirrored, one U(-120, 120) and mirrored half the time."""
    g = torch.Generator().manual_seed(0)
    n = 2000
    emb = torch.cat([torch.randn(n, 4, generator=g) * 0.1, torch.randn(n, 4, generator=g) * 0.1 + 5.0])
    angle = torch.cat([(torch.rand(n, generator=g) * 2 - 1) * 20, (torch.rand(n, generator=g) * 2 - 1) * 120])
    logit = torch.cat([-torch.ones(n), torch.where(torch.rand(n, generator=g) < 0.5, 1.0, -1.0)])
    labels, mask = knn_pseudo_labels(emb, angle, logit, k=64)
    assert abs(labels[:n, 0].mean().item() - 20) < 2.0
    assert abs(labels[n:, 0].mean().item() - 120) < 8.0
    assert labels[:n, 1].max() == 0.0
    assert abs(labels[n:, 1].mean().item() - 0.5) < 0.05
    assert 0.95 < mask.float().mean() < 1.0  # the sparsest 2% are masked, not zeroed


def test_outlier_poses_are_masked_out_of_the_average():
    g = torch.Generator().manual_seed(1)
    n = 1000
    emb = torch.randn(n, 4, generator=g) * 0.1
    angle = (torch.rand(n, generator=g) * 2 - 1) * 30
    angle[::10] = 179.0  # 10% upside-down mistakes
    labels, _ = knn_pseudo_labels(emb, angle, -torch.ones(n), k=100)
    assert abs(labels[:, 0].mean().item() - 30) < 4.0  # without masking this would be ~ 45


def test_gaussian_level_uses_the_half_normal_correction():
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(3000, 4, generator=g) * 0.01
    angle = torch.randn(3000, generator=g) * 40.0
    labels, _ = knn_pseudo_labels(emb, angle, -torch.ones(3000), k=500, family="gaussian")
    assert abs(labels[:, 0].mean().item() - 40.0) < 3.0


def test_cyclic_order_is_recovered_from_noisy_neighbour_angles():
    """Rows of angles drawn from C_n (n = 1..8) plus 8° pose noise: KL to the templates picks n."""
    g = torch.Generator().manual_seed(3)
    for n in range(1, 9):
        k = torch.randint(0, n, (200, 64), generator=g).float() * (360.0 / n)
        angles = (k + torch.randn(200, 64, generator=g) * 8.0 + 180.0) % 360.0 - 180.0
        got = cyclic_order(angles)
        assert (got == n).float().mean() > 0.95, (n, got.bincount(minlength=9))


def test_cyclic_pseudo_labels_are_the_period_per_cluster():
    g = torch.Generator().manual_seed(4)
    n = 1000
    emb = torch.cat([torch.randn(n, 4, generator=g) * 0.1, torch.randn(n, 4, generator=g) * 0.1 + 5.0])
    c2 = torch.randint(0, 2, (n,), generator=g).float() * 180.0
    c4 = torch.randint(0, 4, (n,), generator=g).float() * 90.0
    angle = (torch.cat([c2, c4]) + torch.randn(2 * n, generator=g) * 6.0 + 180.0) % 360.0 - 180.0
    labels, _ = knn_pseudo_labels(emb, angle, -torch.ones(2 * n), k=64, family="cyclic")
    assert (labels[:n, 0] == 90.0).float().mean() > 0.98  # half of C2's period
    assert (labels[n:, 0] == 45.0).float().mean() > 0.98


def test_width_survives_heavy_tailed_pose_errors():
    """30% of poses are "which way is up" misses, spread over the whole circle, too many for the MAD mask to drop:
    the median-based width stays near the truth (30°) where a mean-based one would read ~75°."""
    g = torch.Generator().manual_seed(5)
    n = 2000
    emb = torch.randn(n, 4, generator=g) * 0.01
    angle = (torch.rand(n, generator=g) * 2 - 1) * 30
    miss = torch.rand(n, generator=g) < 0.3
    angle[miss] = (torch.rand(int(miss.sum()), generator=g) * 2 - 1) * 180
    labels, _ = knn_pseudo_labels(emb, angle, -torch.ones(n), k=400)
    assert abs(labels[:, 0].mean().item() - 30) < 12.0


def test_hnsw_index_finds_the_exact_neighbours_on_clustered_embeddings():
    g = torch.Generator().manual_seed(6)
    centres = torch.randn(50, 16, generator=g) * 3
    x = centres[torch.randint(0, 50, (20_000,), generator=g)] + torch.randn(20_000, 16, generator=g) * 0.5
    exact_i, _ = knn(x, 16, method="exact")
    ann_i, ann_d = knn(x, 16, method="hnsw")
    recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ann_i, exact_i)) / exact_i.numel()
    assert recall > 0.95
    assert (ann_i[:, 0] == torch.arange(len(x))).float().mean() > 0.99  # itself first
    true_d = (x[:, None, :] - x[ann_i]).norm(dim=2)  # the distances it reports are those of the rows it returns
    assert torch.allclose(ann_d, true_d, atol=1e-3, rtol=1e-4)
    assert (ann_d[:, 1:] >= ann_d[:, :-1] - 1e-5).all()  # sorted nearest first, as the exact search returns
