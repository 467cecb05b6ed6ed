"""Search mode end to end: budget feasibility, resume after a kill, 2 processes == 1 process."""
import json
import sys

import numpy as np
import pytest

from helpers import run_and_kill, FAST, run_cli, run_subprocess

pytestmark = pytest.mark.slow  # CLI runs, subprocesses or ONNX exports: out of the fast lane

PY = sys.executable
SEARCH = ["--search", "--search-reduction", "0.4", "--search_population", "4", "--search_epoch", "4",
          "--search-holdout", "60", "--criterion-batches", "2", "--search-pool", "500"]


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("dense")
    code, _, err = run_cli(FAST + ["--epochs", "3", "--max-steps", "15", "--output_dir", out])
    assert code == 0, err
    return out / "checkpoint.pth"


def _log(folder):
    return [json.loads(line) for line in (folder / "search" / "search_log.jsonl").read_text().splitlines()]


def test_every_evaluated_policy_meets_the_budget(dense_ckpt, tmp_path):
    import flops
    import models
    import pruning
    out = tmp_path / "s"
    code, _, err = run_cli(FAST + SEARCH + ["--resume", dense_ckpt, "--output_dir", out])
    assert code == 0, err
    log = _log(out)
    assert len(log) == 8 and [r["phase"] for r in log] == ["init"] * 4 + ["ei"] * 4
    dense, _ = models.load_model_file(str(dense_ckpt))
    dims = pruning.model_dims(dense)
    rankings = json.loads((out / "search" / "rankings.json").read_text())
    target = log[0]["search"]["target_gmacs"]
    round_to = json.loads((out / "search" / "best_policy.json").read_text())["round_to"]
    assert round_to == 8  # the default: neuron counts at multiples of 8
    assert target == pytest.approx(0.6 * flops.model_macs(dense)["macs"] / 1e9)
    for rec in log:
        spec = pruning.policy_to_spec(rec["policy"], rankings, dims, round_to=round_to)
        model, _ = models.load_model_file(str(dense_ckpt))
        pruning.apply_spec(model, spec)
        gmacs = flops.model_macs(model)["macs"] / 1e9
        assert gmacs == pytest.approx(rec["gmacs"], rel=1e-12)
        assert abs(gmacs - target) <= 0.02 * target
    best = json.loads((out / "search" / "best_policy.json").read_text())
    assert best["search_acc1"] == max(r["acc1"] for r in log)
    assert "hold-out of 60 training images" in best["split"]
    try:  # matplotlib is optional: the plot is written when it is installed, skipped otherwise
        import matplotlib  # noqa: F401
        has_matplotlib = True
    except ImportError:
        has_matplotlib = False
    assert (out / "search" / "search.png").exists() == has_matplotlib
    if not has_matplotlib:
        assert "matplotlib is not installed: no search plot" in err


def test_impossible_target_is_a_one_line_error(dense_ckpt, tmp_path):
    code, _, err = run_cli(FAST + ["--search", "--search_flops", "5.0", "--resume", dense_ckpt,
                                   "--output_dir", tmp_path])
    assert code == 2 and "outside the reachable range" in err and err.count("\n") == 1
    code, _, err = run_cli(FAST + ["--search", "--resume", dense_ckpt])
    assert code == 2 and "--search needs a budget" in err


def test_killed_search_resumes_to_the_same_log(dense_ckpt, tmp_path):
    args = FAST + SEARCH + ["--resume", str(dense_ckpt)]
    full = run_subprocess([PY, "main.py"] + args + ["--output_dir", tmp_path / "full"])
    assert full.returncode == 0, full.stderr[-3000:]
    out = tmp_path / "killed"
    log = out / "search" / "search_log.jsonl"
    assert run_and_kill(args + ["--output_dir", out], log, 5) < 8
    again = run_subprocess([PY, "main.py"] + args + ["--output_dir", out])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming after" in again.stderr
    a, b = _log(tmp_path / "full"), _log(out)
    assert [r["step"] for r in b] == list(range(8))
    for ra, rb in zip(a, b):
        np.testing.assert_allclose(ra["x"], rb["x"], rtol=0, atol=1e-12)
        assert ra["acc1"] == rb["acc1"]


def test_two_process_search_equals_one_process(dense_ckpt, tmp_path):
    import utils
    one = run_subprocess([PY, "main.py"] + FAST + SEARCH + ["--criterion-batches", "2", "--resume", dense_ckpt,
                                                            "--output_dir", tmp_path / "one"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_subprocess([PY, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                          f"--master_port={utils.free_port()}", "main.py"] + FAST + SEARCH +
                         ["--criterion-batches", "1", "--resume", dense_ckpt, "--output_dir", tmp_path / "two"])
    assert two.returncode == 0, two.stderr[-3000:]
    r1 = json.loads((tmp_path / "one" / "search" / "rankings.json").read_text())
    r2 = json.loads((tmp_path / "two" / "search" / "rankings.json").read_text())
    assert r1 == r2
    a, b = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert len(a) == len(b) == 8
    for ra, rb in zip(a, b):
        np.testing.assert_allclose(ra["x"], rb["x"], rtol=0, atol=1e-9)
        assert ra["acc1"] == pytest.approx(rb["acc1"], abs=1e-9)
        assert ra["gmacs"] == rb["gmacs"]
