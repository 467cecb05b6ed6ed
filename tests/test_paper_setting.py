"""The paper's setting on purpose: the original's HSIC kernel and scores, its FLOPs convention and
rounding, the published policies and the paper's finetuning recipe, each against a slow reference
written here from the formula (never from the library's own helpers)."""
import copy
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import dependency_criterion as dc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIGMAS = (1, 2, 4, 8, 16)


def tiny_vit(**kw):
    cfg = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, mlp_ratio=1.0, num_classes=5)
    cfg.update(kw)
    return VisionTransformer(**cfg)


def spread_vit(**kw):
    """A tiny ViT whose head and neuron features spread over the original's fixed bandwidths (at
    timm's init they are so small that every raw-feature kernel is ~1 and every test would pass)."""
    model = tiny_vit(**kw)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, 1 / m.in_features ** 0.5)
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(4)
    return model


def one_batch(n=8, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, 32, 32, generator=g, dtype=dtype), torch.zeros(n, dtype=torch.long))]


# ---------------------------------------------------------------- the original's criterion, by hand

def orig_kernel(x):
    """The original's multi-scale kernel of ONE component x [n, d], distances from their definition."""
    D = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    return sum(torch.exp(-D / (2 * s ** 2)) for s in SIGMAS) / len(SIGMAS)


def orig_center(K):
    n = K.shape[0]
    H = torch.eye(n, dtype=K.dtype) - torch.ones(n, n, dtype=K.dtype) / n
    return H @ K @ H


def orig_relevance(x, P):
    """The original's relevance: x shifted by mean/std per column (its precedence slip), the
    prediction centred, linear kernel, both kernels centred, trace of the product."""
    x = x - x.mean(dim=0) / (x.std(dim=0) + 1e-12)
    y = P - P.mean(dim=0)
    return torch.trace(orig_center(orig_kernel(x)) @ orig_center(y @ y.T))


def orig_redundancy(x1, x2):
    return torch.trace(orig_center(orig_kernel(x1)) @ orig_center(orig_kernel(x2)))


def orig_scores(model, images):
    """Head: relevance - 0.1 * mean redundancy; neuron: 0.1 * minmax(relevance) + 0.9 * minmax(sum |a|)."""
    store = {}
    hooks = []
    for j, blk in enumerate(model.blocks):
        hooks.append(blk.attn.proj.register_forward_pre_hook(lambda m, i, k=("h", j): store.__setitem__(k, i[0])))
        hooks.append(blk.mlp.fc2.register_forward_pre_hook(lambda m, i, k=("n", j): store.__setitem__(k, i[0])))
    with torch.no_grad():
        P = model(images).softmax(-1)
    for h in hooks:
        h.remove()
    heads, neurons, off_diag = [], [], []
    for j, blk in enumerate(model.blocks):
        x = store[("h", j)]
        n, N, _ = x.shape
        H, hd = blk.attn.num_heads, blk.attn.head_dim
        feats = [x.reshape(n, N, H, hd)[:, :, h, :].mean(-1) for h in range(H)]
        off_diag += [orig_kernel(f)[~torch.eye(n, dtype=torch.bool)].mean().item() for f in feats]
        score = []
        for h in range(H):
            red = sum(orig_redundancy(feats[h], feats[g]) for g in range(H) if g != h) / (H - 1)
            score.append(orig_relevance(feats[h], P) - 0.1 * red)
        heads.append(torch.stack(score))
        a = store[("n", j)]
        rel = torch.stack([orig_relevance(a[:, :, m], P) for m in range(a.shape[-1])])
        act = a.abs().sum(dim=(0, 1))
        off_diag += [orig_kernel(a[:, :, m])[~torch.eye(n, dtype=torch.bool)].mean().item() for m in range(a.shape[-1])]
        mm = lambda v: (v - v.min()) / (v.max() - v.min())  # noqa: E731
        neurons.append(0.1 * mm(rel) + 0.9 * mm(act))
    return heads, neurons, off_diag


def test_original_kernel_matches_formula_and_is_not_scale_free():
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(3, 7, 5, generator=g, dtype=torch.float64) * 0.7 + 1.5
    K = dc.gaussian_kernel(feats, kernel="original")
    for c in range(3):
        torch.testing.assert_close(K[c], orig_kernel(feats[c]), rtol=1e-10, atol=1e-13)
    # raw features: a rescaled feature gets another kernel (the "scaled" kernels are scale-free)
    assert not torch.allclose(dc.gaussian_kernel(3 * feats, kernel="original"), K)
    torch.testing.assert_close(dc.gaussian_kernel(3 * feats, "multi"), dc.gaussian_kernel(feats, "multi"))
    # and the pairwise estimator has no 1/(n-1)^2 factor
    R = dc.hsic_pairwise(K, kernel="original")
    torch.testing.assert_close(R[0, 1], orig_redundancy(feats[0], feats[1]), rtol=1e-10, atol=1e-13)


def test_original_scores_match_formula():
    torch.manual_seed(0)
    model = spread_vit().double().eval()
    batches = one_batch()
    want_h, want_n, off_diag = orig_scores(model, batches[0][0])
    # the raw-feature kernels are not degenerate here: off the diagonal neither ~0 nor ~1
    assert 0.05 < min(off_diag) and max(off_diag) < 0.95, off_diag
    got = dc.compute_scores(model, batches, kernel="original", neuron_chunk=5)
    kw = dc.original_criterion_kwargs()
    kw["train_mode"] = False  # the reference above runs in eval mode; train mode is tested below
    got_kw = dc.compute_scores(model, batches, **kw)
    for j in range(2):
        torch.testing.assert_close(got["heads"][j], want_h[j], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got["neurons"][j], want_n[j], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got_kw["heads"][j], want_h[j], rtol=1e-9, atol=1e-12)


def test_original_train_mode_uses_drop_path_and_restores_flags():
    model = spread_vit(drop_path_rate=0.5).double()
    model.eval()
    model.blocks[0].train()  # a mixed state must come back as it was
    flags = [m.training for m in model.modules()]
    batches = one_batch()
    torch.manual_seed(7)
    got = dc.compute_scores(model, batches, **dc.original_criterion_kwargs())
    assert [m.training for m in model.modules()] == flags
    model.train()
    torch.manual_seed(7)  # the same drop-path draws as compute_scores' one forward
    want_h, want_n, _ = orig_scores(model, batches[0][0])
    model.eval()
    eval_h, _, _ = orig_scores(model, batches[0][0])
    for j in range(2):
        torch.testing.assert_close(got["heads"][j], want_h[j], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got["neurons"][j], want_n[j], rtol=1e-9, atol=1e-12)
    assert not all(torch.allclose(a, b) for a, b in zip(want_h, eval_h))


def test_unknown_kernel_is_one_line_error():
    with pytest.raises(ValueError, match="unknown kernel 'gauss'; expected one of"):
        dc.compute_scores(tiny_vit(), one_batch(dtype=torch.float32), kernel="gauss")
