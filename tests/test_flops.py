"""flops.py against torch's FlopCounterMode, the DeiT model cards, and itself (policy vs model)."""
import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Attention, VisionTransformer
from torch.utils.flop_counter import FlopCounterMode

import flops
from pruning import SpecError, apply_spec, model_dims, policy_from_vector, policy_to_spec, uniform_policy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_vit(distilled=False, **kw):
    cfg = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=4, mlp_ratio=2.0, num_classes=5)
    cfg.update(kw)
    return (VisionTransformerDistilled if distilled else VisionTransformer)(**cfg).eval()


def random_rankings(dims, seed=0):
    rng = np.random.default_rng(seed)
    return {"heads": [rng.permutation(h).tolist() for h in dims["num_heads"]],
            "neurons": [rng.permutation(m).tolist() for m in dims["mlp_hidden"]]}


def counted_macs(model, img=32, batch=2):
    """MACs per image by torch's counter, with the explicit (unfused) attention so it is counted."""
    for m in model.modules():
        if isinstance(m, Attention):
            m.fused_attn = False
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(batch, 3, img, img))
    return counter.get_total_flops() / 2 / batch


def compressed(dense, policy, round_to=1, fuse="mean", seed=0):
    dims = model_dims(dense)
    return apply_spec(copy.deepcopy(dense), policy_to_spec(policy, random_rankings(dims, seed), dims, round_to, fuse))


@pytest.mark.parametrize("kind", ["dense", "sliced", "tokens", "tokens-weighted", "distilled-all", "avgpool-tokens",
                                  "deep-narrow"])
def test_model_macs_matches_flop_counter(kind):
    if kind == "distilled-all":
        dense = make_vit(distilled=True, depth=6, qkv_bias=False)
    elif kind == "avgpool-tokens":
        dense = make_vit(global_pool="avg", init_values=0.1, patch_size=4)
    elif kind == "deep-narrow":
        dense = make_vit(depth=9, embed_dim=24, num_heads=6, mlp_ratio=3.0, patch_size=4)
    else:
        dense = make_vit(patch_size=4)
    depth = len(dense.blocks)
    rng = np.random.default_rng(3)
    if kind == "dense":
        model = dense
    elif kind == "sliced":
        model = compressed(dense, {"head": rng.uniform(0, 0.8, depth).tolist(),
                                   "neuron": rng.uniform(0, 0.9, depth).tolist(), "token": 0.0})
    else:
        pol = uniform_policy(depth, head=0.3, neuron=0.4, token=0.35)
        model = compressed(dense, pol, fuse="weighted" if kind == "tokens-weighted" else "mean")
    ours = flops.model_macs(model)["macs"]
    theirs = counted_macs(model)
    assert abs(ours - theirs) / theirs < 0.01, (ours, theirs)
    assert flops.model_macs(model)["params"] == sum(p.numel() for p in model.parameters())


def test_model_macs_other_input_size():
    model = make_vit(img_size=48, patch_size=8, dynamic_img_size=True)
    ours = flops.model_macs(model, input_size=32)["macs"]
    assert ours == pytest.approx(counted_macs(model, img=32), rel=0.01)
    assert flops.model_macs(model, input_size=(3, 48, 48))["macs"] == flops.model_macs(model)["macs"]


@pytest.mark.parametrize("name,gmacs", [("deit_tiny_patch16_224", 1.3), ("deit_small_patch16_224", 4.6),
                                        ("deit_base_patch16_224", 17.6)])
def test_deit_model_cards(name, gmacs):
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = timm.create_model(name, pretrained=False)
    assert round(flops.model_macs(model)["macs"] / 1e9, 1) == gmacs


@pytest.mark.parametrize("round_to", [1, 8])
def test_policy_gmacs_equals_model_macs(round_to):
    dense = make_vit(depth=5, embed_dim=64, num_heads=4, mlp_ratio=4.0, patch_size=4)
    dims = model_dims(dense)
    rng = np.random.default_rng(round_to)
    X = rng.uniform(0, 0.95, size=(8, 2 * 5 + 1))
    X[0] = 0.0                      # dense
    X[1, -1] = 0.0                  # no token reduction
    X[2, -1] = 0.01                 # rate so small no token is dropped
    fast = flops.policy_gmacs(dims, X, round_to=round_to)
    for i, x in enumerate(X):
        model = compressed(dense, policy_from_vector(x, 5), round_to=round_to, seed=i)
        assert fast[i] == flops.model_macs(model)["macs"] / 1e9
        assert flops.policy_gmacs(dims, x, round_to=round_to) == fast[i]   # a 1-D vector works too
    assert fast[0] == flops.model_macs(dense)["macs"] / 1e9


def test_policy_gmacs_distilled_deit_small_and_speed():
    with torch.device("meta"):
        dense = timm.create_model("deit_small_distilled_patch16_224", pretrained=False)
    dims = model_dims(dense)
    rng = np.random.default_rng(0)
    X = rng.uniform(0, 0.9, size=(10000, 25))
    for x in X[:3]:
        model = compressed(dense, policy_from_vector(x, 12), round_to=8)
        assert flops.policy_gmacs(dims, x, round_to=8) == flops.model_macs(model)["macs"] / 1e9
    batch = flops.policy_gmacs(dims, X[:200], round_to=8)  # the vectorised count equals one at a time
    assert np.array_equal(batch, [flops.policy_gmacs(dims, x, round_to=8) for x in X[:200]])
    assert flops.policy_gmacs(dims, np.zeros(25)) == pytest.approx(4.62, abs=0.01)


def test_policy_gmacs_rejects_bad_input():
    dims = model_dims(make_vit())
    with pytest.raises(SpecError, match="2\\*4\\+1 = 9 entries"):
        flops.policy_gmacs(dims, np.zeros((3, 8)))
    bad = np.zeros(9)
    bad[8] = 1.0
    with pytest.raises(SpecError, match=r"outside \[0, 1\)"):
        flops.policy_gmacs(dims, bad)


@pytest.mark.slow
def test_cli_json():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "flops.py"), "--model", "deit_tiny_patch16_224",
                          "--json"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert round(line["gmacs"], 1) == 1.3 and line["params"] == 5717416
