"""Deployment: ONNX export checked in ONNX Runtime against PyTorch, torch.export programs (.pt2) run
by a fresh interpreter without this repository, and torch.compile against eager.

Each exported file is run by a fresh ONNX Runtime session here (not only through
``export.verify_onnx``), at batch sizes 1 and 5 from the same file. Token-reduced exports are also
compared with the same weights WITHOUT token reduction, so a graph that silently skipped the
reduction would fail.
"""
import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer

import engine
import export
import flops
import models
import pruning
from pruning import apply_spec, model_dims, policy_to_spec, uniform_policy
from helpers import run_subprocess
from utils import UserError

pytestmark = pytest.mark.slow  # CLI runs, subprocesses or ONNX exports: out of the fast lane

ort = pytest.importorskip("onnxruntime")

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def tiny_vit(depth=4, distilled=False, **kw):
    """32 px, 16 patches of 8 px, 4 heads of 8 dims; larger random weights so heads and tokens matter."""
    cls = VisionTransformerDistilled if distilled else VisionTransformer
    model = cls(img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=4, mlp_ratio=2.0,
                num_classes=7, **kw)
    g = torch.Generator().manual_seed(depth)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.05 if "norm" in name else 0.2))
    return model.eval()


def compress(model, head=0.0, neuron=0.0, token=0.0, fuse="mean", seed=0):
    dims = model_dims(model)
    rng = np.random.default_rng(seed)
    rankings = {"heads": [rng.permutation(h).tolist() for h in dims["num_heads"]],
                "neurons": [rng.permutation(m).tolist() for m in dims["mlp_hidden"]]}
    policy = uniform_policy(dims["depth"], head=head, neuron=neuron, token=token)
    return apply_spec(model, policy_to_spec(policy, rankings, dims, fuse=fuse))


def images(batch, seed=1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def without_token_reduction(model):
    """The same weights with every reducing block turned back into a plain timm Block."""
    plain = copy.deepcopy(model)
    for blk in plain.blocks:
        if isinstance(blk, pruning.TokenReducingBlock):
            pruning.restore_block(blk)
    return plain


def arch_of(model, name="tiny"):
    return models.model_arch(name, model, 32, MEAN, STD)


def ort_logits(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x.numpy()})[0]


CASES = {
    "dense": lambda: tiny_vit(),
    "heads+neurons": lambda: compress(tiny_vit(), head=0.5, neuron=0.4),
    "tokens-mean": lambda: compress(tiny_vit(), head=0.25, neuron=0.3, token=0.3, fuse="mean"),
    "tokens-weighted": lambda: compress(tiny_vit(), head=0.25, neuron=0.3, token=0.3, fuse="weighted"),
    "distilled": lambda: compress(tiny_vit(distilled=True), head=0.25, neuron=0.3, token=0.3),
    "layerscale": lambda: compress(tiny_vit(init_values=0.5), head=0.25, neuron=0.3, token=0.3, fuse="weighted"),
    "depth6": lambda: compress(tiny_vit(depth=6), head=0.5, neuron=0.5, token=0.25),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """exported(case) -> (model, path, returned metadata); each case is exported once per module.
    The model is handed over in TRAINING mode: export must neither change its mode nor its weights."""
    done = {}

    def export_case(case):
        if case not in done:
            model = CASES[case]().train()
            before = {k: v.clone() for k, v in model.state_dict().items()}
            path = tmp_path_factory.mktemp(case.replace("+", "_")) / "model.onnx"
            meta = export.export_onnx(model, path, arch_of(model, case), crop_ratio=0.9)
            assert model.training
            assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
            done[case] = (model.eval(), path, meta)
        return done[case]
    return export_case


@pytest.mark.parametrize("case", list(CASES))
def test_export_matches_pytorch_at_batch_1_and_5(case, exported):
    model, path, meta = exported(case)
    assert meta["verification"]["max_abs_diff"] <= 1e-4 and meta["verification"]["top1_agreement"] == 1.0
    assert meta["verification"]["batch_sizes"] == [5, 1]

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, out.name) == ("input", "logits")
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 32, 32]      # symbolic batch axis
    x = images(5)
    with torch.no_grad():
        ref = model(x).numpy()
    for batch in (5, 1):
        got = ort_logits(path, x[:batch])
        assert got.shape == (batch, 7)
        assert np.abs(got - ref[:batch]).max() <= 1e-4
        assert (got.argmax(1) == ref[:batch].argmax(1)).all()
    if model_dims(model)["token_reduction"]:  # the reduction is in the graph, not skipped
        with torch.no_grad():
            plain = without_token_reduction(model)(x).numpy()
        assert np.abs(plain - ref).max() > 1e-2
    if case == "distilled":  # DeiT's eval output: the mean of the class and distillation heads
        with torch.no_grad():
            feats = model.forward_features(x)
            mean_heads = ((model.head(feats[:, 0]) + model.head_dist(feats[:, 1])) / 2).numpy()
        assert np.abs(ort_logits(path, x) - mean_heads).max() <= 1e-4
        assert "mean of the class and distillation heads" in meta["output"]["meaning"]


def test_metadata_json_has_what_a_deployer_needs(exported):
    model, path, meta = exported("depth6")
    assert meta["json_path"] == str(path.parent / "model.json")
    with open(meta["json_path"]) as f:
        saved = json.load(f)
    cost = flops.model_macs(model)
    assert saved["onnx"] == "model.onnx" and saved["model"] == "depth6"
    assert saved["mean"] == MEAN and saved["std"] == STD
    assert saved["input_size"] == [3, 32, 32] and saved["num_classes"] == 7
    assert saved["interpolation"] == "bicubic" and saved["crop_ratio"] == 0.9
    assert saved["resize_shorter_side"] == 35                 # int(32 / 0.9)
    assert saved["gmacs"] == cost["macs"] / 1e9 and saved["params"] == cost["params"]
    assert saved["prune_spec"] == model.prune_spec and saved["prune_spec"]["tokens"]["blocks"] == [1, 3, 4]
    assert saved["input"]["name"] == "input" and saved["output"]["name"] == "logits"
    assert saved["opset"] >= 17 and saved["exporter"] == export.DEFAULT_ONNX_EXPORTER
    assert saved["verification"]["max_abs_diff"] <= 1e-4
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.json", "model.onnx"]   # nothing partial


def test_export_with_given_images_and_the_other_exporter(tmp_path):
    """Real images instead of random ones, and the exporter that is not the default."""
    other = [e for e in export.ONNX_EXPORTERS if e != export.DEFAULT_ONNX_EXPORTER][0]
    model = compress(tiny_vit(), head=0.25, neuron=0.3, token=0.3, fuse="weighted")
    x = images(3, seed=7)
    meta = export.export_onnx(model, tmp_path / "m.onnx", arch_of(model), sample=x, exporter=other)
    assert meta["exporter"] == other and meta["verification"]["images"] == 3
    assert meta["verification"]["sample"] == "given images"
    with torch.no_grad():
        assert np.abs(ort_logits(tmp_path / "m.onnx", x) - model(x).numpy()).max() <= 1e-4


class CustomBlock(Block):
    """A user's block whose forward could hold data-dependent control flow."""


def test_unsupported_block_is_one_line_error_naming_it(tmp_path):
    model = tiny_vit()
    model.blocks[2].__class__ = CustomBlock
    path = tmp_path / "m.onnx"
    with pytest.raises(export.ExportError, match=r"block 2: CustomBlock is not supported") as err:
        export.export_onnx(model, path, arch_of(model))
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)
    assert not path.exists() and not (tmp_path / "m.json").exists()


def test_other_refusals_are_one_line(tmp_path):
    model = tiny_vit()
    with pytest.raises(export.ExportError, match="only timm VisionTransformer"):
        export.export_onnx(torch.nn.Linear(3, 3), tmp_path / "a.onnx", arch_of(model))
    with pytest.raises(export.ExportError, match="expects 32x32 images but its file says input_size 64"):
        export.export_onnx(model, tmp_path / "b.onnx", models.model_arch("tiny", model, 64, MEAN, STD))
    with pytest.raises(export.ExportError, match=r"verification images have shape \(2, 3, 16, 16\)"):
        export.export_onnx(model, tmp_path / "c.onnx", arch_of(model), sample=torch.zeros(2, 3, 16, 16))
    with pytest.raises(export.ExportError, match="opset 16 is too old"):
        export.export_onnx(model, tmp_path / "d.onnx", arch_of(model), opset=16)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "folder").mkdir()
    for folder in (tmp_path / "folder", f"{tmp_path}/new/"):  # an existing folder, a path ending in '/'
        with pytest.raises(export.ExportError, match="is a folder; name the file to write"):
            export.export_onnx(model, folder, arch_of(model))
    assert list(tmp_path.iterdir()) == [tmp_path / "folder"] and not any((tmp_path / "folder").iterdir())


def test_only_export_needs_onnxruntime(tmp_path):
    """Without ONNX Runtime installed, training and evaluation still run; export says what to install."""
    code = ("import sys\nsys.modules['onnxruntime'] = None  # as if not installed\nimport main\n"
            f"print('exit', main.cli(['--model', 'vit_pico_patch8_32', '--epochs', '1', '--max-steps', '1', "
            f"'--batch-size', '16', '--output_dir', {str(tmp_path)!r}]))\n"
            f"print('exit', main.cli(['--export', {str(tmp_path / 'm.onnx')!r}, '--resume', "
            f"{str(tmp_path / 'checkpoint.pth')!r}]))")
    res = run_subprocess([sys.executable, "-c", code])
    assert res.stdout.split() [-4:] == ["exit", "0", "exit", "2"], res.stdout + res.stderr
    assert "Traceback" not in res.stderr and "pip install onnxruntime" in res.stderr.strip().splitlines()[-1]


def test_verify_fails_when_the_file_is_not_this_model(exported):
    model, path, _ = exported("tokens-mean")
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.head.bias.add_(0.01)                 # a small, real difference in every logit
    with pytest.raises(export.ExportError, match=r"ONNX Runtime and PyTorch differ by 0\.01") as err:
        export.verify_onnx(path, other, images(4))
    assert "\n" not in str(err.value)
    assert export.verify_onnx(path, model, images(4))["max_abs_diff"] <= 1e-4


# ------------------------------------------------------------------------------------------------
# torch.export (.pt2)
# ------------------------------------------------------------------------------------------------

# run by a fresh, isolated interpreter (-I: no script folder, PYTHONPATH or user site on sys.path)
LOAD_PT2 = """import json, os, sys, torch
program = torch.export.load(sys.argv[1]).module()
x = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    torch.save({b: program(x[:b]) for b in (3, 1)}, sys.argv[3])
print(json.dumps({"loaded": [m for m in ("models", "pruning", "export", "timm") if m in sys.modules],
                  "repo_on_path": any(os.path.exists(os.path.join(p or ".", "pruning.py")) for p in sys.path)}))
"""


def test_pt2_of_a_compressed_model_file_runs_with_torch_alone(tmp_path):
    """`main.py --export m.pt2` on a token-reducing compressed model file writes a torch.export
    program and the ONNX export's metadata JSON; a fresh interpreter without this repository loads it
    with torch.export.load and gives the model file's logits at batches 3 and 1 (the program was
    traced at 2 and verified at 8 and 1: the batch is dynamic)."""
    from helpers import run_cli
    model = compress(models.build_model("vit_pico_patch8_32", num_classes=10), head=0.25, neuron=0.3, token=0.3)
    assert model_dims(model)["token_reduction"]
    model_file = tmp_path / "compressed.pth"
    models.save_model_file(str(model_file), model, models.model_arch("vit_pico_patch8_32", model, 32, MEAN, STD))
    out = tmp_path / "deploy"
    code, stdout, err = run_cli(["--export", out / "m.pt2", "--resume", model_file])
    assert code == 0, err
    line = json.loads(stdout.strip().splitlines()[-1])
    assert line["pt2"] == str(out / "m.pt2") and line["sample"] == "given images" and line["max_abs_diff"] <= 1e-4
    assert sorted(p.name for p in out.iterdir()) == ["m.json", "m.pt2"]          # nothing partial
    meta = json.loads((out / "m.json").read_text())
    assert meta["pt2"] == "m.pt2" and meta["mean"] == MEAN and meta["std"] == STD
    assert meta["input_size"] == [3, 32, 32] and meta["crop_ratio"] == 0.875 and meta["resize_shorter_side"] == 36
    assert meta["prune_spec"] == model.prune_spec and meta["verification"]["batch_sizes"] == [8, 1]

    x = images(3, seed=5)
    torch.save(x, tmp_path / "x.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-I", "-c", LOAD_PT2, str(out / "m.pt2"), "x.pt", "logits.pt"],
                         cwd=tmp_path, env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {"loaded": [], "repo_on_path": False}
    got = torch.load(tmp_path / "logits.pt", weights_only=True)
    loaded, _, _ = models.load(str(model_file))
    with torch.no_grad():
        ref = loaded(x)
    for batch in (3, 1):
        assert got[batch].shape == (batch, 10)
        torch.testing.assert_close(got[batch], ref[:batch], atol=1e-4, rtol=0)

    with torch.no_grad():
        loaded.head.bias.add_(0.01)                 # verification fails when the file is not this model
    with pytest.raises(export.ExportError, match=r"the loaded torch.export program and the model differ by 0\.01"):
        export.verify_pt2(out / "m.pt2", loaded, x)


# ------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------

def test_compile_needs_a_cpp_compiler(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(UserError, match="needs a C\\+\\+ compiler and 'no-such-compiler-xyz'"):
        engine.compile_model(tiny_vit(), torch.device("cpu"))




def test_documented_preprocess_equals_the_evaluation_transform():
    """docs/deploy.md's stand-alone preprocessing (from the metadata JSON alone) gives this project's
    evaluation input: resize the shorter side, center-crop, normalise."""
    import re
    import types

    from PIL import Image

    import datasets
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "deploy.md")) as f:
        code = re.search(r"```python\n(def preprocess\(img, meta\):.*?)```", f.read(), re.S).group(1)
    scope = {"np": np, "Image": Image}
    exec(code, scope)
    meta = {"input_size": [3, 32, 32], "resize_shorter_side": int(32 / 0.875), "mean": MEAN, "std": STD}
    transform = datasets.build_transform(False, types.SimpleNamespace(input_size=32, eval_crop_ratio=0.875), MEAN, STD)
    rng = np.random.default_rng(0)
    for hw in [(61, 47), (47, 61), (36, 36), (100, 37)]:
        img = Image.fromarray(rng.integers(0, 256, hw + (3,), dtype=np.uint8))
        got = scope["preprocess"](img, meta)
        assert got.dtype == np.float32 and got.shape == (1, 3, 32, 32)
        np.testing.assert_allclose(got, transform(img)[None].numpy(), atol=1e-5)


@pytest.mark.slow
def test_export_and_compiled_throughput_through_the_cli(tmp_path):
    """`main.py --export` on a compressed model file verifies on real digits images;
    `--throughput --compile` measures the compiled model."""
    from helpers import FAST, run_cli
    code, _, err = run_cli(FAST + ["--epochs", "1", "--max-steps", "2", "--output_dir", tmp_path / "d"])
    assert code == 0, err
    code, _, err = run_cli(FAST + ["--prune_finetune", "--resume", tmp_path / "d" / "checkpoint.pth",
                                   "--head_sparsity", "0.5", "--token_sparsity", "0.2", "--finetune-epochs", "0",
                                   "--output_dir", tmp_path / "d"])
    assert code == 0, err
    compressed = tmp_path / "d" / "prune_finetune" / "compressed.pth"
    code, out, err = run_cli(["--export", tmp_path / "m.onnx", "--resume", compressed])
    assert code == 0, err
    line = json.loads(out.strip().splitlines()[-1])
    assert line["sample"] == "given images" and line["max_abs_diff"] <= 1e-4 and line["top1_agreement"] == 1.0
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["prune_spec"]["tokens"] is not None and meta["input_size"] == [3, 32, 32]
    # batch 1 only: one shape, one inductor compile (a second batch size would compile again)
    code, out, err = run_cli(["--throughput", "--compile", "--throughput-batch", "1", "--resume", compressed])
    assert code == 0, err
    measured = json.loads(out.strip().splitlines()[-1])
    assert measured["compiled"] is True and measured["images_per_s"] > 0
    code, _, err = run_cli(["--export", tmp_path / "x.onnx"])
    assert code == 2 and "--resume FILE" in err
