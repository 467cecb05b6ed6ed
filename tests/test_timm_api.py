"""timm's public VisionTransformer methods on a token-reduced compressed model: each either keeps
its contract exactly (checked against the model's blocks run one by one) or refuses in one line
that says why. The methods are listed explicitly; a public method timm adds fails the list test.
Every test runs on a class-token DeiT-style model and on a SigLIP-style one (no class token, an
attention-pool head, tokens reduced by the attention they receive)."""
import copy

import pytest
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

import models
import pruning
from helpers import block_outputs

# every public method VisionTransformer defines itself, and how this file covers it
COVERED = {
    "forward": "test_forward_is_head_of_features",
    "forward_features": "test_forward_features_is_the_blocks_one_by_one",
    "forward_head": "test_forward_is_head_of_features",
    "pool": "test_forward_is_head_of_features",
    "forward_intermediates": "test_forward_intermediates_options",
    "get_intermediate_layers": "test_get_intermediate_layers",
    "get_classifier": "test_classifier_methods",
    "reset_classifier": "test_classifier_methods",
    "no_weight_decay": "test_param_group_methods",
    "group_matcher": "test_param_group_methods",
    "set_grad_checkpointing": "test_grad_checkpointing_keeps_outputs",
    "prune_intermediate_layers": "test_prune_intermediate_layers",
    "set_input_size": "test_set_input_size",
    "init_weights": "test_init_methods_keep_shapes",
    "fix_init_weight": "test_init_methods_keep_shapes",
    "load_pretrained": None,  # needs a big_vision .npz of a dense model: not cheap, not called
}


def own_public_methods():
    return sorted(n for n in dir(VisionTransformer)
                  if not n.startswith("_") and n in VisionTransformer.__dict__ and not hasattr(nn.Module, n)
                  and callable(getattr(VisionTransformer, n)))


def test_every_public_method_is_listed():
    missing = [n for n in own_public_methods() if n not in COVERED]
    assert not missing, f"timm's VisionTransformer gained public methods this file does not check: {missing}"


# 12 blocks of width 48 on 64 patches each: a preset with a class token; SigLIP's by name, tiny
FAMILIES = {"class-token": ("vit_nano_patch4_32", {}),
            "siglip-map": ("vit_base_patch16_siglip_224", dict(img_size=32, patch_size=4, embed_dim=48, depth=12,
                                                               num_heads=4))}


@pytest.fixture(scope="module", params=list(FAMILIES))
def compressed(request):
    torch.manual_seed(0)
    name, kwargs = FAMILIES[request.param]
    dense = models.build_model(name, **kwargs).eval()
    dims = pruning.model_dims(dense)
    rankings = {"heads": [list(range(h)) for h in dims["num_heads"]],
                "neurons": [list(range(m)) for m in dims["mlp_hidden"]]}
    model = pruning.slice_model(dense, pruning.uniform_policy(12, 0.25, 0.25, 0.3), rankings, 8).eval()
    assert any(isinstance(b, pruning.TokenReducingBlock) for b in model.blocks)
    return model


@pytest.fixture
def model(compressed):
    return copy.deepcopy(compressed)


X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def pooled_by_hand(model, feats):
    """What timm's pool gives: the class token, or the attention pool over the non-prefix tokens."""
    if model.attn_pool is not None:
        return model.attn_pool(feats[:, model.num_prefix_tokens:])
    return feats[:, 0]


def one_line(info, *words):
    text = str(info.value)
    assert len(text.splitlines()) == 1, text
    for w in words:
        assert w in text, text


@torch.no_grad()
def test_forward_features_is_the_blocks_one_by_one(model):
    ref = block_outputs(model, X)
    assert ref[-1].shape[1] < model.num_prefix_tokens + 64  # tokens were reduced
    torch.testing.assert_close(model.forward_features(X), model.norm(ref[-1]))
    with pytest.raises(RuntimeError) as info:
        model.forward_features(X, is_causal=True)
    one_line(info, "attention masks")


@torch.no_grad()
def test_forward_is_head_of_features(model):
    feats = model.norm(block_outputs(model, X)[-1])
    assert model.global_pool == ("token" if model.cls_token is not None else "map")
    pooled = model.fc_norm(pooled_by_hand(model, feats))
    torch.testing.assert_close(model.pool(feats), pooled_by_hand(model, feats))
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), pooled)
    torch.testing.assert_close(model.forward_head(feats), model.head(pooled))
    torch.testing.assert_close(model(X), model.forward_head(model.forward_features(X)))
    if model.attn_pool is None:  # timm's attention pool takes no pool_type
        torch.testing.assert_close(model.pool(feats, "avg"), feats[:, model.num_prefix_tokens:].mean(1))


@torch.no_grad()
def test_forward_intermediates_options(model):
    ref = block_outputs(model, X)
    p = model.num_prefix_tokens
    final, inter = model.forward_intermediates(X, output_fmt="NLC")
    torch.testing.assert_close(final, model.norm(ref[-1]))
    assert len(inter) == 12
    for got, want in zip(inter, ref):
        torch.testing.assert_close(got, want[:, p:])
    only = model.forward_intermediates(X, indices=[2, 7], output_fmt="NLC", intermediates_only=True)
    torch.testing.assert_close(only, [ref[2][:, p:], ref[7][:, p:]])
    last2 = model.forward_intermediates(X, indices=2, output_fmt="NLC", intermediates_only=True, norm=True)
    torch.testing.assert_close(last2, [model.norm(ref[10])[:, p:], model.norm(ref[11])[:, p:]])
    early = model.forward_intermediates(X, indices=[3], output_fmt="NLC", intermediates_only=True, stop_early=True)
    torch.testing.assert_close(early, [ref[3][:, p:]])
    pairs = model.forward_intermediates(X, indices=[5], output_fmt="NLC", intermediates_only=True,
                                        return_prefix_tokens=True)
    d = model.forward_intermediates(X, indices=[1], output_fmt="NLC", output_dict=True, return_prefix_tokens=True)
    torch.testing.assert_close(d["image_intermediates"], [ref[1][:, p:]])
    if p:
        torch.testing.assert_close(pairs[0][0], ref[5][:, p:])
        torch.testing.assert_close(pairs[0][1], ref[5][:, :p])
        torch.testing.assert_close(d["image_intermediates_prefix"], [ref[1][:, :p]])
    else:  # timm: without prefix tokens there is nothing to pair, the tokens come alone
        torch.testing.assert_close(pairs, [ref[5]])
        assert "image_intermediates_prefix" not in d
    torch.testing.assert_close(d["image_features"], model.norm(ref[-1]))
    for call in (lambda: model.forward_intermediates(X), lambda: model.forward_intermediates(X, output_fmt="NCHW")):
        with pytest.raises(pruning.SpecError) as info:
            call()
        one_line(info, "output_fmt='NLC'")
    with pytest.raises(RuntimeError) as info:
        model.forward_intermediates(X, output_fmt="NLC", is_causal=True)
    one_line(info, "attention masks")


@torch.no_grad()
def test_get_intermediate_layers(model):
    ref, p = block_outputs(model, X), model.num_prefix_tokens
    got = model.get_intermediate_layers(X, n=[4, 11])
    torch.testing.assert_close(got, [ref[4][:, p:], ref[11][:, p:]])
    with pytest.raises(pruning.SpecError) as info:
        model.get_intermediate_layers(X, reshape=True)
    one_line(info, "output_fmt='NLC'")


def test_classifier_methods(model):
    assert model.get_classifier() is model.head
    feats = model.forward_features(X).detach()
    model.reset_classifier(7)
    assert model.get_classifier().out_features == 7 and model.num_classes == 7
    with torch.no_grad():
        torch.testing.assert_close(model(X), model.head(model.fc_norm(pooled_by_hand(model, feats))))
    model.reset_classifier(0)
    with torch.no_grad():
        torch.testing.assert_close(model(X), model.fc_norm(pooled_by_hand(model, feats)))


def test_param_group_methods(model):
    names = dict(model.named_parameters())
    nwd = model.no_weight_decay()
    assert {"pos_embed", "cls_token"} <= nwd and "pos_embed" in names
    assert ("cls_token" in names) == (model.cls_token is not None)
    m = model.group_matcher()
    assert set(m) == {"stem", "blocks"}
    from timm.models import group_parameters
    groups = group_parameters(model, m)
    assert sorted(n for g in groups.values() for n in g) == sorted(names)


def test_grad_checkpointing_keeps_outputs(model):
    with torch.no_grad():
        want = model(X)
        want_inter = model.forward_intermediates(X, output_fmt="NLC", intermediates_only=True)
    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing
    with torch.no_grad():
        torch.testing.assert_close(model(X), want)
        torch.testing.assert_close(model.forward_intermediates(X, output_fmt="NLC", intermediates_only=True),
                                   want_inter)
    model.train()
    x = X.clone().requires_grad_(True)
    model(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    model.set_grad_checkpointing(False)
    assert not model.grad_checkpointing


@torch.no_grad()
def test_prune_intermediate_layers(model):
    ref, p = block_outputs(model, X), model.num_prefix_tokens
    kept = model.prune_intermediate_layers([2, 5])
    assert kept == [2, 5] and len(model.blocks) == 6
    got = model.forward_intermediates(X, indices=[2, 5], output_fmt="NLC", intermediates_only=True)
    torch.testing.assert_close(got, [ref[2][:, p:], ref[5][:, p:]])
    with pytest.raises(pruning.SpecError) as info:  # the guard stays on the truncated model
        model.forward_intermediates(X, indices=[5])
    one_line(info, "output_fmt='NLC'")


def test_set_input_size(model):
    before = model.state_dict()
    with pytest.raises(pruning.SpecError) as info:
        model.set_input_size(img_size=(64, 64))
    one_line(info, "patch count", "64 to 256")
    assert model.patch_embed.num_patches == 64 and model.pos_embed.shape[1] == 64 + model.num_prefix_tokens
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.set_input_size(img_size=(32, 32))  # the same patch count: timm's method, unchanged
    with torch.no_grad():
        torch.testing.assert_close(model(X), model.forward_head(model.norm(block_outputs(model, X)[-1])))


def test_init_methods_keep_shapes(model):
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    model.init_weights()
    model.fix_init_weight()
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    with torch.no_grad():
        out = model(X)
        torch.testing.assert_close(out, model.forward_head(model.norm(block_outputs(model, X)[-1])))
    assert torch.isfinite(out).all()
