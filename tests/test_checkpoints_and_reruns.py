"""Through the CLI: every checkpoint format a user holds, another input size, reruns and resumed
runs, bad flags and files answered in one line, --help without heavy imports."""
import argparse
import json

import pytest
import torch

import flags
import flops
import models
import pruning
import utils
from helpers import FAST, PY, make_image_folder, run_cli, run_subprocess

TINY = FAST + ["--max-steps", "3", "--epochs", "1"]
SEARCH = ["--search_epoch", "1", "--search_population", "2", "--criterion-batches", "1"]


def one_line_error(code, err, pattern):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) >= 1 and lines[-1].startswith("error: ") and "Traceback" not in err, err
    assert pattern in lines[-1], lines[-1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imnet"), per_class=(12, 4), size=40)


@pytest.fixture(scope="module")
def pico_dense(tmp_path_factory):
    """A dense pico model trained for a few steps on digits (this tool's training checkpoint)."""
    out = tmp_path_factory.mktemp("dense")
    code, _, err = run_cli(TINY + ["--output_dir", out])
    assert code == 0, err
    return str(out / "checkpoint.pth")


# ----------------------------------------------------------------------------- bug 1: input size

@pytest.mark.slow
def test_model_trained_at_48px_evaluates_searches_and_prunes_without_repeating_flags(tmp_path):
    out = tmp_path / "d48"
    code, _, err = run_cli(TINY + ["--input-size", "48", "--output_dir", out])
    assert code == 0, err
    ckpt = out / "checkpoint.pth"
    bare = ["--batch-size", "32", "--log-every", "1000"]  # no --model, no --input-size
    code, stdout, err = run_cli(bare + ["--eval", "--resume", ckpt])
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["n"] == 360
    code, _, err = run_cli(bare + ["--eval", "--search", "--resume", ckpt, "--search-reduction", "0.3",
                                   "--output_dir", tmp_path / "s"] + SEARCH)
    assert code == 0, err
    best = json.load(open(tmp_path / "s" / "search" / "best_policy.json"))
    assert best["input_size"] == [48, 48] and best["dense"] == "vit_pico_patch8_32"
    code, _, err = run_cli(bare + ["--prune_finetune", "--resume", ckpt, "--head_sparsity", "0.25",
                                   "--finetune-epochs", "0", "--output_dir", tmp_path / "p"])
    assert code == 0, err
    model, arch, _ = models.load(str(tmp_path / "p" / "prune_finetune" / "compressed.pth"))
    assert arch["input_size"] == 48 and model(torch.randn(2, 3, 48, 48)).shape == (2, 10)
    # an explicit, different --input-size is refused in one line rather than silently changed
    code, _, err = run_cli(bare + ["--eval", "--resume", ckpt, "--input-size", "32"])
    one_line_error(code, err, "input_size 48")


# ----------------------------------------------------------------------------- bug 4: checkpoint formats

def _deit_main_checkpoint(state, path, model_name, input_size):
    """What DeiT's main.py saves: an argparse.Namespace under 'args' (pickled)."""
    args = argparse.Namespace(model=model_name, input_size=input_size, nb_classes=3, lr=5e-4, data_set="IMNET")
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {"last_epoch": 3},
                "epoch": 3, "scaler": {}, "args": args}, path)


def _timm_train_checkpoint(state, path, model_name, input_size):
    args = argparse.Namespace(model=model_name, img_size=input_size, num_classes=3)
    torch.save({"epoch": 3, "arch": model_name, "state_dict": {"module." + k: v for k, v in state.items()},
                "optimizer": {}, "version": 2, "args": args, "metric": 50.0}, path)


FORMATS = {
    "deit_main": ("ckpt.pth", _deit_main_checkpoint, False),
    "timm_train": ("ckpt.pth.tar", _timm_train_checkpoint, False),
    "deit_release": ("release.pth", lambda s, p, n, i: torch.save({"model": s}, p), True),
    "safetensors": ("model.safetensors", None, True),
    "state_dict": ("sd.pth", lambda s, p, n, i: torch.save(s, p), True),
}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_checkpoint_format_evaluates_and_searches(fmt, folder, tmp_path):
    name, write, needs_model = FORMATS[fmt]
    torch.manual_seed(0)
    model = models.build_model("vit_pico_patch8_32", num_classes=3)
    path = str(tmp_path / name)
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    else:
        write(model.state_dict(), path, "vit_pico_patch8_32", 32)
    base = FAST + ["--data-path", folder, "--input-size", "32"] if needs_model else \
        ["--batch-size", "32", "--log-every", "1000", "--data-path", folder]
    code, stdout, err = run_cli(base + ["--eval", "--resume", path])
    assert code == 0, err
    ref = _accuracy(model, folder)
    assert abs(json.loads(stdout.strip().splitlines()[-1])["acc1"] - ref) < 1e-6
    code, _, err = run_cli(base + ["--output_dir", tmp_path / "logs", "--resume", path, "--eval", "--search",
                                   "--search-reduction", "0.3"] + SEARCH)
    assert code == 0, err
    assert json.load(open(tmp_path / "logs" / "search" / "best_policy.json"))["evaluations"] == 3


def _accuracy(model, folder):
    import datasets
    cfg = datasets.DataConfig(data_set="IMNET", data_path=str(folder), input_size=32, batch_size=8)
    val = datasets.build_loaders(cfg, False, train=False)["val"]
    import engine
    return engine.evaluate(val, model, torch.device("cpu"))["acc1"]


def test_bad_checkpoint_files_are_one_line_errors(tmp_path, folder):
    good = tmp_path / "good.pth"
    torch.save({"model": models.build_model("vit_pico_patch8_32", num_classes=3).state_dict()}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:500])
    other = tmp_path / "other.pth"
    torch.save({"model": models.build_model("vit_nano_patch4_32", num_classes=3).state_dict()}, other)
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": torch.nn.Linear(2, 2)}, pickled)
    base = FAST + ["--data-path", folder, "--eval", "--resume"]
    for path, pattern in ((truncated, "corrupt"), (tmp_path, "is a folder"), (other, "does not match"),
                          (pickled, "pickled Python objects")):
        code, _, err = run_cli(base + [path])
        one_line_error(code, err, pattern)


def test_namespace_in_checkpoint_is_allow_listed_not_unpickled(tmp_path):
    path = tmp_path / "deit.pth"
    torch.save({"model": {}, "args": argparse.Namespace(model="deit_tiny_patch16_224", input_size=224)}, path)
    ckpt = utils.load_checkpoint_file(str(path))
    assert ckpt["args"] == {"model": "deit_tiny_patch16_224", "input_size": 224}
    torch.save({"args": argparse.Namespace(hook=torch.nn.ReLU())}, path)  # anything else inside is refused
    with pytest.raises(utils.CheckpointError, match="pickled"):
        utils.load_checkpoint_file(str(path))


def test_head_of_another_size_says_how_to_proceed(pico_dense, folder):
    code, _, err = run_cli(FAST + ["--data-path", folder, "--eval", "--resume", pico_dense])
    one_line_error(code, err, f"--finetune {pico_dense}")


def test_finetune_from_this_tools_files_needs_no_model_flag(pico_dense, folder, tmp_path):
    """The hint above works for a dense and for a compressed file: --finetune reads the model (and
    a compressed model's shape) from the file, with a new head for the folder's 3 classes."""
    small = tmp_path / "small"
    code, _, err = run_cli(FAST + ["--prune_finetune", "--resume", pico_dense, "--head_sparsity", "0.5",
                                   "--finetune-epochs", "0", "--output_dir", small])
    assert code == 0, err
    compressed = small / "prune_finetune" / "compressed.pth"
    code, _, err = run_cli(FAST + ["--data-path", folder, "--eval", "--resume", compressed])
    one_line_error(code, err, f"--finetune {compressed}")
    spec = models.load(str(compressed))[1]["prune_spec"]
    for start, expected_spec in ((pico_dense, None), (compressed, spec)):
        out = tmp_path / ("from_" + str(start).split("/")[-1].split(".")[0])
        code, _, err = run_cli(["--batch-size", "8", "--log-every", "1000", "--data-path", folder, "--epochs", "1",
                                "--max-steps", "2", "--finetune", start, "--output_dir", out])
        assert code == 0, err
        _, arch, _ = models.load(str(out / "checkpoint.pth"))
        assert (arch["model"], arch["input_size"], arch["num_classes"]) == ("vit_pico_patch8_32", 32, 3)
        assert arch["prune_spec"] == expected_spec


# ----------------------------------------------------------------------------- bugs 3, 5, 6

@pytest.mark.slow
def test_prune_uses_the_searched_rankings_and_refuses_a_changed_run(pico_dense, tmp_path):
    out = tmp_path / "logs"
    code, _, err = run_cli(FAST + ["--output_dir", out, "--resume", pico_dense, "--eval", "--search",
                                   "--search-reduction", "0.4"] + SEARCH)
    assert code == 0, err
    best = json.load(open(out / "search" / "best_policy.json"))
    # another batch size ranks other components; the searched policy must keep the searched ones
    code, _, err = run_cli(FAST[:-4] + ["--batch-size", "16", "--log-every", "1000", "--output_dir", out,
                                        "--resume", pico_dense, "--prune_finetune", "--finetune-epochs", "1",
                                        "--max-steps", "2"])
    assert code == 0, err
    _, arch, _ = models.load(str(out / "prune_finetune" / "compressed.pth"))
    dense, _, _ = models.load(pico_dense)
    expected = pruning.policy_to_spec(best["policy"], best["rankings"], pruning.model_dims(dense), round_to=8)
    assert arch["prune_spec"]["heads"] == expected["heads"]
    assert arch["prune_spec"]["neurons"] == expected["neurons"]
    # a changed ratio against the same output folder is refused, naming the difference
    code, _, err = run_cli(FAST + ["--output_dir", out, "--resume", pico_dense, "--prune_finetune",
                                   "--neuron_sparsity", "0.5", "--finetune-epochs", "2"])
    one_line_error(code, err, "policy.neuron")
    # ... and so is another search budget in the same folder
    code, _, err = run_cli(FAST + ["--output_dir", out, "--resume", pico_dense, "--eval", "--search",
                                   "--search-reduction", "0.5"] + SEARCH)
    one_line_error(code, err, "target_gmacs")


@pytest.mark.slow
def test_steps_follow_the_dense_weights_not_the_file_path(pico_dense, tmp_path):
    """A moved copy of the dense file continues its search and finetuning; a retrained dense model
    (same name, same path, other weights) is refused instead of silently reusing the old results."""
    import shutil
    out, moved = tmp_path / "logs", tmp_path / "moved" / "dense.pth"
    moved.parent.mkdir()
    shutil.copy(pico_dense, moved)
    search = FAST + ["--output_dir", out, "--eval", "--search", "--search-reduction", "0.4"] + SEARCH
    prune = FAST + ["--output_dir", out, "--prune_finetune", "--finetune-epochs", "1", "--max-steps", "2"]
    for dense in (pico_dense, moved):  # the second time: same weights elsewhere, so the same runs continue
        code, _, err = run_cli(search + ["--resume", dense])
        assert code == 0, err
        code, _, err = run_cli(prune + ["--resume", dense])
        assert code == 0, err
    assert len(utils.read_jsonl(str(out / "search" / "search_log.jsonl"))) == 3  # replayed, not searched again
    # another global batch (here --batch-size; under torchrun also the process count) scales the lr: refused
    code, _, err = run_cli(prune + ["--resume", moved, "--batch-size", "16"])
    one_line_error(code, err, "global_batch 32 -> 16")
    ckpt = torch.load(moved, map_location="cpu", weights_only=True)
    ckpt["model"]["head.bias"] = ckpt["model"]["head.bias"] + 0.5  # "retrained" in place
    torch.save(ckpt, moved)
    code, _, err = run_cli(search + ["--resume", moved])
    one_line_error(code, err, "dense_weights")
    code, _, err = run_cli(prune + ["--resume", moved])
    one_line_error(code, err, "dense_weights")


def test_eval_resume_auto_without_checkpoint_is_refused(tmp_path):
    code, _, err = run_cli(FAST + ["--eval", "--resume", "auto", "--output_dir", tmp_path])
    one_line_error(code, err, "found no checkpoint")


# ----------------------------------------------------------------------------- bug 7: flags

@pytest.mark.parametrize("extra,pattern", [
    (["--search-holdout", "abc"], "--search-holdout"),
    (["--search-holdout", "1.0"], "fraction"),
    (["--search_population", "0", "--search_epoch", "0"], "--search-population must be positive"),
    (["--criterion-batches", "0"], "--criterion-batches must be positive"),
    (["--search-pool", "0"], "--search-pool must be positive"),
    (["--search-tol", "1e-9"], "try a larger tolerance"),
    (["--finetune-epochs", "-1"], "--finetune-epochs must be >= 0"),
])
def test_search_and_prune_flags_are_one_line_errors(extra, pattern, pico_dense, tmp_path):
    code, _, err = run_cli(FAST + ["--eval", "--search", "--resume", pico_dense, "--search-reduction", "0.4",
                                   "--output_dir", tmp_path] + SEARCH + extra)
    one_line_error(code, err, pattern)


def test_model_and_recipe_flags_are_one_line_errors(tmp_path, folder):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    cases = [
        (FAST + ["--output_dir", not_a_dir], "is a file"),
        (["--model", "resnet18", "--epochs", "1"], "not a timm VisionTransformer"),
        (FAST + ["--data-path", folder, "--batch-size", "3", "--mixup", "0.8"], "even --batch-size"),
    ]
    for argv, pattern in cases:
        code, _, err = run_cli(argv)
        one_line_error(code, err, pattern)


@pytest.mark.slow
def test_batch_size_one_search_and_prune_without_finetuning(pico_dense, tmp_path):
    code, _, err = run_cli(["--model", "vit_pico_patch8_32", "--batch-size", "1", "--log-every", "100000",
                            "--eval", "--search", "--resume", pico_dense, "--search-reduction", "0.3",
                            "--search-holdout", "40", "--output_dir", tmp_path] + SEARCH)
    assert code == 0, err
    code, _, err = run_cli(FAST + ["--prune_finetune", "--resume", pico_dense, "--head_sparsity", "0.5",
                                   "--finetune-epochs", "0", "--output_dir", tmp_path])
    assert code == 0, err
    result = json.load(open(tmp_path / "prune_finetune" / "result.json"))
    assert result["finetune_epochs"] == 0 and result["acc1"] == result["acc1_before_finetune"]


def test_flops_cli_one_line_errors(tmp_path, capsys):
    model = models.build_model("vit_pico_patch8_32", num_classes=10, global_pool="prr")  # a pool flops.py refuses
    arch = models.model_arch("vit_pico_patch8_32", model, 32, (0.5,) * 3, (0.5,) * 3, {"global_pool": "prr"})
    path = tmp_path / "map.pth"
    models.save_model_file(str(path), model, arch)
    for argv, pattern in ((["--resume", str(path)], "AttentionPoolPrr"), (["--model", "resnet18"], "ResNet"),
                          (["--resume", str(tmp_path / "none.pth")], "not found")):
        assert flops.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and pattern in err and len(err.splitlines()) == 1, err


def test_help_and_flag_errors_load_no_heavy_library():
    """--help and a bad flag answer before torch, timm and scikit-learn are imported, and the
    library checks its arguments against the choices flags.py defines (the same objects, not copies)."""
    import datasets
    import dependency_criterion as dc
    import engine
    assert set(flags.DATA_SETS) == set(datasets.DATA_SETS) | {"CIFAR"}  # CIFAR: CIFAR100, as in DeiT
    assert (dc.CRITERIA, dc.KERNELS, dc.MAGNITUDES, dc.BANDWIDTHS) == (flags.CRITERIA, flags.KERNELS, flags.MAGNITUDES,
                                                                       flags.BANDWIDTHS)
    assert engine.SEARCH_OBJECTIVES is flags.SEARCH_OBJECTIVES and flops.CONVENTIONS is flags.CONVENTIONS
    assert pruning.FUSE_MODES is flags.FUSE_MODES and dc.CRITERIA is flags.CRITERIA
    code = ("import sys, main\nfor argv in (['--help'], ['--criterion', 'nope']):\n"
            "    try:\n        print('exit', main.cli(argv))\n"
            "    except SystemExit as e:\n        print('exit', e.code)\n"
            "print('loaded', sorted(m for m in ('torch', 'timm', 'sklearn', 'torchvision') if m in sys.modules))\n"
            "import flops\nprint('flops imports models:', 'models' in sys.modules)")  # counting needs no loader
    res = run_subprocess([PY, "-c", code])
    assert res.returncode == 0, res.stderr
    assert "--search-objective {acc,loss,kl}" in res.stdout
    assert res.stderr.startswith("error: --criterion invalid choice: 'nope'") and res.stderr.count("\n") == 1
    assert res.stdout.strip().splitlines()[-4:] == ["exit 0", "exit 2", "loaded []", "flops imports models: False"], \
        res.stdout[-300:]


def test_default_criterion_is_taylor_and_the_paper_setting_ranks_with_hsic():
    import main
    parse = argparse.ArgumentParser(parents=[main.get_args_parser()]).parse_args
    assert flags.settle(parse([]))[0].criterion == "taylor"
    assert flags.settle(parse(["--hsic-kernel", "original"]))[0].criterion == "hsic"
    assert flags.settle(parse(["--criterion", "hsic"]))[0].criterion == "hsic"
    with pytest.raises(utils.UserError, match="does not apply to --criterion magnitude"):
        flags.settle(parse(["--criterion", "magnitude", "--hsic-kernel", "original"]))


# ----------------------------------------------------------------------------- teachers

@pytest.mark.slow
def test_non_vit_teacher_and_vit_teacher_at_another_size(tmp_path, pico_dense):
    import timm
    teacher = timm.create_model("regnety_002", num_classes=10)
    torch.save(teacher.state_dict(), tmp_path / "regnety.pth")
    code, _, err = run_cli(TINY + ["--distillation-type", "hard", "--teacher-model", "regnety_002",
                                   "--teacher-path", tmp_path / "regnety.pth", "--output_dir", tmp_path / "a"])
    assert code == 0, err
    ckpt = utils.load_checkpoint_file(str(tmp_path / "a" / "checkpoint.pth"))
    assert ckpt["recipe"]["distillation"] == "hard"
    # a ViT teacher file trained at 32 px, student at 48 px: the teacher sees its own size
    code, _, err = run_cli(TINY + ["--input-size", "48", "--distillation-type", "soft", "--teacher-path",
                                   pico_dense, "--output_dir", tmp_path / "b"])
    assert code == 0, err
    t = models.build_teacher("unused", pico_dense, 10, 48)
    assert isinstance(t, models.ResizeInput) and t(torch.randn(2, 3, 48, 48)).shape == (2, 10)


# ----------------------------------------------------------------------------- bug 8 and logs

def test_unreadable_validation_image_is_not_counted(tmp_path, pico_dense):
    root = make_image_folder(tmp_path / "data", classes=[str(i) for i in range(10)], per_class=(2, 2), size=32)
    (tmp_path / "data" / "val" / "0" / "0.png").write_bytes(b"not a png")
    code, stdout, err = run_cli(["--batch-size", "8", "--num_workers", "0", "--data-path", root, "--eval",
                                 "--resume", pico_dense])
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["n"] == 19  # 20 images, one unreadable


def test_restarted_training_starts_a_new_log(tmp_path):
    out = tmp_path / "run"
    assert run_cli(TINY[:-2] + ["--epochs", "2", "--output_dir", out])[0] == 0
    assert run_cli(TINY + ["--output_dir", out])[0] == 0  # a fresh run in the same folder
    epochs = [r["epoch"] for r in utils.read_jsonl(str(out / "log.jsonl"))]
    assert epochs == [0]
    # ... and the run it replaced is kept beside it, not overwritten
    assert [r["epoch"] for r in utils.read_jsonl(str(out / "log.previous.jsonl"))] == [0, 1]
    assert torch.load(out / "checkpoint.previous.pth", weights_only=True)["epoch"] == 1


# ----------------------------------------------------------------------------- bug 2: torchrun rerun

@pytest.mark.slow
def test_finished_pipeline_rerun_under_torchrun_redoes_nothing(tmp_path):
    out = tmp_path / "pipe"
    argv = TINY + SEARCH + ["--pipeline", "--pipeline-reductions", "0.4", "--finetune-epochs", "1",
                            "--output_dir", out, "--throughput-batch", "8"]
    code, _, err = run_cli(argv)
    assert code == 0, err
    files = [out / "dense" / "log.jsonl", out / "reduce40" / "search" / "search_log.jsonl",
             out / "reduce40" / "prune_finetune" / "log.jsonl", out / "reduce40" / "prune_finetune" / "compressed.pth"]
    before = [(f.stat().st_mtime_ns, f.read_bytes()) for f in files]
    # two processes at half the batch: the same global batch, so the same runs (another global batch
    # scales the finetuning lr, and each step refuses it as another run)
    res = run_subprocess([PY, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={utils.free_port()}", "main.py"] + argv + ["--batch-size", "16"],
                         timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "using the finished search" in res.stderr and "using the finished prune+finetune" in res.stderr
    assert [(f.stat().st_mtime_ns, f.read_bytes()) for f in files] == before


def test_resume_restores_the_log_line_a_kill_lost(tmp_path):
    out = tmp_path / "run"
    assert run_cli(TINY[:-2] + ["--epochs", "2", "--output_dir", out])[0] == 0
    log = out / "log.jsonl"
    lines = log.read_text().splitlines()
    log.write_text(lines[0] + "\n")  # killed after epoch 1's checkpoint, before its log line
    assert run_cli(TINY[:-2] + ["--epochs", "3", "--output_dir", out, "--resume", "auto"])[0] == 0
    records = utils.read_jsonl(str(log))
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert json.dumps(records[1]) == lines[1]


def test_longer_training_rebuilds_the_schedule(tmp_path):
    """--epochs 4 --resume auto after a 2-epoch run trains epochs 2-3 on a 4-epoch schedule; the
    restored 2-epoch schedule kept the minimum lr (1e-5) for every added epoch."""
    out = tmp_path / "run"
    assert run_cli(TINY[:-2] + ["--epochs", "2", "--output_dir", out])[0] == 0
    code, _, err = run_cli(TINY[:-2] + ["--epochs", "4", "--output_dir", out, "--resume", "auto"])
    assert code == 0, err
    records = utils.read_jsonl(str(out / "log.jsonl"))
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    assert records[2]["train_lr"] > 10 * 1e-5 and records[3]["train_lr"] < records[2]["train_lr"], records


def test_interrupt_says_how_each_mode_continues(monkeypatch, tmp_path):
    """Ctrl-C: training continues with --resume auto; search, prune+finetune and the pipeline
    continue by rerunning the same command (their folders hold the log and checkpoint)."""
    import main

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(main, "settle", interrupted)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["--epochs", "1"])
    assert code == 130 and err == "interrupted before the first epoch finished\n", err  # no checkpoint yet
    monkeypatch.setenv("RANK", "1")
    assert run_cli(["--epochs", "1"])[::2] == (130, "")  # rank 0 alone says it, not every process
    monkeypatch.setenv("RANK", "0")
    open("checkpoint.pth", "w").close()
    for argv, hint in ((["--epochs", "1", "--output_dir", "."], "rerun with --resume auto"),
                       (["--eval", "--search"], "rerun the same command"),
                       (["--prune_finetune"], "rerun the same command"),
                       (["--pipeline"], "rerun the same command"),
                       (["--eval"], None)):
        code, _, err = run_cli(argv)
        assert code == 130 and err.startswith("interrupted") and err.count("\n") == 1, err
        assert (hint in err) if hint else ("rerun" not in err), err
