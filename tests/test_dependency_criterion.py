"""Tests for dependency_criterion: the vectorised estimator against a slow, obvious reference."""
import json
import os
import sys

import pytest
import torch
from timm.layers import Mlp
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Attention, VisionTransformer

import dependency_criterion as dc
from helpers import run_ranks, threads_for_tests


def tiny_vit(**kw):
    cfg = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4, num_classes=5)
    cfg.update(kw)
    return VisionTransformer(**cfg)


def make_batches(num, batch, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 32, 32, generator=g, dtype=dtype), torch.randint(0, 5, (batch,), generator=g))
            for _ in range(num)]


# ---------------------------------------------------------------- slow reference (one at a time)

def ref_hsic(K, L):
    n = K.shape[0]
    H = torch.eye(n, dtype=K.dtype) - torch.ones(n, n, dtype=K.dtype) / n
    return torch.trace(K @ H @ L @ H) / (n - 1) ** 2


def ref_kernel(x, bandwidth):
    """Gaussian kernel of ONE component, x [n, d]."""
    n, d = x.shape
    if bandwidth == "multi":
        x = (x - x.mean()) / x.std(correction=0)
        D = torch.cdist(x, x) ** 2
        return sum(torch.exp(-D / (2 * s * s * d)) for s in (1, 2, 4, 8, 16)) / 5
    D = torch.cdist(x, x) ** 2
    off = sorted(D[i, j].item() for i in range(n) for j in range(i + 1, n))
    med = off[(len(off) - 1) // 2]  # lower median, as torch.median
    return torch.exp(-D / (2 * med))


def ref_minmax(v):
    return (v - v.min()) / (v.max() - v.min())


def ref_scores(model, batches, bandwidth, lam, alpha, normalize=False):
    """Per-component loop over captured internals of a float64 model."""
    model.eval()
    attns = [b.attn for b in model.blocks]
    mlps = [b.mlp for b in model.blocks]
    store = {}
    hs = [a.proj.register_forward_pre_hook(lambda m, i, k=("h", j): store.__setitem__(k, i[0]))
          for j, a in enumerate(attns)]
    hs += [m.fc2.register_forward_pre_hook(lambda m, i, k=("n", j): store.__setitem__(k, i[0]))
           for j, m in enumerate(mlps)]
    depth = len(model.blocks)
    rel_h = [0.0] * depth
    red_h = [0.0] * depth
    self_h = [0.0] * depth
    rel_n = [0.0] * depth
    abs_n = [0.0] * depth
    count = [0] * depth
    with torch.no_grad():
        for images, _ in batches:
            out = model(images)
            if isinstance(out, tuple):
                out = (out[0] + out[1]) / 2
            P = out.softmax(-1)
            L = P @ P.T
            for j in range(depth):
                x = store[("h", j)]
                H, hd = attns[j].num_heads, attns[j].head_dim
                Ks = [ref_kernel(x[:, :, h * hd:(h + 1) * hd].mean(-1), bandwidth) for h in range(H)]
                rel = torch.stack([ref_hsic(K, L) for K in Ks])
                red = torch.stack([
                    sum(ref_hsic(Ks[h], Ks[g]) for g in range(H) if g != h) / (H - 1) for h in range(H)])
                rel_h[j] = rel_h[j] + rel
                red_h[j] = red_h[j] + red
                self_h[j] = self_h[j] + torch.stack([ref_hsic(K, K) for K in Ks])
                a = store[("n", j)]
                rel_n[j] = rel_n[j] + torch.stack(
                    [ref_hsic(ref_kernel(a[:, :, m], bandwidth), L) for m in range(a.shape[-1])])
                abs_n[j] = abs_n[j] + a.abs().sum(dim=(0, 1))
                count[j] += a.shape[0] * a.shape[1]
    for h in hs:
        h.remove()
    nb = len(batches)
    if normalize:  # normalised HSIC: divide relevance and redundancy by sqrt(HSIC(K_h, K_h))
        heads = [(rel_h[j] - lam * red_h[j]) / (self_h[j] / nb).sqrt() / nb for j in range(depth)]
    else:
        heads = [(rel_h[j] - lam * red_h[j]) / nb for j in range(depth)]
    neurons = [alpha * ref_minmax(rel_n[j] / nb) + (1 - alpha) * ref_minmax(abs_n[j] / count[j])
               for j in range(depth)]
    return heads, neurons


# ---------------------------------------------------------------- estimator and kernels

def test_hsic_and_pairwise_match_reference():
    g = torch.Generator().manual_seed(0)
    C, n = 6, 11
    X = torch.randn(C, n, 4, generator=g, dtype=torch.float64)
    K = torch.exp(-torch.cdist(X, X) ** 2 / 4)
    Y = torch.randn(n, 3, generator=g, dtype=torch.float64)
    L = Y @ Y.T
    got = dc.hsic(K, L)
    want = torch.stack([ref_hsic(K[c], L) for c in range(C)])
    assert got.shape == (C,)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # batched L broadcasts entrywise
    torch.testing.assert_close(dc.hsic(K, K), torch.stack([ref_hsic(K[c], K[c]) for c in range(C)]))
    R = dc.hsic_pairwise(K)
    want_R = torch.stack([torch.stack([ref_hsic(K[a], K[b]) for b in range(C)]) for a in range(C)])
    torch.testing.assert_close(R, want_R, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dc.linear_kernel(Y), L)


@pytest.mark.parametrize("bandwidth", ["multi", "median"])
def test_gaussian_kernel_matches_reference(bandwidth):
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(5, 9, 7, generator=g, dtype=torch.float64) * 3 + 2
    K = dc.gaussian_kernel(feats, bandwidth)
    assert K.shape == (5, 9, 9) and K.dtype == torch.float64
    for c in range(5):
        torch.testing.assert_close(K[c], ref_kernel(feats[c], bandwidth), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("bandwidth", ["multi", "median"])
def test_constant_component_is_independent(bandwidth):
    feats = torch.randn(2, 8, 5, dtype=torch.float64)
    feats[1] = 3.0
    K = dc.gaussian_kernel(feats, bandwidth)
    assert torch.isfinite(K).all()
    L = dc.linear_kernel(torch.randn(8, 4, dtype=torch.float64))
    assert abs(dc.hsic(K, L)[1].item()) < 1e-12


@pytest.mark.parametrize("bandwidth", ["multi", "median"])
def test_hsic_zero_when_independent_and_grows_with_dependence(bandwidth):
    g = torch.Generator().manual_seed(2)
    n, d = 300, 5
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    noise = torch.randn(n, d, generator=g, dtype=torch.float64)
    Kx = dc.gaussian_kernel(x[None], bandwidth)[0]
    values = []
    for rho in (0.0, 0.3, 0.6, 0.9):
        y = rho * x + (1 - rho ** 2) ** 0.5 * noise
        values.append(dc.hsic(Kx, dc.gaussian_kernel(y[None], bandwidth)[0]).item())
    self_dep = dc.hsic(Kx, Kx).item()
    assert values[0] < 0.05 * self_dep
    assert all(a < b for a, b in zip(values, values[1:])), values


@pytest.mark.parametrize("bandwidth", ["multi", "median"])
def test_planted_informative_heads_rank_first(bandwidth):
    """Heads 1, 3, 4 carry the label (plus noise), the others are noise: they must rank most important."""
    g = torch.Generator().manual_seed(3)
    n, N, k, H = 64, 10, 4, 6
    labels = torch.randint(0, k, (n,), generator=g)
    proto = torch.randn(k, N, generator=g, dtype=torch.float64)
    feats = torch.randn(H, n, N, generator=g, dtype=torch.float64)
    informative = [1, 3, 4]
    for h in informative:
        feats[h] += 2.0 * proto[labels]
    P = torch.nn.functional.one_hot(labels, k).double() * 0.9 + 0.1 / k
    K = dc.gaussian_kernel(feats, bandwidth)
    R = dc.hsic_pairwise(K)
    score = dc.hsic(K, dc.linear_kernel(P)) - 0.1 * (R.sum(1) - R.diagonal()) / (H - 1)
    order = dc.rank_components({"heads": [score], "neurons": [torch.zeros(0)]})["heads"][0]
    assert sorted(order[-3:]) == informative
    assert sorted(order[:3]) == [0, 2, 5]


# ---------------------------------------------------------------- whole model against the loop

@pytest.mark.parametrize("bandwidth,normalize", [("multi", False), ("median", False), ("median", True)])
def test_model_scores_match_reference_loop(bandwidth, normalize):
    torch.manual_seed(0)
    model = tiny_vit(depth=2, mlp_ratio=1.0).double()
    batches = make_batches(2, 8, dtype=torch.float64)
    got = dc.compute_scores(model, batches, num_batches=2, bandwidth=bandwidth, head_lambda=0.3,
                            neuron_alpha=0.4, neuron_chunk=7, head_normalize=normalize)
    want_h, want_n = ref_scores(model, batches, bandwidth, 0.3, 0.4, normalize)
    assert len(got["heads"]) == len(got["neurons"]) == 2
    for j in range(2):
        torch.testing.assert_close(got["heads"][j], want_h[j], rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(got["neurons"][j], want_n[j], rtol=1e-8, atol=1e-12)


def test_statistics_then_scores_equal_compute_scores():
    torch.manual_seed(0)
    model = tiny_vit(depth=2)
    batches = make_batches(2, 8)
    stats = dc.hsic_statistics(model, batches, num_batches=2, bandwidth="multi")
    assert stats["batches"] == 2
    for lam, alpha, norm in [(0.1, 0.1, False), (0.5, 1.0, True)]:
        a = dc.scores_from_statistics(stats, lam, alpha, norm)
        b = dc.compute_scores(model, batches, num_batches=2, bandwidth="multi", head_lambda=lam,
                              neuron_alpha=alpha, head_normalize=norm)
        for x, y in zip(a["heads"] + a["neurons"], b["heads"] + b["neurons"]):
            torch.testing.assert_close(x, y)


@pytest.mark.parametrize("bandwidth", ["multi", "median"])
def test_upper_triangle_kernels_match_full(bandwidth):
    g = torch.Generator().manual_seed(3)
    acts = torch.randn(9, 5, 13, generator=g, dtype=torch.float64).abs()
    Ku, mag = dc.neuron_kernels(acts, bandwidth, neuron_chunk=4)
    K = dc.gaussian_kernel(acts.permute(2, 0, 1), bandwidth)
    iu = torch.triu_indices(9, 9, 1)
    torch.testing.assert_close(Ku, K[:, iu[0], iu[1]], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(K.diagonal(dim1=-2, dim2=-1), torch.ones(13, 9, dtype=torch.float64))
    torch.testing.assert_close(mag, acts.abs().sum(dim=(0, 1)))


def test_float32_model_close_to_float64():
    torch.manual_seed(0)
    model = tiny_vit()
    batches = make_batches(1, 16)
    s32 = dc.compute_scores(model, batches)
    s64 = dc.compute_scores(model.double(), [(x.double(), y) for x, y in batches])
    for a, b in zip(s32["neurons"] + s32["heads"], s64["neurons"] + s64["heads"]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_num_batches_limits_and_shapes_follow_model():
    torch.manual_seed(0)
    model = tiny_vit(depth=4, num_heads=3, mlp_ratio=2.0)
    batches = make_batches(3, 6)
    s1 = dc.compute_scores(model, batches[:1], num_batches=5)
    s2 = dc.compute_scores(model, batches, num_batches=1)
    assert [len(h) for h in s1["heads"]] == [3] * 4
    assert [len(m) for m in s1["neurons"]] == [96] * 4
    for a, b in zip(s1["heads"], s2["heads"]):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- hygiene

def _hook_counts(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


def test_hooks_removed_and_modes_restored():
    model = tiny_vit()
    model.train()
    model.blocks[1].eval()  # mixed modes must come back exactly
    keep = model.blocks[0].mlp.fc2.register_forward_hook(lambda *a: None)  # a user's hook survives
    before_hooks = _hook_counts(model)
    before_modes = [m.training for m in model.modules()]
    dc.compute_scores(model, make_batches(1, 4))
    assert _hook_counts(model) == before_hooks
    assert [m.training for m in model.modules()] == before_modes
    keep.remove()
    assert all(c == (0, 0) for c in _hook_counts(model))


def test_hooks_removed_on_exception():
    model = tiny_vit()
    model.train()

    def broken_loader():
        yield make_batches(1, 4)[0]
        raise RuntimeError("loader died")

    with pytest.raises(RuntimeError, match="loader died"):
        dc.compute_scores(model, broken_loader(), num_batches=3)
    assert all(c == (0, 0) for c in _hook_counts(model))
    assert all(m.training for m in model.modules())


def test_distilled_model():
    torch.manual_seed(0)
    model = VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4,
                                       num_classes=5)
    model.set_distilled_training(True)
    model.train()
    s = dc.compute_scores(model, make_batches(1, 6))
    assert [len(h) for h in s["heads"]] == [4, 4]
    assert all(torch.isfinite(t).all() for t in s["heads"] + s["neurons"])
    assert model.training
    model.double()
    batches = make_batches(1, 6, dtype=torch.float64)
    got = dc.compute_scores(model, batches)
    want_h, want_n = ref_scores(model, batches, dc.DEFAULT_BANDWIDTH, dc.DEFAULT_HEAD_LAMBDA,
                                dc.DEFAULT_NEURON_ALPHA, dc.DEFAULT_HEAD_NORMALIZE)
    for j in range(2):
        torch.testing.assert_close(got["heads"][j], want_h[j])
        torch.testing.assert_close(got["neurons"][j], want_n[j])


def test_modules_found_by_isinstance():
    model = tiny_vit()
    assert all(isinstance(b.attn, Attention) and isinstance(b.mlp, Mlp) for b in model.blocks)
    # a subclass of Block (as a token-reduction class swap would make) is still found
    for b in model.blocks:
        b.__class__ = type("PatchedBlock", (b.__class__,), {})
    s = dc.compute_scores(model, make_batches(1, 4))
    assert [len(h) for h in s["heads"]] == [4, 4, 4]


# ---------------------------------------------------------------- rankings and baselines

def test_rank_components_stable_and_json():
    scores = {"heads": [torch.tensor([0.5, 0.1, 0.5, 0.1])], "neurons": [torch.tensor([3.0, 1.0, 2.0])]}
    r = dc.rank_components(scores)
    assert r == {"heads": [[1, 3, 0, 2]], "neurons": [[1, 2, 0]]}
    assert json.loads(json.dumps(r)) == r
    assert all(type(i) is int for i in r["heads"][0])


def test_magnitude_baseline():
    model = tiny_vit()
    attn, mlp = model.blocks[1].attn, model.blocks[1].mlp
    hd = attn.head_dim
    with torch.no_grad():
        for s in range(3):  # q, k, v rows of head 2
            attn.qkv.weight[s * 48 + 2 * hd:s * 48 + 3 * hd] = 0
        attn.proj.weight[:, 2 * hd:3 * hd] = 0
        mlp.fc1.weight[17] = 0
    r = dc.rank_components(dc.compute_scores(model, None, criterion="magnitude"))
    assert r["heads"][1][0] == 2
    assert r["neurons"][1][0] == 17
    assert [len(n) for n in r["neurons"]] == [192] * 3


def test_random_baseline_seeded():
    model = tiny_vit()
    a = dc.compute_scores(model, None, criterion="random", seed=5)
    b = dc.compute_scores(model, None, criterion="random", seed=5)
    c = dc.compute_scores(model, None, criterion="random", seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a["neurons"], b["neurons"]))
    assert not torch.equal(a["neurons"][0], c["neurons"][0])


def test_bad_arguments():
    model = tiny_vit()
    with pytest.raises(ValueError):
        dc.compute_scores(model, make_batches(1, 4), criterion="fisher")
    with pytest.raises(ValueError):
        dc.compute_scores(model, make_batches(1, 4), bandwidth="silverman")


# ---------------------------------------------------------------- distributed (gloo, 2 processes)



def _dist_worker(rank, world, port, out_dir):
    """One rank: score its shard of the same four batches and save scores + rankings."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = tiny_vit()
        shard = make_batches(4, 6)[rank::world]
        s = dc.compute_scores(model, shard, num_batches=len(shard))
        sized = dc.compute_scores(model, shard, num_batches=len(shard), head_alpha=0.5, magnitude="contribution")
        torch.save({"scores": s, "ranks": dc.rank_components(s), "sized": sized},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_ranks_agree_with_single_process(tmp_path):
    # this file's __main__ (below) is each rank
    res = run_ranks(__file__, tmp_path, timeout=120)
    torch.manual_seed(0)
    model = tiny_vit()
    batches = make_batches(4, 6)
    single = dc.compute_scores(model, batches, num_batches=4)
    assert res[0]["ranks"] == res[1]["ranks"] == dc.rank_components(single)
    sized = dc.compute_scores(model, batches, num_batches=4, head_alpha=0.5, magnitude="contribution")
    for name, ref in (("scores", single), ("sized", sized)):  # the contribution sums are all-reduced too
        for key in ("heads", "neurons"):
            for a, b, c in zip(res[0][name][key], res[1][name][key], ref[key]):
                assert torch.equal(a, b)
                torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-12)


if __name__ == "__main__":  # a rank of test_distributed_ranks_agree_with_single_process
    torch.set_num_threads(threads_for_tests())  # as conftest: same GEMM paths as the parent
    _dist_worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
