"""The paper's setting on purpose: the original's HSIC kernel and scores, its FLOPs convention and
rounding, the published policies and the paper's finetuning recipe, each against a slow reference
written here from the formula (never from the library's own helpers)."""
import copy
import json
import os

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


# ---------------------------------------------------------------- the original's FLOPs convention

import flops  # noqa: E402
import models  # noqa: E402
import pruning  # noqa: E402


def ref_original_gmacs(width, hidden, n_tokens, heads, neuron_ratios, head_ratios, r, reducing=(3, 6, 9)):
    """The original's count written out block by block from its description: blocks only; a block
    keeps int(H (1 - h)) heads and int(M (1 - n)) neurons; after k reductions int(N (1 - r)^k)
    tokens pass (N counts the class token, no fused token); a reducing block's attention sees the
    count before its reduction, its MLP the count after."""
    hd = width // heads
    total, k = 0, 0
    for b, (n_ratio, h_ratio) in enumerate(zip(neuron_ratios, head_ratios)):
        n_attn = int(n_tokens * (1 - r) ** k) if k else n_tokens
        k += b in reducing
        n_mlp = int(n_tokens * (1 - r) ** k) if k else n_tokens
        h = int(heads * (1 - h_ratio))
        m = int(hidden * (1 - n_ratio))
        total += h * (4 * width * hd * n_attn + 2 * n_attn * n_attn * hd) + 2 * n_mlp * width * m
    return total / 1e9


def ref_original_model_tokens(n_tokens, r, blocks=3):
    """Kept PATCH tokens of the original's model at each reduction: keep int(n (1 - r)) of the n
    tokens present, the class token first, then append one fused token."""
    out, n = [], n_tokens
    for _ in range(blocks):
        K = int(n * (1 - r))
        out.append(K - 1)
        n = K + 1
    return out


@pytest.fixture(scope="module")
def deit_s():
    return models.build_model("deit_small_patch16_224")


def test_original_convention_dense_deit_small(deit_s):
    dims = pruning.model_dims(deit_s)
    got = flops.model_macs(deit_s, convention="original")["macs"] / 1e9
    want = ref_original_gmacs(384, 1536, 197, 6, [0.0] * 12, [0.0] * 12, 0.0)
    assert got == pytest.approx(want, rel=1e-12)
    assert round(got, 4) == 4.5407
    assert flops.policy_gmacs(dims, np.zeros(25), convention="original") == pytest.approx(want, rel=1e-12)
    # the difference to the exact count is the patch embedding and the classifier, nothing else
    exact = flops.model_macs(deit_s)["macs"]
    assert exact - round(got * 1e9) == 196 * 384 * 3 * 16 * 16 + 384 * 1000


@pytest.mark.parametrize("name,model,width,heads", [("hou2022-deit-s", "deit_small_patch16_224", 384, 6),
                                                    ("hou2022-deit-b", "deit_base_patch16_224", 768, 12)])
def test_published_policies_in_original_convention(name, model, width, heads):
    with torch.device("meta"):
        dense = models.build_model(model)
    dims = pruning.model_dims(dense)
    pol = pruning.published_policy(name)
    got = flops.policy_gmacs(dims, pruning.policy_to_vector(pol), convention="original")
    want = ref_original_gmacs(width, 4 * width, 197, heads, pol["neuron"], pol["head"], pol["token"])
    assert got == pytest.approx(want, rel=1e-12)
    dense_orig = flops.policy_gmacs(dims, np.zeros(25), convention="original")
    assert 0.39 < got / dense_orig < 0.42          # "60% fewer FLOPs" in that convention
    if name == "hou2022-deit-s":
        assert got == pytest.approx(1.863, rel=0.005)


def test_policy_gmacs_original_matches_formula_on_random_policies():
    with torch.device("meta"):
        dense = models.build_model("deit_base_patch16_224")
    dims = pruning.model_dims(dense)
    rng = np.random.default_rng(5)
    X = rng.uniform(0, 0.5, size=(300, 25))          # the original's search box
    got = flops.policy_gmacs(dims, X, convention="original")
    for x, g in zip(X, got):
        assert g == pytest.approx(ref_original_gmacs(768, 3072, 197, 12, x[12:24], x[:12], x[24]), rel=1e-12)
    with pytest.raises(ValueError, match="original rounding only"):
        flops.policy_gmacs(dims, X, convention="original", rounding="exact")
    with pytest.raises(ValueError, match="unknown FLOPs convention"):
        flops.policy_gmacs(dims, X, convention="paper")


def test_published_deit_s_policy_gives_the_original_models_counts(deit_s):
    dims = pruning.model_dims(deit_s)
    pol = pruning.published_policy("hou2022-deit-s")
    rankings = {"heads": [list(range(6))] * 12, "neurons": [list(range(1536))] * 12}
    spec = pruning.policy_to_spec(pol, rankings, dims, rounding="original")
    model = pruning.apply_spec(copy.deepcopy(deit_s), spec)
    want_heads = [int(6 * (1 - h)) for h in pol["head"]]
    want_neurons = [int(1536 * (1 - n)) for n in pol["neuron"]]
    assert [len(h) for h in spec["heads"]] == want_heads
    assert [b.attn.num_heads for b in model.blocks] == want_heads
    assert [b.mlp.fc1.out_features for b in model.blocks] == want_neurons
    assert [b.token_keep for b in model.blocks if isinstance(b, pruning.TokenReducingBlock)] == \
        ref_original_model_tokens(197, pol["token"])
    assert spec["policy"]["rounding"] == "original"
    # every block with a head ratio > 0 lost a head (round-half-up keeps all 6 where h < 1/12)
    assert all(h < 6 for h in want_heads)
    exact_spec = pruning.policy_to_spec(pol, rankings, dims)
    assert sum(len(h) for h in exact_spec["heads"]) > sum(want_heads)
    # the original's model costs the same in its own convention as the original's formula says
    assert flops.model_macs(model, convention="original")["macs"] / 1e9 == pytest.approx(
        flops.policy_gmacs(dims, pruning.policy_to_vector(pol), convention="original"), rel=1e-12)
    # and counted exactly, as the vectorised count with the original rounding says
    assert flops.model_macs(model)["macs"] / 1e9 == pytest.approx(
        flops.policy_gmacs(dims, pruning.policy_to_vector(pol), rounding="original"), rel=1e-12)


def nano12():
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=12, num_heads=4, mlp_ratio=4.0,
                             num_classes=10).eval()


@pytest.mark.parametrize("round_to", [1, 8])
def test_original_rounding_models_match_vectorised_counts(round_to):
    dense = nano12()
    dims = pruning.model_dims(dense)
    rng = np.random.default_rng(round_to)
    X = rng.uniform(0, 0.6, size=(12, 25))
    X[0] = 0.0
    X[1, -1] = 0.0
    exact_fast = flops.policy_gmacs(dims, X, round_to=round_to, rounding="original")
    orig_fast = flops.policy_gmacs(dims, X, round_to=round_to, convention="original")
    same_tokens = 0
    for i, x in enumerate(X):
        pol = pruning.policy_from_vector(x, 12)
        ranks = {"heads": [rng.permutation(4).tolist() for _ in range(12)],
                 "neurons": [rng.permutation(192).tolist() for _ in range(12)]}
        spec = pruning.policy_to_spec(pol, ranks, dims, round_to=round_to, rounding="original")
        model = pruning.apply_spec(copy.deepcopy(dense), spec)
        heads = [int(4 * (1 - h)) for h in pol["head"]]
        assert [b.attn.num_heads for b in model.blocks] == [max(h, 1) for h in heads]
        if round_to == 1:
            assert [b.mlp.fc1.out_features for b in model.blocks] == [int(192 * (1 - n)) for n in pol["neuron"]]
        if x[-1] > 0:
            assert [b.token_keep for b in model.blocks if isinstance(b, pruning.TokenReducingBlock)] == \
                ref_original_model_tokens(65, x[-1])
        assert flops.model_macs(model)["macs"] / 1e9 == pytest.approx(exact_fast[i], rel=1e-12)
        counted = flops.model_macs(model, convention="original")["macs"] / 1e9
        formula_tokens = [int(65 * (1 - x[-1]) ** k) for k in (1, 2, 3)]
        model_tokens = [k + 1 for k in ref_original_model_tokens(65, x[-1])]
        if formula_tokens == model_tokens or x[-1] == 0:
            same_tokens += 1
            assert counted == pytest.approx(orig_fast[i], rel=1e-12)
        else:  # the formula's floor(N (1-r)^k) and the model's running count differ by a token
            assert abs(counted - orig_fast[i]) < 0.05 * orig_fast[i]
    assert same_tokens >= 3


def test_kept_count_original_rounding():
    rng = np.random.default_rng(0)
    totals = rng.integers(1, 4000, size=500)
    ratios = rng.uniform(0, 0.99, size=500)
    got = pruning.kept_count(totals, ratios, rounding="original")
    want = [max(int(t * (1 - r)), 1) for t, r in zip(totals.tolist(), ratios.tolist())]
    assert got.tolist() == want
    assert pruning.kept_count(6, 0.01, rounding="original") == 5 and pruning.kept_count(6, 0.01) == 6
    with pytest.raises(pruning.SpecError, match="rounding must be one of"):
        pruning.kept_count(6, 0.1, rounding="floor")


# ---------------------------------------------------------------- published policies

def test_original_vector_order_conversion():
    x = np.arange(25) / 100.0                       # neuron 0..11, head 12..23, token 24 in the original
    pol = pruning.policy_from_original_vector(x, 12)
    assert pol["neuron"] == (np.arange(12) / 100.0).tolist()
    assert pol["head"] == (np.arange(12, 24) / 100.0).tolist()
    assert pol["token"] == 0.24
    np.testing.assert_array_equal(pruning.policy_to_original_vector(pol), x)
    ours = pruning.policy_to_vector(pol)
    np.testing.assert_array_equal(ours[:12], x[12:24])
    with pytest.raises(pruning.SpecError, match="expected 2\\*12\\+1 = 25"):
        pruning.policy_from_original_vector(x[:24], 12)


def test_published_policies_load_by_name():
    names = pruning.published_policy_names()
    assert {"hou2022-deit-s", "hou2022-deit-b"} <= set(names)
    for name in names:
        info = pruning.published_policy_info(name)
        pol = pruning.published_policy(name)
        pruning.validate_policy(pol, 12)
        assert info["rounding"] == "original" and "zejiangh" in info["source"]
        assert info["model"].startswith("deit_")
    a = pruning.published_policy("hou2022-deit-s")
    a["head"][0] = 0.9                                 # a copy: the next caller is not affected
    assert pruning.published_policy("hou2022-deit-s")["head"][0] != 0.9
    with pytest.raises(pruning.SpecError) as exc:
        pruning.published_policy("hou2022-deit-x")
    msg = str(exc.value)
    assert "\n" not in msg and "hou2022-deit-s" in msg and "hou2022-deit-b" in msg
    assert pruning.load_policy("hou2022-deit-b")[0] == pruning.published_policy("hou2022-deit-b")


def test_load_policy_file(tmp_path):
    pol = pruning.uniform_policy(12, 0.1, 0.2, 0.3)
    path = tmp_path / "best_policy.json"
    path.write_text(json.dumps({"policy": pol, "gmacs": 1.0}))
    assert pruning.load_policy(str(path)) == (pol, str(path))
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(pruning.SpecError, match="cannot read policy"):
        pruning.load_policy(str(bad))
    with pytest.raises(pruning.SpecError, match="no policy file or published policy named"):
        pruning.load_policy(str(tmp_path / "missing.json"))


@pytest.mark.slow
def test_flops_cli_shows_both_conventions(capsys):
    """flops.py's main() in this process (tests/test_flops.py runs the script itself)."""
    import flops
    argv = ["--model", "deit_small_patch16_224", "--flops-convention", "original", "--json"]
    assert flops.main(argv) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["gmacs"] == line["gmacs_original"] == round(ref_original_gmacs(
        384, 1536, 197, 6, [0.0] * 12, [0.0] * 12, 0.0), 6)
    assert line["gmacs_exact"] > line["gmacs_original"]
    assert flops.main(argv + ["--policy", "hou2022-deit-s"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    pol = pruning.published_policy("hou2022-deit-s")
    assert line["gmacs_original"] == round(ref_original_gmacs(384, 1536, 197, 6, pol["neuron"], pol["head"],
                                                              pol["token"]), 6)
    assert flops.main(argv[:-1] + ["--policy", "hou2022"]) != 0
    assert "published: hou2022-deit-b, hou2022-deit-s" in capsys.readouterr().err
