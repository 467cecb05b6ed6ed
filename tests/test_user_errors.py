"""A new user's mistakes, each answered in one line before any work (findings of a first-use trial):
files that are not checkpoints, an export target of no known format or over the model file, a model whose
head the tool cannot count, a --round-to that would keep every neuron."""
import os
import pickle

import numpy as np
import pytest
import torch

import export
import flops
import models
import utils
from helpers import FAST, run_cli


def one_line_error(code, err, *patterns):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in err, err
    for pattern in patterns:
        assert pattern in lines[-1], lines[-1]
    return lines[-1]


UNSAFE_ADVICE = ("weights_only", "weights only", "trusted source", "unpickl", "Re-running")


class Opaque:
    """A class the weights-only reader refuses."""


def test_unreadable_files_say_what_they_are_not_and_never_advise_unpickling(tmp_path):
    garbage = tmp_path / "x.pth"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))  # random bytes named like a checkpoint
    plain = tmp_path / "plain.pth"  # a plain pickle (protocol 4) of primitives: refused by the weights-only reader
    with open(plain, "wb") as f:
        pickle.dump({"a": {1, 2}}, f, protocol=4)
    objects = tmp_path / "objects.pth"  # a torch file that pickles an arbitrary object
    torch.save({"model": {}, "thing": Opaque()}, objects)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    for path in (garbage, plain, objects, empty):
        with pytest.raises(utils.CheckpointError) as info:
            utils.load_checkpoint_file(str(path))
        text = str(info.value)
        assert "not a checkpoint or state dict this tool can read safely" in text, text
        assert len(text.splitlines()) == 1, text
        assert not any(a.lower() in text.lower() for a in UNSAFE_ADVICE), text
    with pytest.raises(utils.CheckpointError, match="pickled Python objects .*Opaque"):
        utils.load_checkpoint_file(str(objects))


def test_garbage_checkpoint_through_the_cli_is_one_safe_line(tmp_path):
    garbage = tmp_path / "x.pth"
    garbage.write_bytes(np.random.default_rng(1).bytes(3000))
    code, _, err = run_cli(["--eval", "--resume", garbage] + FAST)
    line = one_line_error(code, err, "x.pth is not a checkpoint or state dict this tool can read safely")
    assert not any(a.lower() in line.lower() for a in UNSAFE_ADVICE), line


@pytest.fixture(scope="module")
def pico_file(tmp_path_factory):
    model = models.build_model("vit_pico_patch8_32", num_classes=10)
    arch = models.model_arch("vit_pico_patch8_32", model, 32, (0.5,) * 3, (0.5,) * 3)
    path = tmp_path_factory.mktemp("pico") / "dense.pth"
    models.save_model_file(str(path), model, arch)
    return path


def test_export_target_of_no_format_or_over_the_model_file_is_refused_first(tmp_path, pico_file, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("the export started before its target was checked")
    monkeypatch.setattr(export, "export_onnx", no_work)
    monkeypatch.setattr(export, "export_pt2", no_work)
    code, _, err = run_cli(["--export", tmp_path / "model.json", "--resume", pico_file])  # its own metadata's name
    one_line_error(code, err, "model.json", ".onnx", ".pt2")
    assert not os.path.exists(tmp_path / "model.json")
    # the model file itself is not an export target either, whatever it is called
    model_file = tmp_path / "dense.pt2"
    model_file.write_bytes(pico_file.read_bytes())
    code, _, err = run_cli(["--export", model_file, "--resume", model_file])
    one_line_error(code, err, "would overwrite")
    assert utils.load_checkpoint_file(str(model_file))["arch"]["model"] == "vit_pico_patch8_32"


def test_each_exporter_refuses_another_suffix_before_exporting(tmp_path):
    model = models.build_model("vit_pico_patch8_32", num_classes=10).eval()
    arch = models.model_arch("vit_pico_patch8_32", model, 32, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(export.ExportError, match=r"m\.json: the suffix names the format, \.onnx .* or \.pt2"):
        export.export_onnx(model, str(tmp_path / "m.json"), arch)
    with pytest.raises(export.ExportError, match="export_pt2 writes .pt2 files"):
        export.export_pt2(model, str(tmp_path / "m.onnx"), arch)
    assert os.listdir(tmp_path) == []
    for name in ("m.onnx", "m.pt2"):  # the usual names pass
        export.check_export_target(str(tmp_path / name))


def test_unsupported_attention_pool_is_refused_in_one_line_before_pruning(tmp_path, monkeypatch):
    model = models.build_model("vit_pico_patch8_32", num_classes=10, global_pool="prr")  # 'map' is supported
    assert model.attn_pool is not None
    arch = models.model_arch("vit_pico_patch8_32", model, 32, (0.5,) * 3, (0.5,) * 3, {"global_pool": "prr"})
    path = tmp_path / "map.pth"
    models.save_model_file(str(path), model, arch)
    import dependency_criterion

    def no_ranking(*a, **k):
        raise AssertionError("ranked before the model was checked")
    monkeypatch.setattr(dependency_criterion, "rank_model", no_ranking)
    code, _, err = run_cli(FAST + ["--prune_finetune", "--resume", path, "--head_sparsity", "0.25",
                                   "--neuron_sparsity", "0.25", "--finetune-epochs", "0", "--output_dir",
                                   tmp_path / "out"])
    one_line_error(code, err, "AttentionPoolPrr", "global_pool='prr'")
    with pytest.raises(ValueError, match="AttentionPoolPrr"):
        flops.model_macs(model)  # a SpecError: a ValueError that main.cli prints as one line


def test_round_to_not_below_the_mlp_width_is_refused_before_work(tmp_path, pico_file, monkeypatch):
    import dependency_criterion

    def no_ranking(*a, **k):
        raise AssertionError("ranked before --round-to was checked")
    monkeypatch.setattr(dependency_criterion, "rank_model", no_ranking)
    assert models.build_model("vit_pico_patch8_32").blocks[0].mlp.fc1.out_features == 64
    for n in (128, 64):
        code, _, err = run_cli(FAST + ["--prune_finetune", "--resume", pico_file, "--neuron_sparsity", "0.25",
                                       "--round-to", n, "--finetune-epochs", "0", "--output_dir", tmp_path / "out"])
        one_line_error(code, err, f"--round-to {n}", "64 neurons", "below 64")
    model = models.build_model("vit_pico_patch8_32", num_classes=10)
    flops.check_compressible(model, 8)   # the default passes
    flops.check_compressible(model, 32)


def test_round_to_help_says_when_it_is_refused():
    import main
    parser = main.Parser("main.py", parents=[main.get_args_parser()])
    action = next(a for a in parser._actions if "--round-to" in a.option_strings)
    assert "refused" in action.help and "narrowest MLP" in action.help
