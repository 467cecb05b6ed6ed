"""More timm families (issue 23), each against a slow, obvious reference: SigLIP-style attention-pool
(MAP) heads without a class token, CLIP image towers (pre-norm, quick-GELU), and a class-token-free
average-pooled tower. Exact MACs against torch's counter, slicing against the masked dense model,
token reduction against explicit attention (the class-token score, or for a model without a class
token the attention each token receives), save / reload, ONNX export (slow), and one-line refusals
of the VisionTransformer variants still unsupported.

Families are tiny: 32 px, 16 patches of 8 px, embed 48, 4 heads, 4 blocks."""
import copy
import functools

import numpy as np
import pytest
import torch
import torch.nn as nn
from timm.layers import AttentionPoolLatent, HybridEmbed, QuickGELU
from timm.models.vision_transformer import (Attention, ParallelScalingBlock, ParallelThingsBlock, ResPostBlock,
                                            VisionTransformer)
from torch.utils.flop_counter import FlopCounterMode

import flops
import models
import pruning
from pruning import SpecError, apply_spec, model_dims, policy_from_vector, policy_to_spec, uniform_policy
from test_pruning import assert_grads_are_the_kept_rows, masked_reference, received_by_hand, reference_forward

SMALL = dict(patch_size=8, embed_dim=48, depth=4, num_heads=4)
# family: (timm name, extra keyword arguments); every one built by name with pretrained=False
FAMILIES = {
    "siglip": ("vit_base_patch16_siglip_224", {}),                      # MAP head, no class token
    "siglip-reg": ("vit_base_patch16_siglip_224", {"reg_tokens": 2}),   # ... with 2 register (prefix) tokens
    "siglip-gap": ("vit_base_patch16_siglip_gap_224", {}),              # average pool, no class token
    "clip": ("vit_base_patch16_clip_224", {}),                          # pre-norm, class token
    "clip-quickgelu": ("vit_base_patch16_clip_quickgelu_224", {}),
}


def build(family, dtype=torch.float64, **over):
    """The family's tiny model, with larger random weights so every head and token matters."""
    name, extra = FAMILIES[family]
    model = models.build_model(name, num_classes=5, img_size=32, **dict(SMALL, **extra, **over))
    g = torch.Generator().manual_seed(len(family))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.05 if "norm" in pname else 0.2))
    return model.to(dtype).eval()


def random_rankings(dims, seed=0):
    rng = np.random.default_rng(seed)
    return {"heads": [rng.permutation(h).tolist() for h in dims["num_heads"]],
            "neurons": [rng.permutation(m).tolist() for m in dims["mlp_hidden"]]}


def compressed(dense, head=0.0, neuron=0.0, token=0.0, fuse="mean", seed=0):
    dims = model_dims(dense)
    policy = uniform_policy(dims["depth"], head=head, neuron=neuron, token=token)
    return apply_spec(copy.deepcopy(dense), policy_to_spec(policy, random_rankings(dims, seed), dims, fuse=fuse))


def images(batch=3, seed=1, dtype=torch.float64):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def counted_macs(model, batch=2):
    """MACs per image by torch's counter, every attention (the blocks' and the pool's) unfused so it is
    counted; parameters frozen rather than no_grad (the counter's module tracker trips on the pool's
    expanded latent under no_grad)."""
    model = copy.deepcopy(model).float().requires_grad_(False)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    with FlopCounterMode(display=False) as counter:
        model(images(batch, dtype=torch.float32))
    return counter.get_total_flops() / 2 / batch


# ------------------------------------------------------------------------------------------------
# building by name
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_builds_by_timm_name(family):
    model = build(family, dtype=torch.float32)
    dims = model_dims(model)
    assert isinstance(model, VisionTransformer) and dims["depth"] == 4 and dims["num_patches"] == 16
    if family.startswith("siglip"):
        assert not dims["has_class_token"] and dims["num_prefix_tokens"] == (2 if family == "siglip-reg" else 0)
        assert (type(model.attn_pool) is AttentionPoolLatent) == (family != "siglip-gap")
        assert (dims["attn_pool"] is None) == (family == "siglip-gap")
    else:
        assert dims["has_class_token"] and isinstance(model.norm_pre, nn.LayerNorm) and dims["attn_pool"] is None
        assert isinstance(model.blocks[0].mlp.act, QuickGELU) == (family == "clip-quickgelu")
    flops.check_compressible(model, 8)
    assert model(images(2, dtype=torch.float32)).shape == (2, 5)


# ------------------------------------------------------------------------------------------------
# MACs
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["dense", "sliced", "tokens"])   # the fuse mode costs no MACs
@pytest.mark.parametrize("family", FAMILIES)
def test_model_macs_equal_the_flop_counter(family, kind):
    dense = build(family, dtype=torch.float32)
    if kind == "dense":
        model = dense
    elif kind == "sliced":
        model = compressed(dense, head=0.5, neuron=0.4)
    else:
        model = compressed(dense, head=0.25, neuron=0.3, token=0.3)
        assert model_dims(model)["token_reduction"]
    assert flops.model_macs(model)["macs"] == counted_macs(model)
    assert flops.model_macs(model)["params"] == sum(p.numel() for p in model.parameters())


def test_attention_pool_macs_by_hand():
    """SigLIP-B/16 at 224 px: 196 tokens reach the pool, one latent query of width 768."""
    with torch.device("meta"):
        model = models.build_model("vit_base_patch16_siglip_224")
    pool = model_dims(model)["attn_pool"]
    d, hidden = 768, model.attn_pool.mlp.fc1.out_features
    assert flops.attn_pool_macs(pool, 196, 0) == d * d + 196 * d * 2 * d + 2 * 196 * d + d * d + 2 * d * hidden
    assert flops.attn_pool_macs(pool, np.array([196, 50]), 0).tolist() == [
        flops.attn_pool_macs(pool, 196, 0), flops.attn_pool_macs(pool, 50, 0)]


@pytest.mark.parametrize("family", ["siglip", "siglip-reg", "clip"])
def test_policy_gmacs_equal_model_macs(family):
    dense = build(family, dtype=torch.float32)
    dims = model_dims(dense)
    rng = np.random.default_rng(len(family))
    X = rng.uniform(0, 0.9, size=(6, 2 * dims["depth"] + 1))
    X[0] = 0.0
    fast = flops.policy_gmacs(dims, X, round_to=8)
    for i, x in enumerate(X):
        model = pruning.slice_model(dense, policy_from_vector(x, dims["depth"]), random_rankings(dims, i), round_to=8)
        assert fast[i] == flops.model_macs(model)["macs"] / 1e9
    assert fast[0] == flops.model_macs(dense)["macs"] / 1e9


# ------------------------------------------------------------------------------------------------
# slicing heads and neurons (the attention pool stays dense)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_sliced_equals_masked_forward_backward(family):
    dense = build(family)
    dims = model_dims(dense)
    rng = np.random.default_rng(len(family))
    policy = {"head": rng.uniform(0.2, 0.7, 4).tolist(), "neuron": rng.uniform(0.1, 0.8, 4).tolist(), "token": 0.0}
    spec = policy_to_spec(policy, random_rankings(dims, 3), dims)
    ref, pruned = masked_reference(dense, spec), apply_spec(copy.deepcopy(dense), spec)
    x = images(3)
    out_ref, out = ref(x), pruned(x)
    torch.testing.assert_close(out, out_ref)
    w = torch.randn_like(out)
    (out_ref * w).sum().backward()
    (out * w).sum().backward()
    assert_grads_are_the_kept_rows(pruned, ref, spec, dims)


# ------------------------------------------------------------------------------------------------
# token reduction
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", [0, 2])
@pytest.mark.parametrize("fused_attn", [True, False])
def test_received_attention_equals_reference(prefix, fused_attn):
    attn = Attention(48, num_heads=4, qkv_bias=True, qk_norm=True, norm_layer=nn.LayerNorm).double().eval()
    attn.fused_attn = fused_attn
    x = torch.randn(2, prefix + 9, 48, dtype=torch.float64)
    with torch.no_grad():
        out, score = pruning.attention_with_received_attention(attn, x, prefix)
        torch.testing.assert_close(out, attn(x))                   # the branch's output is timm's
        qkv = attn.qkv(x).reshape(2, prefix + 9, 3, 4, 12)
        q, k = attn.q_norm(qkv[:, :, 0].transpose(1, 2)), attn.k_norm(qkv[:, :, 1].transpose(1, 2))
        probs = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)
    assert score.shape == (2, 9)
    for s in range(2):
        torch.testing.assert_close(score[s], received_by_hand(probs[s], prefix))


TOKEN_CASES = [("siglip", "mean", 0.3), ("siglip", "weighted", 0.45), ("siglip-reg", "mean", 0.3),
               ("siglip-gap", "weighted", 0.3), ("clip", "mean", 0.3), ("clip-quickgelu", "weighted", 0.3)]


@pytest.mark.parametrize("family,fuse,rate", TOKEN_CASES)
def test_token_reduction_matches_explicit_reference(family, fuse, rate):
    dense = build(family)
    model = compressed(dense, head=0.25, token=rate, fuse=fuse)
    reducing = {i: b.token_keep for i, b in enumerate(model.blocks) if isinstance(b, pruning.TokenReducingBlock)}
    assert len(reducing) == 3
    want_score = "class" if dense.cls_token is not None else "received"
    assert all(model.blocks[i].token_score == want_score for i in reducing)
    x = images(3, seed=2)
    prefix = model.num_prefix_tokens
    assert model.forward_features(x).shape[1] == prefix + reducing[max(reducing)] + 1
    torch.testing.assert_close(model(x), reference_forward(model, x, reducing, fuse))
    # training mode: the same gradients as the reference
    model.train()
    w = torch.randn(3, 5, dtype=torch.float64)
    params = list(model.parameters())
    got = torch.autograd.grad((model(x) * w).sum(), params)
    want = torch.autograd.grad((reference_forward(model, x, reducing, fuse) * w).sum(), params)
    for name, a, b in zip([n for n, _ in model.named_parameters()], got, want):
        torch.testing.assert_close(a, b, msg=name)


# ------------------------------------------------------------------------------------------------
# model files and export
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_compressed_model_file_reloads_the_same_model(family, tmp_path):
    name, extra = FAMILIES[family]
    dense = build(family, dtype=torch.float32)
    model = compressed(dense, head=0.25, neuron=0.3, token=0.3)
    arch = models.model_arch(name, model, 32, (0.5,) * 3, (0.5,) * 3, model_kwargs=dict(SMALL, **extra))
    models.save_model_file(str(tmp_path / "c.pth"), model, arch)
    loaded, _ = models.load_model_file(str(tmp_path / "c.pth"))
    assert loaded.prune_spec == model.prune_spec
    assert [type(b) for b in loaded.blocks] == [type(b) for b in model.blocks]
    assert [getattr(b, "token_score", None) for b in loaded.blocks] == [getattr(b, "token_score", None)
                                                                        for b in model.blocks]
    x = images(2, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert flops.model_macs(loaded) == flops.model_macs(model)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["siglip", "clip", "clip-quickgelu"])
def test_onnx_export_is_verified(family, tmp_path):
    pytest.importorskip("onnxruntime")
    import export
    name, extra = FAMILIES[family]
    model = compressed(build(family, dtype=torch.float32), head=0.25, neuron=0.3, token=0.3)
    arch = models.model_arch(name, model, 32, (0.5,) * 3, (0.5,) * 3, model_kwargs=dict(SMALL, **extra))
    meta = export.export_onnx(model, str(tmp_path / "m.onnx"), arch)
    assert meta["verification"]["max_abs_diff"] <= 1e-4 and meta["verification"]["batch_sizes"] == [5, 1]
    assert meta["gmacs"] == flops.model_macs(model)["macs"] / 1e9


def test_latency_table_units_run_the_pool_and_the_received_score():
    """Every unit of a latency table of a SigLIP-style model runs: the reducing branch ranks by the
    attention tokens receive, the head unit (final norm, attention pool, classifier) over each token count."""
    import latency
    dense = build("siglip", dtype=torch.float32)
    seen = []

    def timer(items):  # runs every unit once; its "time" grows with the tokens, as a real one would
        for desc, fn in items:
            seen.append((desc, fn()))
        return [1.0 + 0.01 * d.get("tokens", 0) for d, _ in items]
    table = latency.measure_table(dense, "cpu", 2, token_points=3, width_points=3, calibration_models=1, timer=timer)
    heads = [(d["tokens"], out.shape) for d, out in seen if d["unit"] == "head"]
    assert heads == [(n, (2, 5)) for n in table["tokens"]] and table["tokens"][0] == 2   # no prefix: 1 kept + 1 fused
    assert all(out.shape[1] == d["keep"] + 1 for d, out in seen if d["unit"] == "reduce" and d["keep"] < d["tokens"])
    dims = model_dims(dense)
    raw = latency.raw_predict(table, pruning.policy_shapes(dims, np.stack([np.zeros(9), np.full(9, 0.3)])))
    assert raw[1] < raw[0]   # the units' sum, before the (here meaningless) calibration


@pytest.mark.slow
def test_prune_finetune_cli_on_a_siglip_model_file(tmp_path):
    from helpers import run_cli
    name, kw = "vit_base_patch16_siglip_224", dict(patch_size=8, embed_dim=32, depth=4, num_heads=4)
    dense = models.build_model(name, num_classes=10, img_size=32, **kw)
    models.save_model_file(str(tmp_path / "dense.pth"), dense, models.model_arch(name, dense, 32, (0.5,) * 3,
                                                                                (0.5,) * 3, kw))
    code, _, err = run_cli(["--batch-size", "32", "--num_workers", "0", "--prune_finetune", "--resume",
                            tmp_path / "dense.pth", "--head_sparsity", "0.25", "--neuron_sparsity", "0.25",
                            "--token_sparsity", "0.3", "--finetune-epochs", "0", "--output_dir", tmp_path / "out"])
    assert code == 0, err
    model, _ = models.load_model_file(str(tmp_path / "out" / "prune_finetune" / "compressed.pth"))
    assert [getattr(b, "token_score", None) for b in model.blocks] == ["received"] * 3 + [None]
    assert flops.model_macs(model)["macs"] < flops.model_macs(dense)["macs"]


# ------------------------------------------------------------------------------------------------
# what is still refused, in one line naming the class
# ------------------------------------------------------------------------------------------------

UNSUPPORTED = {
    "AttentionPoolPrr": dict(global_pool="prr"),
    "HybridEmbed": dict(patch_size=1, embed_layer=functools.partial(HybridEmbed, backbone=nn.Conv2d(3, 16, 8, 8))),
    "ParallelScalingBlock": dict(block_fn=ParallelScalingBlock),
    "ParallelThingsBlock": dict(block_fn=ParallelThingsBlock),
    "ResPostBlock": dict(block_fn=ResPostBlock),
    "DiffAttention": dict(attn_layer="diff"),
}


@pytest.mark.parametrize("what", UNSUPPORTED)
def test_unsupported_variants_are_refused_in_one_line(what):
    model = VisionTransformer(**dict(SMALL, img_size=32, num_classes=5, depth=2, **UNSUPPORTED[what]))
    for check in (flops.check_compressible, flops.model_macs):
        with pytest.raises(SpecError) as info:
            check(model)
        assert what in str(info.value) and len(str(info.value).splitlines()) == 1, str(info.value)
