"""The seed README's three commands in a row, prune+finetune resume, the one-command pipeline."""
import json
import shutil
import sys

import pytest
import torch

from helpers import run_and_kill, FAST, ROOT, make_image_folder, run_cli, run_subprocess

pytestmark = pytest.mark.slow  # CLI runs, subprocesses or ONNX exports: out of the fast lane

PY = sys.executable


def _launch(args):
    import utils
    return run_subprocess([PY, "-m", "torch.distributed.launch", "--nproc_per_node=2", "--use_env",
                           f"--master_port={utils.free_port()}", "main.py"] + args, timeout=400)


@pytest.fixture(scope="module")
def seed_pretrained(tmp_path_factory):
    """The seed README's pretrain line under torch.distributed.launch (2 processes), once for the
    tests of its two other lines: (image folder, the pretrain run's folder)."""
    root = tmp_path_factory.mktemp("seed")
    data = make_image_folder(str(root / "imagenet"), classes=("n01", "n02", "n03"), per_class=(16, 4))
    logs = root / "logs"
    res = _launch(_seed_common(data, logs) + ["--epochs", "2"])
    assert res.returncode == 0, res.stderr[-3000:]
    return data, logs


def _seed_common(data, logs):
    return ["--model", "vit_pico_patch8_32", "--batch-size", "4", "--data-path", data, "--output_dir", logs,
            "--dist-eval", "--input-size", "32", "--num_workers", "0"]


def _dense_copy(seed_pretrained, tmp_path):
    """A run folder of its own holding the pretrained model as the seed's ./logs/deit_small.pth."""
    logs = tmp_path / "logs"
    logs.mkdir()
    shutil.copy(seed_pretrained[1] / "checkpoint.pth", logs / "deit_small.pth")
    return seed_pretrained[0], logs


def test_seed_pretrain_command_trains_the_deit_recipe(seed_pretrained):
    """Two epochs logged once each (rank 0 alone writes), every val image counted once across the
    2 processes (--dist-eval), the DeiT recipe of an image data set (model EMA on)."""
    logs = seed_pretrained[1]
    log = [json.loads(line) for line in (logs / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1] and all(r["test_n"] == 12 for r in log)
    ckpt = torch.load(logs / "checkpoint.pth", weights_only=True)
    assert ckpt["args"]["data_set"] == "IMNET" and ckpt["model_ema"] is not None


def test_seed_commands_end_to_end(seed_pretrained, tmp_path):
    import flops
    data, logs = _dense_copy(seed_pretrained, tmp_path)
    common = _seed_common(data, logs)
    dense_gmacs = flops.model_macs(__import__("models").load_model_file(str(logs / "deit_small.pth"))[0])["macs"] / 1e9
    target = round(dense_gmacs * 0.6, 6)
    res = _launch(common + ["--resume", logs / "deit_small.pth", "--eval", "--search", "--search_epoch", "3",
                            "--search_flops", str(target), "--search_population", "3"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert (logs / "search" / "best_policy.json").exists()
    res = _launch(common + ["--resume", logs / "deit_small.pth", "--neuron_pruning", "--head_pruning",
                            "--token_pruning", "--prune_finetune", "--finetune-epochs", "1"])
    assert res.returncode == 0, res.stderr[-3000:]
    final = logs / "prune_finetune" / "compressed.pth"
    assert final.exists()

    # the compressed file meets the budget and reloads in a fresh process with identical outputs
    import models
    model, ckpt = models.load_model_file(str(final))
    gmacs = flops.model_macs(model)["macs"] / 1e9
    assert abs(gmacs - target) <= 0.02 * target
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same thread count as the fresh process: bitwise-equal sums
    try:
        with torch.no_grad():
            ours = model(x)
    finally:
        torch.set_num_threads(threads)
    torch.save(x, tmp_path / "x.pt")
    script = ("import sys, torch; sys.path.insert(0, %r); import models; "
              "m, _ = models.load_model_file(%r); x = torch.load(%r); "
              "torch.save(m(x).detach(), %r)" % (ROOT, str(final), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")))
    res = run_subprocess([PY, "-c", script])
    assert res.returncode == 0, res.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "y.pt"), ours)

    # evaluating the compressed file through the CLI works too
    code, out, err = run_cli(["--eval", "--resume", final, "--data-path", data, "--input-size", "32",
                              "--num_workers", "0", "--batch-size", "4"])
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["n"] == 12


def test_uniform_ratios_and_finetune_resume(tmp_path):
    code, _, err = run_cli(FAST + ["--epochs", "1", "--max-steps", "5", "--output_dir", tmp_path / "dense"])
    assert code == 0, err
    dense = tmp_path / "dense" / "checkpoint.pth"
    args = FAST + ["--prune_finetune", "--resume", str(dense), "--head_sparsity", "0.5", "--neuron_sparsity", "0.5",
                   "--finetune-epochs", "4", "--max-steps", "12"]
    full = run_subprocess([PY, "main.py"] + args + ["--output_dir", tmp_path / "full"])
    assert full.returncode == 0, full.stderr[-3000:]

    out = tmp_path / "killed"
    log = out / "prune_finetune" / "log.jsonl"
    done = run_and_kill(args + ["--output_dir", out], log, 1)
    again = run_subprocess([PY, "main.py"] + args + ["--output_dir", out])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "continuing the compressed model" in again.stderr and f"at epoch {done}" in again.stderr
    a = json.loads((tmp_path / "full" / "prune_finetune" / "result.json").read_text())
    b = json.loads((out / "prune_finetune" / "result.json").read_text())
    assert a["gmacs"] == b["gmacs"] and a["acc1"] == pytest.approx(b["acc1"])
    assert a["acc1_before_finetune"] == b["acc1_before_finetune"]  # the pruned model's, not the resumed one's
    sa = torch.load(tmp_path / "full" / "prune_finetune" / "compressed.pth", weights_only=True)
    sb = torch.load(out / "prune_finetune" / "compressed.pth", weights_only=True)
    assert sa["arch"]["prune_spec"] == sb["arch"]["prune_spec"]
    for k, v in sa["model"].items():
        torch.testing.assert_close(sb["model"][k], v, rtol=1e-5, atol=1e-6)


def test_missing_policy_is_a_one_line_error(tmp_path):
    code, _, err = run_cli(FAST + ["--epochs", "1", "--max-steps", "2", "--output_dir", tmp_path])
    assert code == 0, err
    code, _, err = run_cli(FAST + ["--prune_finetune", "--resume", tmp_path / "checkpoint.pth",
                                   "--output_dir", tmp_path])
    assert code == 2 and "no pruning policy" in err and "run --search first" in err


def test_pipeline_smoke(tmp_path):
    code, out, err = run_cli(FAST + ["--pipeline", "--epochs", "1", "--max-steps", "4", "--search_population", "3",
                                     "--search_epoch", "2", "--finetune-epochs", "1", "--search-holdout", "50",
                                     "--pipeline-reductions", "0.4,0.6", "--output_dir", tmp_path])
    assert code == 0, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["model"] for r in summary["rows"]] == ["dense", "-40% GMACs", "-60% GMACs"]
    dense = summary["rows"][0]["gmacs"]
    for row, r in zip(summary["rows"][1:], (0.4, 0.6)):
        assert abs(row["gmacs"] - dense * (1 - r)) <= 0.02 * dense * (1 - r)
    assert "| dense |" in out
    # a longer pretraining changes the dense weights: the finished searches no longer belong to it
    code, out, err = run_cli(FAST + ["--pipeline", "--epochs", "2", "--max-steps", "4", "--search_population", "3",
                                     "--search_epoch", "2", "--finetune-epochs", "1", "--search-holdout", "50",
                                     "--pipeline-reductions", "0.4,0.6", "--output_dir", tmp_path])
    assert code == 2 and "holds another search run (dense_weights" in err and "reduce40" in err, err


@pytest.mark.slow
def test_seed_commands_in_the_papers_setting(seed_pretrained, tmp_path):
    """The seed's three command lines verbatim plus the paper-setting options, 2 processes."""
    import flops
    import models
    data, logs = _dense_copy(seed_pretrained, tmp_path)
    common = _seed_common(data, logs)
    paper = ["--hsic-kernel", "original", "--flops-convention", "original", "--search-on-val"]
    dense, _ = models.load_model_file(str(logs / "deit_small.pth"))
    target = round(0.6 * flops.model_macs(dense, convention="original")["macs"] / 1e9, 6)
    res = _launch(common + paper + ["--resume", logs / "deit_small.pth", "--eval", "--search", "--search_epoch", "2",
                                    "--search_flops", str(target), "--search_population", "2"])
    assert res.returncode == 0, res.stderr[-3000:]
    best = json.loads((logs / "search" / "best_policy.json").read_text())
    assert best["flops_convention"] == "original" and abs(best["budget_gmacs"] - target) <= 0.02 * target
    res = _launch(common + paper + ["--resume", logs / "deit_small.pth", "--neuron_pruning", "--head_pruning",
                                    "--token_pruning", "--prune_finetune", "--recipe", "paper",
                                    "--finetune-epochs", "1"])
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = torch.load(logs / "prune_finetune" / "checkpoint.pth", weights_only=True)
    assert ckpt["recipe"]["distillation"] == "none" and ckpt["recipe"]["mixup"] == 0.8
    assert ckpt["arch"]["prune_spec"]["policy"]["rounding"] == "original"
