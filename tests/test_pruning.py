"""pruning.py against slow, obvious references: masked dense models and an explicit-attention
token-reduction forward."""
import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer

import pruning
from pruning import (SpecError, apply_spec, full_spec, kept_count, kept_tokens, model_dims, policy_from_vector,
                     policy_to_spec, policy_to_vector, token_schedule, uniform_policy, validate_spec)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def make_vit(depth=4, embed_dim=48, num_heads=4, mlp_ratio=2.0, qkv_bias=True, distilled=False, **kw):
    cls = VisionTransformerDistilled if distilled else VisionTransformer
    model = cls(img_size=32, patch_size=8, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                mlp_ratio=mlp_ratio, num_classes=5, qkv_bias=qkv_bias, **kw)
    with torch.no_grad():  # larger random weights so every head / token matters
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.05 if "norm" in name else 0.2))
    return model.double().eval()


def random_rankings(dims, seed=0):
    rng = np.random.default_rng(seed)
    return {"heads": [rng.permutation(h).tolist() for h in dims["num_heads"]],
            "neurons": [rng.permutation(m).tolist() for m in dims["mlp_hidden"]]}


def images(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=g, dtype=torch.float64)


def masked_reference(dense, spec):
    """Deep copy of ``dense`` whose dropped heads (attn.proj input) and neurons (fc2 input) are zeroed."""
    ref = copy.deepcopy(dense)
    for b, blk in enumerate(ref.blocks):
        hd = blk.attn.head_dim
        head_mask = torch.zeros(blk.attn.num_heads, dtype=torch.float64)
        head_mask[spec["heads"][b]] = 1
        chan_mask = head_mask.repeat_interleave(hd)
        neuron_mask = torch.zeros(blk.mlp.fc2.in_features, dtype=torch.float64)
        neuron_mask[spec["neurons"][b]] = 1
        blk.attn.proj.register_forward_pre_hook(lambda m, a, mask=chan_mask: (a[0] * mask,))
        blk.mlp.fc2.register_forward_pre_hook(lambda m, a, mask=neuron_mask: (a[0] * mask,))
    return ref


def head_rows(spec_heads, num_heads, hd):
    chan = torch.tensor([h * hd + j for h in spec_heads for j in range(hd)], dtype=torch.long)
    return chan, torch.cat([chan + p * num_heads * hd for p in range(3)])


def assert_grads_are_the_kept_rows(pruned, ref, spec, dims):
    """Every gradient of the sliced model equals the masked dense model's (``ref``, after the same
    backward) at the kept heads' qkv rows and proj columns and the kept neurons' fc1 rows and fc2
    columns; every other parameter's gradient equals the dense one whole."""
    ref_params = dict(ref.named_parameters())
    for name, p in pruned.named_parameters():
        g_ref, parts = ref_params[name].grad, name.split(".")
        if name.startswith("blocks.") and parts[-2] in ("qkv", "proj", "fc1", "fc2"):
            b = int(parts[1])
            chan, rows = head_rows(spec["heads"][b], dims["num_heads"][b], dims["head_dim"])
            neurons = torch.tensor(spec["neurons"][b], dtype=torch.long)
            if parts[-2] == "qkv":
                g_ref = g_ref.index_select(0, rows)
            elif parts[-2] == "proj" and parts[-1] == "weight":
                g_ref = g_ref.index_select(1, chan)
            elif parts[-2] == "fc1":
                g_ref = g_ref.index_select(0, neurons)
            elif parts[-2] == "fc2" and parts[-1] == "weight":
                g_ref = g_ref.index_select(1, neurons)
        torch.testing.assert_close(p.grad, g_ref, msg=name)


# ------------------------------------------------------------------------------------------------
# schedule, rounding, policies
# ------------------------------------------------------------------------------------------------

def test_token_schedule():
    assert token_schedule(12) == [3, 6, 9]
    assert token_schedule(24) == [7, 13, 19]
    for depth in range(1, 41):
        s = token_schedule(depth)
        assert s == sorted(set(s)) and all(0 <= b < depth for b in s)
        assert len(s) == min(3, depth)


def test_kept_count_rule_and_vectorised():
    assert kept_count(6, 0.0) == 6
    assert kept_count(6, 0.25) == 4          # 1.5 removed rounds half up to 2
    assert kept_count(6, 0.99) == 1          # never below one
    assert kept_count(1536, 0.3, round_to=8) == 1072   # 1536 - 461 = 1075 -> nearest multiple of 8
    assert kept_count(5, 0.5, round_to=8) == 5         # at least min(round_to, total)
    assert kept_count(100, 0.999, round_to=8) == 8
    rng = np.random.default_rng(0)
    tot = rng.integers(1, 3000, size=(50, 7))
    rat = rng.random((50, 7)) * 0.999
    for rt in (1, 8):
        vec = kept_count(tot, rat, rt)
        assert vec.shape == tot.shape
        assert all(vec[i, j] == kept_count(int(tot[i, j]), float(rat[i, j]), rt)
                   for i in range(50) for j in range(7))
        assert ((vec >= 1) & (vec <= tot)).all()
    assert kept_tokens(196, 0.7) == 137 and kept_tokens(196, 0.001) == 1
    assert pruning.token_keep_rates(0.3) == [0.7, 0.7 * 0.7, 0.7 * 0.7 * 0.7]


def test_policy_vector_roundtrip():
    pol = {"head": [0.1, 0.2, 0.0], "neuron": [0.5, 0.0, 0.3], "token": 0.25}
    vec = policy_to_vector(pol)
    assert vec.tolist() == [0.1, 0.2, 0.0, 0.5, 0.0, 0.3, 0.25]
    assert policy_from_vector(vec, 3) == pol
    assert uniform_policy(2, head=0.5, token=0.1) == {"head": [0.5, 0.5], "neuron": [0.0, 0.0], "token": 0.1}


def test_policy_to_spec_removes_least_important_first():
    model = make_vit(depth=2, num_heads=4, mlp_ratio=1.0)
    dims = model_dims(model)
    ranks = {"heads": [[3, 1, 0, 2], [0, 1, 2, 3]], "neurons": [list(range(48))[::-1], list(range(48))]}
    spec = policy_to_spec({"head": [0.5, 0.25], "neuron": [0.5, 0.1], "token": 0.0}, ranks, dims)
    assert spec["heads"] == [[0, 2], [1, 2, 3]]
    assert spec["neurons"][0] == list(range(24)) and spec["neurons"][1] == list(range(5, 48))
    assert spec["tokens"] is None
    spec = policy_to_spec(uniform_policy(2, token=0.3), ranks, dims, fuse="weighted")
    assert spec["tokens"] == {"blocks": token_schedule(2), "keep_rates": [0.7, 0.7 * 0.7], "fuse": "weighted"}
    assert json.loads(json.dumps(spec)) == spec


# ------------------------------------------------------------------------------------------------
# slicing
# ------------------------------------------------------------------------------------------------

def test_full_spec_equals_dense():
    for kw in ({}, {"distilled": True}, {"init_values": 1e-1, "qk_norm": True}):
        dense = make_vit(**kw)
        x = images(3)
        pruned = apply_spec(copy.deepcopy(dense), full_spec(dense))
        torch.testing.assert_close(pruned(x), dense(x))
        assert pruned.prune_spec == full_spec(dense)


CASES = [
    dict(depth=2, embed_dim=48, num_heads=4, mlp_ratio=2.0, qkv_bias=True),
    dict(depth=3, embed_dim=36, num_heads=6, mlp_ratio=1.5, qkv_bias=False),
    dict(depth=5, embed_dim=32, num_heads=2, mlp_ratio=3.0, qkv_bias=True),
    dict(depth=2, embed_dim=48, num_heads=3, mlp_ratio=2.0, distilled=True),
    dict(depth=3, embed_dim=48, num_heads=4, mlp_ratio=2.0, init_values=0.5, qk_norm=True),
    dict(depth=2, embed_dim=48, num_heads=4, mlp_ratio=2.0, reg_tokens=2, global_pool="avg"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_sliced_equals_masked_forward_backward(case):
    dense = make_vit(**case)
    dims = model_dims(dense)
    rng = np.random.default_rng(case["depth"])
    policy = {"head": rng.uniform(0.2, 0.7, dims["depth"]).tolist(),
              "neuron": rng.uniform(0.1, 0.8, dims["depth"]).tolist(), "token": 0.0}
    spec = policy_to_spec(policy, random_rankings(dims, case["depth"]), dims)
    assert any(len(h) < dims["num_heads"][b] for b, h in enumerate(spec["heads"]))
    ref = masked_reference(dense, spec)
    pruned = apply_spec(copy.deepcopy(dense), spec)
    assert model_dims(pruned)["num_heads"] == [len(h) for h in spec["heads"]]
    assert model_dims(pruned)["mlp_hidden"] == [len(n) for n in spec["neurons"]]
    x = images(3)
    out_ref, out = ref(x), pruned(x)
    torch.testing.assert_close(out, out_ref)

    weight = torch.randn_like(out)
    (out_ref * weight).sum().backward()
    (out * weight).sum().backward()
    assert_grads_are_the_kept_rows(pruned, ref, spec, dims)
    assert all(p.is_contiguous() for p in pruned.parameters())


def test_gated_attention_and_dropped_branch():
    dense = make_vit(depth=2, num_heads=4)
    for blk in dense.blocks:  # timm's optional output gate, added by hand
        blk.attn.gate = nn.Linear(48, 48).double()
    spec = full_spec(dense)
    spec["heads"] = [[1, 3], []]          # an empty list drops that attention branch
    spec["neurons"][1] = [0, 5, 7]
    ref, pruned = masked_reference(dense, spec), apply_spec(copy.deepcopy(dense), spec)
    x = images(2)
    torch.testing.assert_close(pruned(x), ref(x))
    assert pruned.blocks[0].attn.gate.out_features == 2 * dense.blocks[0].attn.head_dim


def test_scale_norm_refused_and_model_left_unchanged():
    dense = make_vit(depth=2, scale_attn_norm=True)
    spec = full_spec(dense)
    spec["heads"][0] = [0, 1]
    before = copy.deepcopy(dense.state_dict())
    with pytest.raises(SpecError, match="scale_norm"):
        apply_spec(dense, spec)
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())


# ------------------------------------------------------------------------------------------------
# token reduction
# ------------------------------------------------------------------------------------------------

def received_by_hand(probs, prefix):
    """The attention each non-prefix token j receives (column prefix + j of ``probs`` [H, N, N]: every
    head's, every query's), averaged, one token at a time."""
    heads, n = probs.shape[0], probs.shape[-1]
    return torch.stack([probs[:, :, prefix + j].sum() / (heads * n) for j in range(n - prefix)])


def reference_forward(model, x, schedule, fuse):
    """Explicit attention matrices, per-sample python loops; ``schedule``: {block: kept tokens}. The
    score of a token is the class token's attention to it (averaged over heads), or in a model without a
    class token the attention it receives (averaged over heads and every query)."""
    prefix, has_class = model.num_prefix_tokens, model.cls_token is not None
    t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for i, blk in enumerate(model.blocks):
        a = blk.attn
        h = blk.norm1(t)
        bsz, n, _ = h.shape
        qkv = a.qkv(h).reshape(bsz, n, 3, a.num_heads, a.head_dim)
        q = a.q_norm(qkv[:, :, 0].transpose(1, 2))
        k = a.k_norm(qkv[:, :, 1].transpose(1, 2))
        v = qkv[:, :, 2].transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) * a.scale, dim=-1)        # [B, H, N, N]
        t = t + blk.drop_path1(blk.ls1(a.proj((probs @ v).transpose(1, 2).reshape(bsz, n, -1))))
        if i in schedule and schedule[i] < n - prefix:
            rows = []
            for s in range(bsz):
                score = probs[s, :, 0, prefix:].mean(dim=0) if has_class else received_by_hand(probs[s], prefix)
                values = score.tolist()
                order = sorted(range(n - prefix), key=lambda j: -values[j])
                top = set(order[:schedule[i]])
                keep = [j for j in range(n - prefix) if j in top]
                drop = [j for j in range(n - prefix) if j not in top]
                rest = t[s, prefix:]
                if fuse == "mean":
                    fused = rest[drop].mean(dim=0)
                else:
                    fused = (rest[drop] * score[drop][:, None]).sum(dim=0) / score[drop].sum()
                rows.append(torch.cat([t[s, :prefix], rest[keep], fused[None]], dim=0))
            t = torch.stack(rows)
        t = t + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(t))))
    return model.forward_head(model.norm(t))


TOKEN_CASES = [
    dict(depth=4, fuse="mean", batch=1, r=0.3),
    dict(depth=4, fuse="weighted", batch=3, r=0.3),
    dict(depth=6, fuse="mean", batch=3, r=0.2, distilled=True),
    dict(depth=6, fuse="weighted", batch=1, r=0.45, init_values=0.5, qk_norm=True),
    dict(depth=3, fuse="mean", batch=3, r=0.5, global_pool="avg", heads=0.5),
]


@pytest.mark.parametrize("case", TOKEN_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_token_reduction_matches_explicit_reference(case):
    case = dict(case)
    fuse, batch, r, head_ratio = case.pop("fuse"), case.pop("batch"), case.pop("r"), case.pop("heads", 0.0)
    dense = make_vit(**case)
    dims = model_dims(dense)
    spec = policy_to_spec(uniform_policy(dims["depth"], head=head_ratio, token=r), random_rankings(dims), dims,
                          fuse=fuse)
    model = apply_spec(copy.deepcopy(dense), spec)
    assert all(b.attn.fused_attn for b in model.blocks)      # the fused kernel stays on
    reducing = {i: b.token_keep for i, b in enumerate(model.blocks) if isinstance(b, pruning.TokenReducingBlock)}
    assert sorted(reducing) == spec["tokens"]["blocks"]
    assert model_dims(model)["token_reduction"] == [[i, k] for i, k in sorted(reducing.items())]
    x = images(batch, seed=batch)
    feats = model.forward_features(x)
    n_tok = dims["num_prefix_tokens"] + dims["num_patches"]
    for i in sorted(reducing):
        n_tok, _ = pruning.tokens_after_reduction(n_tok, dims["num_prefix_tokens"], reducing[i])
    assert feats.shape[1] == n_tok < dims["num_prefix_tokens"] + dims["num_patches"]
    torch.testing.assert_close(model(x), reference_forward(model, x, reducing, fuse))

    # training mode: same outputs and gradients as the reference
    model.train()
    out = model(x)
    out = out[0] if isinstance(out, tuple) else out
    ref_out = reference_forward(model, x, reducing, fuse)
    ref_out = ref_out[0] if isinstance(ref_out, tuple) else ref_out
    w = torch.randn_like(out)
    params = [p for p in model.parameters()]
    g = torch.autograd.grad((out * w).sum(), params)
    g_ref = torch.autograd.grad((ref_out * w).sum(), params, allow_unused=True)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


def test_token_reduction_trains_with_drop_path_and_fp32():
    model = VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=5,
                              drop_path_rate=0.2, attn_drop_rate=0.1)
    dims = model_dims(model)
    apply_spec(model, policy_to_spec(uniform_policy(3, head=0.5, neuron=0.3, token=0.4), random_rankings(dims), dims))
    model.train()
    loss = model(torch.randn(5, 3, 32, 32)).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_class_swap_leaves_timm_alone():
    forward_before = Block.forward
    dense = make_vit(depth=4)
    dims = model_dims(dense)
    spec = policy_to_spec(uniform_policy(4, token=0.3), random_rankings(dims), dims)
    reduced = apply_spec(copy.deepcopy(dense), spec)
    assert type(reduced.blocks[0]) is pruning.TokenReducingBlock
    assert Block.forward is forward_before
    fresh = make_vit(depth=4)
    assert all(type(b) is Block for b in fresh.blocks) and all(type(b) is Block for b in dense.blocks)
    assert fresh.forward_features(images(1)).shape[1] == 17
    # state dict keys are those of plain blocks; re-applying without tokens restores timm's class
    assert list(reduced.state_dict()) == list(dense.state_dict())
    again = copy.deepcopy(reduced)
    spec_no_tokens = dict(spec, tokens=None)
    apply_spec(again, spec_no_tokens)
    assert all(type(b) is Block for b in again.blocks)
    torch.testing.assert_close(again(images(2)), dense(images(2)))


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------

def _raises(match, fn, *args, **kw):
    with pytest.raises(SpecError, match=match) as info:
        fn(*args, **kw)
    assert "\n" not in str(info.value)


def test_spec_errors():
    model = make_vit(depth=3, num_heads=4, mlp_ratio=1.0)
    dims = model_dims(model)
    good = full_spec(model)

    def edited(**changes):
        s = copy.deepcopy(good)
        s.update(changes)
        return s

    _raises("3-block model, this model has 4 blocks", validate_spec, good, model_dims(make_vit(depth=4)))
    _raises("spec 'heads' has 2 blocks", validate_spec, edited(heads=good["heads"][:2], arch=None), dims)
    _raises("head index 4 out of range in block 1", validate_spec,
            edited(heads=[[0], [0, 4], [1]]), dims)
    _raises("neuron index -1 out of range in block 0", validate_spec,
            edited(neurons=[[-1], [0], [0]]), dims)
    _raises("duplicate head indices in block 2", validate_spec, edited(heads=[[0], [1], [2, 2]]), dims)
    _raises("not an integer", validate_spec, edited(heads=[[0.5], [1], [2]]), dims)
    bad = copy.deepcopy(good)
    del bad["neurons"]
    _raises("missing keys: neurons", validate_spec, bad, dims)
    _raises("version", validate_spec, edited(version=7), dims)
    six_heads = model_dims(make_vit(depth=3, num_heads=6, embed_dim=48, mlp_ratio=1.0))
    _raises("another architecture: head_dim 12 vs this model.s 8", validate_spec, good, six_heads)
    _raises("token-reducing block 3 out of range", validate_spec,
            edited(tokens={"blocks": [3], "keep_rates": [0.5]}), dims)
    _raises("distinct and increasing", validate_spec, edited(tokens={"blocks": [1, 1], "keep_rates": [0.5, 0.4]}), dims)
    _raises("keep rate 1.5", validate_spec, edited(tokens={"blocks": [1], "keep_rates": [1.5]}), dims)
    _raises("2 blocks but 1 keep rates", validate_spec, edited(tokens={"blocks": [0, 1], "keep_rates": [0.5]}), dims)
    _raises("fuse", validate_spec, edited(tokens={"blocks": [1], "keep_rates": [0.5], "fuse": "max"}), dims)
    _raises("missing keys: keep_rates", validate_spec, edited(tokens={"blocks": [1]}), dims)
    # a model without a class token reduces tokens by the attention they receive (tests/test_families.py)

    # a compressed model is not a dense model: a spec for the dense one no longer fits
    spec = copy.deepcopy(good)
    spec["heads"][0] = [0, 1]
    pruned = apply_spec(copy.deepcopy(model), spec)
    _raises("another architecture", apply_spec, pruned, spec)

    # policies and rankings
    ranks = random_rankings(dims)
    _raises(r"outside \[0, 1\)", policy_to_spec, {"head": [0.1, 1.0, 0.0], "neuron": [0.0] * 3, "token": 0.0},
            ranks, dims)
    _raises(r"outside \[0, 1\)", policy_to_spec, uniform_policy(3, token=0.0) | {"token": -0.1}, ranks, dims)
    _raises(r"outside \[0, 1\)", uniform_policy, 3, neuron=1.2)
    _raises(r"outside \[0, 1\)", kept_count, np.array([4, 4]), np.array([0.5, 1.0]))
    _raises("'head' has 2 entries, the model has 3 blocks", policy_to_spec,
            {"head": [0.1, 0.1], "neuron": [0.0] * 3, "token": 0.0}, ranks, dims)
    _raises("policy is missing keys: token", policy_to_spec, {"head": [0.0] * 3, "neuron": [0.0] * 3}, ranks, dims)
    _raises("not a permutation", policy_to_spec, uniform_policy(3), {"heads": [[0, 0, 1, 2]] * 3,
                                                                     "neurons": ranks["neurons"]}, dims)
    _raises("rankings are missing key 'neurons'", policy_to_spec, uniform_policy(3), {"heads": ranks["heads"]}, dims)
    _raises("2\\*3\\+1 = 7", policy_from_vector, np.zeros(6), 3)
    _raises("fuse", policy_to_spec, uniform_policy(3), ranks, dims, fuse="max")


def test_resolve_policy_says_which_dimensions_it_drops():
    """--head_pruning alone with a policy over all three dimensions keeps only the head ratios,
    and the source it reports (logged, and kept in result.json) says so."""
    policy, source, _ = pruning.resolve_policy(4, (0.25, 0.5, 0.1), active=(True, False, False))
    assert policy["head"] == [0.25] * 4 and policy["neuron"] == [0.0] * 4 and policy["token"] == 0.0
    assert source == ("uniform ratios without its neuron and token ratios (only the dimensions of the "
                      "--*_pruning flags given)")
    assert pruning.resolve_policy(4, (0.25, 0.0, None), active=(True, False, False))[1] == "uniform ratios"
