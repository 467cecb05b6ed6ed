"""Hugging Face folders as one more model file (issue 23): a ViTForImageClassification,
DeiTForImageClassification or DeiTForImageClassificationWithTeacher folder loads as the timm
VisionTransformer that gives transformers' own logits; any other kind is refused in one line.

transformers is the reference here and a test-only dependency: the tool reads the folders with json
and safetensors / torch.load alone, and never imports it.
"""
import ast
import json
import os

import pytest
import torch
import transformers

import models
import utils
from helpers import FAST, PY, ROOT, run_cli, run_subprocess

# 10 labels at 32 px: the embedded digits data set's shape
TINY = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96, image_size=32,
            patch_size=8, num_labels=10)
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def hf_model(kind, seed=0, **config):
    """A transformers ``kind`` model of the TINY config (updated by ``config``), in eval mode, with
    weights far from its initialisation (so that a mixed-up mapping shows in the logits)."""
    config_class = transformers.DeiTConfig if kind.startswith("DeiT") else transformers.ViTConfig
    torch.manual_seed(seed)
    model = getattr(transformers, kind)(config_class(**dict(TINY, **config))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(0.3 * torch.randn_like(p) + (1.0 if "layernorm" in name and name.endswith("weight") else 0.0))
    return model


def logits_of(model, x):
    with torch.no_grad():
        out = model(pixel_values=x) if isinstance(model, transformers.PreTrainedModel) else model(x)
    return out.logits if hasattr(out, "logits") else out


def assert_same_logits(hf, folder, channels=3):
    x = torch.randn(4, channels, 32, 32)
    model, arch, ckpt = models.load(str(folder))
    ref, got = logits_of(hf, x), logits_of(model, x)
    assert ref.abs().max() > 0.5  # not a trivially small output
    assert (ref - got).abs().max() < 1e-4
    return model, arch, ckpt, x


CASES = {  # kind, config, what the folder holds beside config.json and the weights
    "vit": ("ViTForImageClassification",
            dict(qkv_bias=False, layer_norm_eps=1e-2, intermediate_size=100,
                 id2label=dict(enumerate(DIGIT_NAMES)), label2id={n: i for i, n in enumerate(DIGIT_NAMES)}),
            "preprocessor"),
    "deit": ("DeiTForImageClassification", dict(num_hidden_layers=3), None),
    "deit_with_teacher": ("DeiTForImageClassificationWithTeacher", dict(num_channels=1), None),
    "vit_gelu_new": ("ViTForImageClassification", dict(hidden_act="gelu_new"), None),  # tanh GELU
    "deit_quick_gelu": ("DeiTForImageClassification", dict(hidden_act="quick_gelu"), None),
}
TIMM_ACTS = {"gelu": "GELU", "gelu_new": "GELUTanh", "quick_gelu": "QuickGELU"}


@pytest.mark.parametrize("case", CASES)
def test_hugging_face_folder_gives_transformers_logits_and_reloads_as_a_model_file(case, tmp_path):
    kind, config, extra = CASES[case]
    hf = hf_model(kind, **config)
    folder = tmp_path / case
    hf.save_pretrained(folder)
    if extra == "preprocessor":
        transformers.ViTImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6]).save_pretrained(folder)
    channels = config.get("num_channels", 3)
    model, arch, ckpt, x = assert_same_logits(hf, folder, channels)
    info = models.inspect_checkpoint(ckpt, str(folder))
    assert info["format"] == f"Hugging Face {kind} folder" and not info["training"]
    assert (arch["model"], arch["input_size"], arch["num_classes"]) == (models.CUSTOM_MODEL, 32, 10)
    assert (info["model"], info["input_size"], info["num_classes"]) == (models.CUSTOM_MODEL, 32, 10)
    assert arch["prune_spec"] is None and not model.training
    kwargs = arch["model_kwargs"]
    assert (kwargs["embed_dim"], kwargs["depth"], kwargs["num_heads"], kwargs["in_chans"]) == (
        48, config.get("num_hidden_layers", 2), 3, channels)
    assert [blk.mlp.fc1.out_features for blk in model.blocks] == [config.get("intermediate_size", 96)] * kwargs["depth"]
    assert model.blocks[0].norm1.eps == config.get("layer_norm_eps", 1e-12)
    assert (model.blocks[0].attn.qkv.bias is not None) == config.get("qkv_bias", True)
    assert type(model.blocks[0].mlp.act).__name__ == TIMM_ACTS[config.get("hidden_act", "gelu")]
    if kind == "DeiTForImageClassificationWithTeacher":
        assert hasattr(model, "head_dist") and model.num_prefix_tokens == 2
    elif kind == "DeiTForImageClassification":
        assert model.num_reg_tokens == 1 and not hasattr(model, "head_dist")
    if extra == "preprocessor":
        assert arch["mean"] == [0.1, 0.2, 0.3] and arch["std"] == [0.4, 0.5, 0.6]
        assert arch["labels"] == DIGIT_NAMES
    else:
        assert arch["mean"] == arch["std"] == [0.5] * channels
        assert arch["labels"] == [f"LABEL_{i}" for i in range(10)]
    json.dumps(arch)  # primitives only
    # saved as this tool's model file, it rebuilds itself without the folder
    models.save_model_file(str(tmp_path / "model.pth"), model, arch)
    again, arch2, _ = models.load(str(tmp_path / "model.pth"))
    assert arch2 == arch and torch.equal(logits_of(again, x), logits_of(model, x))


def test_pytorch_model_bin_sharded_safetensors_and_transformers_5_module_names(tmp_path):
    """pytorch_model.bin (read with weights_only=True), here holding the module names that
    transformers 5 uses in memory (layers.N.attention.q_proj ...), and a sharded safetensors folder."""
    hf = hf_model("ViTForImageClassification")
    plain = tmp_path / "bin"
    hf.config.architectures = ["ViTForImageClassification"]
    hf.config.save_pretrained(plain)
    torch.save(hf.state_dict(), plain / "pytorch_model.bin")
    assert not (plain / "model.safetensors").exists()
    assert_same_logits(hf, plain)
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="60KB")
    assert any(f.name.endswith(".index.json") for f in sharded.iterdir())
    assert_same_logits(hf, sharded)


def refusal(path):
    with pytest.raises(utils.CheckpointError) as e:
        models.load(str(path))
    assert "\n" not in str(e.value)
    return str(e.value)


def test_other_kinds_and_options_the_conversion_cannot_reproduce_are_refused_in_one_line(tmp_path):
    supported = "ViTForImageClassification, DeiTForImageClassification, DeiTForImageClassificationWithTeacher"
    mae = tmp_path / "mae"
    transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(
        hidden_size=48, num_hidden_layers=1, num_attention_heads=3, intermediate_size=96, image_size=32, patch_size=8,
        decoder_hidden_size=24, decoder_num_hidden_layers=1, decoder_num_attention_heads=3,
        decoder_intermediate_size=48)).save_pretrained(mae)
    assert f"Hugging Face ViTMAEForPreTraining model; this tool reads {supported}" in refusal(mae)
    swin = tmp_path / "swin"
    transformers.SwinConfig(architectures=["SwinForImageClassification"]).save_pretrained(swin)
    assert "SwinForImageClassification" in refusal(swin)
    relu = tmp_path / "relu"
    hf_model("ViTForImageClassification", hidden_act="relu").save_pretrained(relu)
    assert "hidden_act 'relu' is not reproduced" in refusal(relu)
    # weights and config.json that disagree: a block too many or too few
    for layers, message in ((1, "weights that its config.json has no place for"), (3, "lacks the weight")):
        wrong = tmp_path / f"layers{layers}"
        hf_model("DeiTForImageClassification").save_pretrained(wrong)
        config = json.load(open(wrong / "config.json"))
        json.dump(dict(config, num_hidden_layers=layers), open(wrong / "config.json", "w"))
        assert message in refusal(wrong)
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pth").write_bytes(b"")
    assert f"did you mean {run / 'checkpoint.pth'}" in refusal(run)
    # on the command line: one line, before any data is read
    code, _, err = run_cli(FAST[2:] + ["--eval", "--resume", mae])
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err and lines[-1].startswith("error: ") and supported in lines[-1], err
    # the file's architecture name is no model to build from scratch
    with pytest.raises(models.ModelError, match="a model file defines"):
        models.build_model(models.CUSTOM_MODEL, num_classes=10)


def test_no_module_of_the_tool_imports_transformers():
    tool = [f for f in os.listdir(ROOT) if f.endswith(".py")]
    assert "models.py" in tool and "main.py" in tool
    for name in tool:
        tree = ast.parse(open(os.path.join(ROOT, name)).read())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "transformers" for n in names), f"{name} line {node.lineno}"


@pytest.mark.slow
def test_the_tool_reads_hugging_face_folders_without_transformers(tmp_path):
    """Every module of the tool imports, and a folder loads, with transformers made unimportable
    (a fresh interpreter: torch and timm take most of its time)."""
    folder = tmp_path / "deit"
    hf_model("DeiTForImageClassificationWithTeacher").save_pretrained(folder)
    code = ("import sys; sys.modules['transformers'] = None\n"  # any import of it raises ImportError
            "import datasets, dependency_criterion, engine, expected_improvement, flops, latency, main, models, "
            "plots, pruning, utils\n"
            f"model, arch, _ = models.load({str(folder)!r})\n"
            "assert sys.modules['transformers'] is None and arch['model_kwargs']['distilled']\n"
            "print('ok', type(model).__name__)")
    res = run_subprocess([PY, "-c", code], timeout=120)
    assert res.returncode == 0 and "ok VisionTransformerDistilled" in res.stdout, res.stderr[-2000:]


@pytest.mark.slow
def test_seed_commands_start_from_a_hugging_face_folder(tmp_path):
    """--eval, --search and --prune_finetune with --resume FOLDER, and training with --finetune FOLDER,
    on the digits data (10 classes, 32 px); the compressed file keeps the labels."""
    folder = tmp_path / "hf"
    hf_model("DeiTForImageClassification", id2label=dict(enumerate(DIGIT_NAMES)),
             label2id={n: i for i, n in enumerate(DIGIT_NAMES)}).save_pretrained(folder)
    bare = FAST[2:]  # no --model: the folder says what it holds
    code, stdout, err = run_cli(bare + ["--eval", "--resume", folder])
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["n"] == 360
    out = tmp_path / "logs"
    code, _, err = run_cli(bare + ["--resume", folder, "--output_dir", out, "--eval", "--search", "--search-reduction",
                                   "0.3", "--search_epoch", "1", "--search_population", "2",
                                   "--criterion-batches", "1"])
    assert code == 0, err
    assert json.load(open(out / "search" / "best_policy.json"))["dense"] == models.CUSTOM_MODEL
    code, _, err = run_cli(bare + ["--resume", folder, "--output_dir", out, "--prune_finetune",
                                   "--finetune-epochs", "1", "--max-steps", "1"])
    assert code == 0, err
    small, arch, _ = models.load(str(out / "prune_finetune" / "compressed.pth"))
    assert arch["prune_spec"] and arch["labels"] == DIGIT_NAMES and arch["model_kwargs"]["reg_tokens"] == 1
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    code, _, err = run_cli(["--export", out / "small.onnx", "--resume", out / "prune_finetune" / "compressed.pth"])
    assert code == 0, err
    assert json.load(open(out / "small.json"))["labels"] == DIGIT_NAMES  # beside the file, for who deploys it
    code, _, err = run_cli(bare + ["--finetune", folder, "--epochs", "1", "--max-steps", "1",
                                   "--output_dir", tmp_path / "train"])
    assert code == 0, err
    trained, arch, _ = models.load(str(tmp_path / "train" / "checkpoint.pth"))
    assert arch["model_kwargs"] == models.read_model_file(folder)["arch"]["model_kwargs"]
    assert trained.num_reg_tokens == 1
