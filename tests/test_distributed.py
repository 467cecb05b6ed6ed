"""Multi-process runs on CPU (gloo): torchrun, torch.distributed.launch --use_env, kill + resume."""
import json
import sys

import pytest
import torch

from helpers import run_and_kill, FAST, run_subprocess

PY = sys.executable


def _last_json(stdout):
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def _torchrun(nproc, args, timeout=300):
    import utils
    cmd = [PY, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={utils.free_port()}", "main.py"] + list(args)
    return run_subprocess(cmd, timeout=timeout)


@pytest.mark.slow
def test_torchrun_trains_and_dist_eval_matches_one_process(tmp_path):
    out = tmp_path / "run"
    res = _torchrun(2, FAST + ["--epochs", "1", "--max-steps", "3", "--output_dir", out, "--dist-eval"])
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = out / "checkpoint.pth"
    assert ckpt.exists()
    one = run_subprocess([PY, "main.py"] + FAST + ["--eval", "--resume", ckpt])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun(2, FAST + ["--eval", "--resume", ckpt, "--dist-eval"])
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _last_json(one.stdout), _last_json(two.stdout)
    assert a["n"] == b["n"] == 360
    assert a["acc1"] == pytest.approx(b["acc1"], abs=1e-9)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_slurm_environment_is_understood():
    import utils
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}
    assert utils.distributed_env(env) == {"rank": 3, "world_size": 8, "local_rank": 1, "source": "slurm"}
    assert utils.distributed_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})["source"] == "torchrun"
    assert utils.distributed_env({}) is None
    assert utils.first_slurm_host("gpu[07-09,12],cpu1") == "gpu07"
    # 2 nodes x 4 GPUs (scripts/slurm_train.sbatch --nodes=2 --ntasks-per-node=4): the second task
    # of the second node is global rank 5 on GPU 1; every task meets at the first node
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    assert utils.distributed_env(env) == {"rank": 5, "world_size": 8, "local_rank": 1, "source": "slurm"}
    assert utils.first_slurm_host(env["SLURM_JOB_NODELIST"]) == "gpu07"


@pytest.mark.slow
def test_kill_and_resume_auto_matches_uninterrupted_run(tmp_path):
    args = FAST + ["--epochs", "4", "--max-steps", "12", "--model-ema", "--model-ema-decay", "0.9"]
    full = run_subprocess([PY, "main.py"] + args + ["--output_dir", tmp_path / "full"])
    assert full.returncode == 0, full.stderr[-3000:]

    out = tmp_path / "killed"
    log = out / "log.jsonl"
    done = run_and_kill(args + ["--output_dir", out], log, 1)
    assert done < 4
    res = run_subprocess([PY, "main.py"] + args + ["--output_dir", out, "--resume", "auto"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"at epoch {done}" in res.stderr  # resumed after the last finished epoch

    a = torch.load(tmp_path / "full" / "checkpoint.pth", weights_only=True)
    b = torch.load(out / "checkpoint.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    for key in ("model", "model_ema"):
        for name, value in a[key].items():
            torch.testing.assert_close(b[key][name], value, rtol=1e-5, atol=1e-6)
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    assert a["lr_scheduler"] == b["lr_scheduler"]
    la = [json.loads(line)["test_acc1"] for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(line)["test_acc1"] for line in log.read_text().splitlines()]
    assert la == pytest.approx(lb)
