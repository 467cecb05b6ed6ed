"""EVA-02 (timm.models.eva.Eva): MACs against torch's counter, head / neuron slicing against the dense
model with the same heads and neurons masked by hand, the model file round trip, the criteria, what
is refused (token reduction, latency tables, the TorchScript exporter), the ONNX export and one CLI run."""
import copy
import json
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.layers import AttentionRope, GluMlp, SwiGLU
from timm.models.eva import Eva, EvaAttention
from torch.utils.flop_counter import FlopCounterMode

import dependency_criterion as dc
import engine
import export
import flops
import latency
import main
import models
import pruning
import utils
from helpers import run_cli

# tiny EVA-02 configurations: what eva02_* builds (see test_eva02_names_build_what_is_tested), made small
BASE = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=4 * 2 / 3, swiglu_mlp=True,
            use_rot_pos_emb=True, ref_feat_shape=(4, 4), num_classes=10)
CONFIGS = {
    "ti-s": {},                                                     # fused qkv + q_bias / v_bias, GluMlp
    "b-l": dict(qkv_fused=False, scale_mlp=True),                   # q/k/v_proj, SwiGLU with its LayerNorm
    "clip": dict(qkv_fused=False, scale_mlp=True, scale_attn_inner=True, global_pool="token", init_values=0.3),
    "mlp": dict(swiglu_mlp=False, qkv_bias=False, num_heads=2),     # plain Mlp, fused qkv without biases
}


def make_eva(name="ti-s", dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    model = Eva(**{**BASE, **CONFIGS[name], **kw})
    with torch.no_grad():  # larger random weights (and biases timm starts at zero) so every component matters
        for pname, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.05 if "norm" in pname else 0.2))
    return model.to(dtype).eval()


def images(batch=3, size=32, seed=1, dtype=torch.float64):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def random_spec(model, seed=0):
    """Random kept heads / neurons per block: at least one head dropped in block 0, one kept everywhere."""
    dims = pruning.model_dims(model)
    rng = np.random.default_rng(seed)
    spec = pruning.full_spec(model)
    spec["heads"] = [sorted(rng.choice(h, size=int(rng.integers(1, h)), replace=False).tolist())
                     for h in dims["num_heads"]]
    spec["neurons"] = [sorted(rng.choice(m, size=int(rng.integers(1, m)), replace=False).tolist())
                       for m in dims["mlp_hidden"]]
    return spec


def counted_macs(model, size=32, batch=2):
    """MACs per image by torch's counter, with the explicit (unfused) attention so that it is counted."""
    model = copy.deepcopy(model).float()
    for m in model.modules():
        if isinstance(m, (EvaAttention, AttentionRope)):
            m.fused_attn = False
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(batch, 3, size, size))
    return counter.get_total_flops() / 2 / batch


# ------------------------------------------------------------------------------------------------
# which classes timm's eva02 names build, and building them here
# ------------------------------------------------------------------------------------------------

def test_eva02_names_build_what_is_tested():
    expect = {"eva02_tiny_patch14_224": (EvaAttention, GluMlp, True),
              "eva02_small_patch14_224": (EvaAttention, GluMlp, True),
              "eva02_base_patch14_224": (EvaAttention, SwiGLU, False),
              "eva02_large_patch14_224": (EvaAttention, SwiGLU, False),
              "eva02_base_patch16_clip_224": (EvaAttention, SwiGLU, False)}
    for name, (attn, mlp, fused) in expect.items():
        with torch.device("meta"):
            model = models.build_model(name, num_classes=10)
        blk = model.blocks[0]
        assert type(blk.attn) is attn and type(blk.mlp) is mlp and (blk.attn.qkv is not None) == fused, name
        assert (blk.attn.q_bias is not None) == fused                  # Ti / S: q_bias, v_bias on a fused qkv
        assert isinstance(blk.mlp.norm, torch.nn.LayerNorm) == (mlp is SwiGLU)  # B / L: scale_mlp
    assert not isinstance(model.blocks[0].attn.norm, torch.nn.Identity)  # the CLIP variant: scale_attn_inner


def test_build_model_accepts_eva02_and_refuses_others_in_one_line():
    model = models.build_model("eva02_tiny_patch14_224", num_classes=3, img_size=28, depth=1)
    assert isinstance(model, Eva) and model(torch.randn(1, 3, 28, 28)).shape == (1, 3)
    with pytest.raises(models.ModelError, match="is a ResNet, not a timm VisionTransformer"):
        models.build_model("resnet18")
    with torch.device("meta"), pytest.raises(models.ModelError, match="RotaryEmbeddingDinoV3 rotary embedding"):
        models.build_model("vit_small_patch16_dinov3")         # an Eva whose rope this tool does not slice
    with pytest.raises(models.ModelError, match="does not fit"):
        models.build_model("eva02_tiny_patch14_224", img_size=32)  # 14-pixel patches


# ------------------------------------------------------------------------------------------------
# MACs
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CONFIGS))
def test_eva_macs_equal_the_flop_counter(name):
    dense = make_eva(name, dtype=torch.float32)
    sliced = pruning.apply_spec(copy.deepcopy(dense), random_spec(dense, seed=3))
    for model in (dense, sliced):
        assert flops.model_macs(model)["macs"] == counted_macs(model)
        assert flops.model_macs(model)["params"] == sum(p.numel() for p in model.parameters())
    dims = pruning.model_dims(dense)
    assert dims["mlp_in_proj"] == (1 if name == "mlp" else 2)


@pytest.mark.parametrize("round_to", [1, 8])
def test_eva_policy_gmacs_equal_model_macs(round_to):
    dense = make_eva("b-l", dtype=torch.float32, depth=3)
    dims = pruning.model_dims(dense)
    X = np.random.default_rng(round_to).uniform(0, 0.9, size=(5, 2 * 3 + 1))
    X[:, -1] = 0.0                                          # EVA reduces no tokens
    X[0] = 0.0
    fast = flops.policy_gmacs(dims, X, round_to=round_to)
    for i, x in enumerate(X):
        ranks = {"heads": [list(range(h)) for h in dims["num_heads"]],
                 "neurons": [np.random.default_rng(i).permutation(m).tolist() for m in dims["mlp_hidden"]]}
        model = pruning.slice_model(dense, pruning.policy_from_vector(x, 3), ranks, round_to=round_to)
        assert fast[i] == flops.model_macs(model)["macs"] / 1e9
    # the original's convention counts every matrix of an EVA block too (blocks only, no patch embedding, head)
    orig = flops.model_macs(dense, convention="original")["macs"]
    assert orig == pytest.approx(flops.policy_gmacs(dims, X[0], convention="original") * 1e9, abs=1)


# ------------------------------------------------------------------------------------------------
# slicing against the dense model with the same components masked by hand
# ------------------------------------------------------------------------------------------------

def kept_layer_norm(x, norm, keep):
    """A LayerNorm over the kept channels only, zeros elsewhere: what a sliced inner norm computes."""
    out = torch.zeros_like(x)
    out[..., keep] = F.layer_norm(x[..., keep], (len(keep),), norm.weight[keep], norm.bias[keep], norm.eps)
    return out


def masked_reference(dense, spec):
    """A copy of ``dense`` whose dropped heads (the input of attn.proj) and neurons (the input of
    mlp.fc2) are zeroed, its inner norms normalising over the kept channels only."""
    ref = copy.deepcopy(dense)
    for b, blk in enumerate(ref.blocks):
        hd = blk.attn.head_dim
        chans = torch.tensor([h * hd + j for h in spec["heads"][b] for j in range(hd)])
        neurons = torch.tensor(spec["neurons"][b])
        for module, keep in ((blk.attn.proj, chans), (blk.mlp.fc2, neurons)):
            mask = torch.zeros(module.in_features, dtype=torch.float64)
            mask[keep] = 1
            module.register_forward_pre_hook(lambda m, a, mask=mask: (a[0] * mask,))
        for norm, keep in ((blk.attn.norm, chans), (blk.mlp.norm, neurons)):
            if isinstance(norm, torch.nn.LayerNorm):
                norm.register_forward_hook(lambda m, a, out, keep=keep: kept_layer_norm(a[0], m, keep))
    return ref


@pytest.mark.parametrize("name", list(CONFIGS))
def test_eva_slicing_equals_masked_dense(name):
    dense = make_eva(name)
    x = images()
    for seed in (0, 1):
        spec = random_spec(dense, seed)
        sliced = pruning.apply_spec(copy.deepcopy(dense), spec)
        torch.testing.assert_close(sliced(x), masked_reference(dense, spec)(x), rtol=1e-10, atol=1e-10)
        for b, blk in enumerate(sliced.blocks):
            attn, kept = blk.attn, len(spec["heads"][b])
            assert type(attn) is (AttentionRope if kept < dense.blocks[b].attn.num_heads else EvaAttention)
            assert attn.num_heads == kept and attn.proj.in_features == kept * attn.head_dim
            if isinstance(attn, AttentionRope):
                assert attn.attn_dim == attn.kv_dim == kept * attn.head_dim and attn.num_kv_heads == kept
            assert pruning.mlp_width(blk.mlp) == len(spec["neurons"][b])
        assert pruning.model_dims(sliced)["num_heads"] == [len(h) for h in spec["heads"]]
    full = pruning.apply_spec(copy.deepcopy(dense), pruning.full_spec(dense))   # keeping all changes nothing
    assert all(type(b.attn) is EvaAttention for b in full.blocks)
    torch.testing.assert_close(full(x), dense(x))


def test_eva_slicing_keeps_eva_attention_semantics():
    """A fused qkv with q_bias / v_bias becomes q/k/v projections with no k bias (as EvaAttention has),
    trainable like the originals; the rope is still applied (a sliced model with every head kept by
    a re-slice of AttentionRope equals the dense one)."""
    dense = make_eva("ti-s")
    spec = pruning.full_spec(dense)
    spec["heads"][0] = [1, 3]
    attn = pruning.apply_spec(copy.deepcopy(dense), spec).blocks[0].attn
    assert attn.qkv is None and attn.k_proj.bias is None and attn.q_proj.bias is not None
    hd, width = attn.head_dim, 4 * attn.head_dim
    rows = torch.cat([torch.arange(hd) + h * hd for h in (1, 3)])
    torch.testing.assert_close(attn.v_proj.weight, dense.blocks[0].attn.qkv.weight[2 * width:][rows])
    torch.testing.assert_close(attn.q_proj.bias, dense.blocks[0].attn.q_bias[rows])
    assert all(p.requires_grad and p.device.type == "cpu" for p in attn.parameters())
    dropped_rope = copy.deepcopy(dense)
    dropped_rope.rope = None                                   # the rope matters: without it the logits differ
    assert not torch.allclose(dropped_rope(images()), dense(images()))


# ------------------------------------------------------------------------------------------------
# the model file
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,kwargs", [("eva02_tiny_patch14_224", {"depth": 2}),
                                         ("eva02_base_patch14_224", {"depth": 2, "embed_dim": 64, "num_heads": 4})])
def test_eva_model_file_round_trip_gives_identical_logits(tmp_path, name, kwargs):
    dense = models.build_model(name, num_classes=10, img_size=28, **kwargs).eval()
    dims = pruning.model_dims(dense)
    rng = np.random.default_rng(0)
    ranks = {"heads": [rng.permutation(h).tolist() for h in dims["num_heads"]],
             "neurons": [rng.permutation(m).tolist() for m in dims["mlp_hidden"]]}
    sliced = pruning.slice_model(dense, {"head": [0.34, 0.5], "neuron": [0.3, 0.6], "token": 0.0}, ranks, round_to=8)
    arch = models.model_arch(name, sliced, 28, (0.5,) * 3, (0.5,) * 3, model_kwargs=kwargs)
    path = str(tmp_path / "eva.pth")
    models.save_model_file(path, sliced, arch)
    loaded, _ = models.load_model_file(path)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), sliced(x))
    assert loaded.prune_spec == sliced.prune_spec and json.loads(json.dumps(loaded.prune_spec)) == loaded.prune_spec
    assert list(loaded.state_dict()) == list(sliced.state_dict())
    assert flops.model_macs(loaded)["macs"] < flops.model_macs(dense)["macs"]


# ------------------------------------------------------------------------------------------------
# ranking
# ------------------------------------------------------------------------------------------------

def batches(n=1, batch=4, seed=2, size=32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=g, dtype=torch.float64),
             torch.randint(0, 10, (batch,), generator=g)) for _ in range(n)]


def taylor_reference(model, data, eps=1e-5):
    """mean over images of |dL_i / d scale_c| by central differences, one component at a time: its
    output (channels of attn.proj's / mlp.fc2's input) multiplied by 1 +- eps."""
    out = {"heads": [], "neurons": []}
    for blk in model.blocks:
        hd = blk.attn.head_dim
        for key, module, cols in (("heads", blk.attn.proj,
                                   [slice(h * hd, (h + 1) * hd) for h in range(blk.attn.num_heads)]),
                                  ("neurons", blk.mlp.fc2, [slice(j, j + 1) for j in range(module_width(blk.mlp))])):
            scores = torch.zeros(len(cols), dtype=torch.float64)
            for c, col in enumerate(cols):
                for x, y in data:
                    losses = []
                    for scale in (1 + eps, 1 - eps):
                        def hook(m, a, col=col, scale=scale):
                            z = a[0].clone()
                            z[..., col] = z[..., col] * scale
                            return (z,)
                        handle = module.register_forward_pre_hook(hook)
                        with torch.no_grad():
                            losses.append(F.cross_entropy(model(x), y, reduction="none"))
                        handle.remove()
                    scores[c] += ((losses[0] - losses[1]) / (2 * eps)).abs().sum()
            out[key].append(scores / sum(x.shape[0] for x, _ in data))
    return out


def module_width(mlp):
    return mlp.fc2.in_features


@pytest.mark.parametrize("name", ["ti-s", "b-l"])
def test_eva_taylor_scores_equal_finite_differences(name):
    model = make_eva(name, img_size=16, ref_feat_shape=(2, 2), embed_dim=16, depth=1, num_heads=4, mlp_ratio=1.0)
    data = batches(size=16)
    ours = dc.compute_scores(model, data, num_batches=1, criterion="taylor")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny forwards: one thread is faster on a busy CPU
    try:
        ref = taylor_reference(model, data)
    finally:
        torch.set_num_threads(threads)
    for key in ("heads", "neurons"):
        for a, b in zip(ours[key], ref[key]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("criterion", ["hsic", "magnitude", "random"])
def test_eva_other_criteria_rank_every_head_and_neuron(criterion):
    model = make_eva("b-l", dtype=torch.float32)
    dims = pruning.model_dims(model)
    ranks = dc.rank_model(model, [(x.float(), y) for x, y in batches(batch=6)], criterion=criterion, num_batches=1)
    assert [sorted(r) for r in ranks["heads"]] == [list(range(h)) for h in dims["num_heads"]]
    assert [sorted(r) for r in ranks["neurons"]] == [list(range(m)) for m in dims["mlp_hidden"]]
    if criterion == "magnitude":  # a SwiGLU neuron's in-weights are its fc1_g and fc1_x rows
        mlp = model.blocks[0].mlp
        w_in = torch.cat([mlp.fc1_g.weight, mlp.fc1_x.weight], dim=1).double().norm(dim=1)
        expect = w_in * mlp.fc2.weight.double().norm(dim=0)
        assert ranks["neurons"][0] == torch.sort(expect, stable=True).indices.tolist()


# ------------------------------------------------------------------------------------------------
# refusals
# ------------------------------------------------------------------------------------------------

def test_eva_token_reduction_is_refused_in_one_line():
    dense = make_eva()
    dims = pruning.model_dims(dense)
    ranks = {"heads": [list(range(h)) for h in dims["num_heads"]],
             "neurons": [list(range(m)) for m in dims["mlp_hidden"]]}
    spec = pruning.policy_to_spec(pruning.uniform_policy(2, head=0.25, token=0.3), ranks, dims)
    before = copy.deepcopy(dense.state_dict())
    with pytest.raises(pruning.SpecError, match="EVA models cannot reduce tokens") as err:
        pruning.apply_spec(dense, spec)
    assert "\n" not in str(err.value)
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in before.items())   # untouched
    flags = dict(head_pruning=False, neuron_pruning=False, token_pruning=False, token_sparsity=None)
    assert main.active_dims(types.SimpleNamespace(**flags), dense) == (True, True, False)   # the default: no tokens
    assert main.active_dims(types.SimpleNamespace(**flags)) == (True, True, True)
    for bad in ({"token_pruning": True}, {"token_sparsity": 0.3}):
        with pytest.raises(utils.UserError, match="EVA models cannot reduce tokens"):
            main.active_dims(types.SimpleNamespace(**dict(flags, **bad)), dense)


def test_eva_latency_table_and_torchscript_export_are_refused(tmp_path):
    dense = make_eva(dtype=torch.float32)
    with pytest.raises(latency.TableError, match="not measured for EVA models"):
        latency.measure_table(dense, "cpu", 2)
    with pytest.raises(latency.TableError, match="--search_flops or --search-reduction"):
        latency.obtain_table(dense, str(tmp_path / "t.json"), "cpu", 2)
    arch = models.model_arch("eva", dense, 32, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(export.ExportError, match="default dynamo exporter"):
        export.export_onnx(dense, tmp_path / "m.onnx", arch, exporter="torchscript")


# ------------------------------------------------------------------------------------------------
# slow: ONNX, and the CLI on a model file
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_compressed_eva_exports_to_onnx_and_pt2_verified(tmp_path):
    pytest.importorskip("onnxruntime")
    dense = models.build_model("eva02_base_patch14_224", num_classes=10, img_size=28, depth=1, embed_dim=64,
                               num_heads=4).eval()
    spec = pruning.full_spec(dense)
    spec["heads"], spec["neurons"] = [[0, 3]], [list(range(0, 170, 3))]
    sliced = pruning.apply_spec(dense, spec)
    arch = models.model_arch("eva02_base_patch14_224", sliced, 28, (0.5,) * 3, (0.5,) * 3)
    for suffix in (".onnx", ".pt2"):  # ONNX Runtime, and torch.export's program reloaded with torch.export.load
        meta = export.export_model(sliced, tmp_path / f"eva{suffix}", arch)
        assert meta["verification"]["max_abs_diff"] < 1e-4 and meta["verification"]["batch_sizes"] == [5, 1]
        assert meta["gmacs"] == flops.model_macs(sliced)["macs"] / 1e9
    # --throughput's figures measure it like any other model
    speed = engine.speed_report(sliced, torch.device("cpu"), 2, 28)
    assert speed["images_per_s"] > 0 and speed["batch1_ms"] > 0
    assert speed["params"] == flops.model_macs(sliced)["params"]


@pytest.mark.slow
def test_cli_prunes_an_eva_model_file_and_refuses_token_sparsity(tmp_path):
    kwargs = {"depth": 2}
    dense = models.build_model("eva02_tiny_patch14_224", num_classes=10, img_size=28, **kwargs)
    path = str(tmp_path / "dense.pth")
    models.save_model_file(path, dense, models.model_arch("eva02_tiny_patch14_224", dense, 28, (0.5,) * 3, (0.5,) * 3,
                                                          model_kwargs=kwargs))
    common = ["--batch-size", "32", "--num_workers", "0", "--log-every", "1000", "--resume", path, "--prune_finetune"]
    code, _, err = run_cli(common + ["--token_sparsity", "0.3", "--output_dir", tmp_path / "t"])
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: --token_pruning / --token_sparsity: EVA"), err
    code, _, err = run_cli(common + ["--head_sparsity", "0.34", "--neuron_sparsity", "0.5", "--finetune-epochs", "0",
                                     "--output_dir", tmp_path / "p"])
    assert code == 0, err
    model, arch, _ = models.load(str(tmp_path / "p" / "prune_finetune" / "compressed.pth"))
    assert pruning.model_dims(model)["num_heads"] == [2, 2] and arch["model_kwargs"] == kwargs
    assert model(torch.randn(2, 3, 28, 28)).shape == (2, 10)
