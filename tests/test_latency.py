"""Latency tables: monotone, exact at grid points, predictions equal a per-block sum over the built
model, calibration, files and hashes; the speed-up budget of the search end to end."""
import json

import numpy as np
import pytest
import torch

import latency
import models
import pruning
from helpers import FAST, run_cli

# a made-up device: every unit costs a bilinear function of its shape, so interpolation is exact
# everywhere and a prediction can be checked against a direct computation on the built model
STEM, HEAD0, HEAD1 = 0.5, 0.05, 0.002


def attn_ms(h, n):
    return 0.1 + 0.01 * h * n + 0.003 * n


def reduce_ms(h, n):
    return attn_ms(h, n) + 0.2 + 0.001 * n


def mlp_ms(w, n):
    return 0.08 + 0.0004 * w * n + 0.002 * n


def direct_ms(model):
    """The made-up device's ms of a built (compressed) model: a walk over its live blocks."""
    dims = pruning.model_dims(model)
    n = dims["num_prefix_tokens"] + dims["num_patches"]
    total = STEM
    for blk in model.blocks:
        h, w = blk.attn.num_heads, blk.mlp.fc1.out_features
        if isinstance(blk, pruning.TokenReducingBlock) and blk.token_keep < n - blk.token_prefix:
            total += reduce_ms(h, n)
            n = blk.token_prefix + blk.token_keep + 1
        else:
            total += attn_ms(h, n)
        total += mlp_ms(w, n)
    return total + HEAD0 + HEAD1 * n


class FakeTimer:
    """``timer(items)`` of latency.measure_table on the made-up device; whole models cost
    ``scale * direct_ms + offset``; ``noise`` makes a unit measurement non-monotone."""

    def __init__(self, dense, scale=1.0, offset=0.0, noise=False, round_to=8):
        self.dense, self.scale, self.offset, self.noise, self.round_to = dense, scale, offset, noise, round_to

    def __call__(self, items):
        out = []
        for desc, _ in items:
            unit, n = desc["unit"], desc.get("tokens")
            if unit == "attn":
                ms = attn_ms(desc["heads"], n) - (0.05 if self.noise and n == 24 else 0.0)
            elif unit == "reduce":
                ms = reduce_ms(desc["heads"], n)
            elif unit == "mlp":
                ms = mlp_ms(desc["neurons"], n)
            elif unit == "stem":
                ms = STEM
            elif unit == "head":
                ms = HEAD0 + HEAD1 * n
            else:
                dims = pruning.model_dims(self.dense)
                ident = {"heads": [list(range(h)) for h in dims["num_heads"]],
                         "neurons": [list(range(m)) for m in dims["mlp_hidden"]]}
                model = pruning.slice_model(self.dense, pruning.policy_from_vector(desc["policy"], dims["depth"]),
                                            ident, self.round_to)
                ms = self.scale * direct_ms(model) + self.offset
            out.append(ms)
        return out


@pytest.fixture(scope="module")
def nano():
    return models.build_model("vit_nano_patch4_32").eval()


def fake_table(dense, **kw):
    return latency.measure_table(dense, "cpu", 8, token_points=4, width_points=4, calibration_models=4,
                                 timer=FakeTimer(dense, **kw))


def test_table_is_monotone_and_exact_at_grid_points(nano):
    table = fake_table(nano, noise=True)
    for part in ("attn", "reduce", "mlp"):
        ms = np.asarray(table[part]["ms"])
        assert np.all(np.diff(ms, axis=0) >= 0) and np.all(np.diff(ms, axis=1) >= 0), part
    assert np.all(np.diff(table["head"]["ms"]) >= 0)
    heads, tokens = table["attn"]["heads"], table["tokens"]
    for i, h in enumerate(heads):
        for j, n in enumerate(tokens):
            got = latency.interp2(heads, tokens, table["attn"]["ms"], h, n)
            assert got == pytest.approx(table["attn"]["ms"][i][j], abs=1e-12)
            if not (n == 24):  # the noisy point was lifted to its neighbour's value by the monotone pass
                assert got == pytest.approx(attn_ms(h, n), abs=1e-12)


def test_prediction_equals_the_built_models_per_block_sum(nano):
    table = fake_table(nano, scale=1.0, offset=0.0)
    dims = pruning.model_dims(nano)
    X = latency.random_policies(dims, 12, seed=3)
    X[0] = 0.0
    predicted = latency.predict_ms(table, dims, X, round_to=8)
    ident = {"heads": [list(range(h)) for h in dims["num_heads"]],
             "neurons": [list(range(m)) for m in dims["mlp_hidden"]]}
    for x, p in zip(X, predicted):
        model = pruning.slice_model(nano, pruning.policy_from_vector(x, dims["depth"]), ident, 8)
        assert p == pytest.approx(direct_ms(model), rel=1e-9)
    assert latency.predict_ms(table, dims, X[3], round_to=8) == pytest.approx(predicted[3])   # one vector works too


def test_calibration_recovers_scale_and_offset(nano):
    table = fake_table(nano, scale=1.3, offset=0.7)
    cal = table["calibration"]
    assert cal["scale"] == pytest.approx(1.3, rel=1e-6) and cal["offset"] == pytest.approx(0.7, abs=1e-6)
    assert cal["error_after"]["max"] < 1e-9 < cal["error_before"]["median"]


def test_files_hash_and_model_check(nano, tmp_path):
    table = fake_table(nano)
    path = tmp_path / "t.json"
    latency.save_table(table, path)
    # read back as written, noting the file it lies in (outside the hash, not written into the file)
    assert latency.load_table(path) == dict(table, file=str(path)) and "file" not in json.loads(path.read_text())
    latency.save_table(latency.load_table(path), path)
    assert latency.load_table(path) == dict(table, file=str(path))
    edited = dict(table, stem_ms=0.0)
    path.write_text(json.dumps(edited))
    with pytest.raises(latency.TableError, match="edited after it was measured"):
        latency.load_table(path)
    other = pruning.model_dims(models.build_model("vit_pico_patch8_32"))
    with pytest.raises(latency.TableError, match="measured for another model"):
        latency.check_table(table, other)


def test_a_real_table_on_this_cpu(nano):
    """The real timer on a coarse grid: positive, monotone, predictions positive and finite."""
    table = latency.measure_table(nano, "cpu", 4, token_points=3, width_points=2, calibration_models=2)
    assert table["key"]["device"] == "cpu" and table["key"]["batch"] == 4 and table["key"]["threads"] >= 1
    assert all(np.all(np.diff(table[p]["ms"], axis=1) >= 0) for p in ("attn", "reduce", "mlp"))
    dims = pruning.model_dims(nano)
    pred = latency.predict_ms(table, dims, latency.random_policies(dims, 5), round_to=8)
    assert np.all(np.isfinite(pred)) and np.all(pred > 0)
    assert latency.table_hash(table) == table["sha256"]


# ---------------------------------------------------------------------------- the search's speed-up budget

@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("dense")
    code, _, err = run_cli(FAST + ["--epochs", "1", "--max-steps", "4", "--output_dir", out])
    assert code == 0, err
    return out / "checkpoint.pth"


def table_file(dense_ckpt, path, **kw):
    dense = models.load(str(dense_ckpt))[0]
    latency.save_table(latency.measure_table(dense, "cpu", 32, token_points=4, width_points=4, calibration_models=3,
                                             timer=FakeTimer(dense, **kw)), path)
    return path


SEARCH = ["--search", "--search_population", "3", "--search_epoch", "1", "--search-holdout", "40",
          "--criterion-batches", "1", "--search-pool", "200", "--search-tol", "0.05"]


@pytest.mark.slow
def test_speedup_search_keeps_the_predicted_budget_and_measures_the_result(dense_ckpt, tmp_path):
    table = table_file(dense_ckpt, tmp_path / "table.json")
    out = tmp_path / "s"
    code, _, err = run_cli(FAST + SEARCH + ["--search-speedup", "1.5", "--latency-table", table, "--resume", dense_ckpt,
                                            "--output_dir", out])
    assert code == 0, err
    best = json.loads((out / "search" / "best_policy.json").read_text())
    log = [json.loads(line) for line in (out / "search" / "search_log.jsonl").read_text().splitlines()]
    target = best["target_ms"]
    assert target == pytest.approx(best["dense_predicted_ms"] / 1.5)
    assert all(abs(r["predicted_ms"] - target) <= 0.05 * target for r in log)
    assert best["latency_table"]["sha256"] == json.loads(table.read_text())["sha256"]
    assert best["measured_ms"] > 0 and best["measured_speedup"] > 0 and best["gmacs"] > 0   # measured on this CPU
    assert log[0]["search"]["latency_table"]["sha256"] == best["latency_table"]["sha256"]

    # the same search folder under another table is refused in one line
    other = table_file(dense_ckpt, tmp_path / "other.json", scale=2.0)
    code, _, err = run_cli(FAST + SEARCH + ["--search-speedup", "1.5", "--latency-table", other, "--resume", dense_ckpt,
                                            "--output_dir", out])
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "latency_table.sha256" in errors[0], err

    # prune+finetune of the searched policy reports predicted and measured speed-ups with the search's table
    code, _, err = run_cli(FAST + ["--prune_finetune", "--finetune-epochs", "0", "--resume", dense_ckpt,
                                   "--output_dir", out])
    assert code == 0, err
    res = json.loads((out / "prune_finetune" / "result.json").read_text())
    assert res["predicted_ms"] == pytest.approx(best["predicted_ms"]) and res["measured_speedup"] > 0
    assert res["latency_table"]["sha256"] == best["latency_table"]["sha256"]


@pytest.mark.slow
def test_an_unreachable_speedup_says_what_is_reachable(dense_ckpt, tmp_path):
    table = table_file(dense_ckpt, tmp_path / "table.json")
    code, _, err = run_cli(FAST + SEARCH + ["--search-speedup", "40", "--latency-table", table, "--resume", dense_ckpt])
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and err.endswith(errors[0] + "\n"), err
    assert "a speed-up of 40x is not reachable" in errors[0] and "reach at most" in errors[0]
    code, _, err = run_cli(FAST + SEARCH + ["--search-speedup", "2", "--search-reduction", "0.4",
                                            "--resume", dense_ckpt])
    assert code == 2 and "give one budget" in err
    code, _, err = run_cli(FAST + ["--latency-table", table, "--resume", dense_ckpt, "--eval"])
    assert code == 2 and "apply to a latency budget" in err
    code, _, err = run_cli(FAST + SEARCH + ["--search-speedup", "1.0", "--resume", dense_ckpt])
    assert code == 2 and "above 1" in err


def test_the_default_table_is_cached_by_what_it_was_measured_on(nano, tmp_path, monkeypatch):
    calls, made = [], fake_table(nano)

    def measure(dense, device, batch, dtype, round_to, fuse, **kw):
        calls.append(batch)
        return made
    monkeypatch.setattr(latency, "measure_table", measure)
    key = latency.table_key("cpu", torch.float32, 8)
    path = tmp_path / latency.key_slug(key)
    t1, how1 = latency.obtain_table(nano, str(path), "cpu", 8, expect_key=key)
    t2, how2 = latency.obtain_table(nano, str(path), "cpu", 8, expect_key=key)
    assert (how1, how2) == ("measured", "loaded") and t1 == t2 and len(calls) == 1
    _, how3 = latency.obtain_table(nano, str(path), "cpu", 8, expect_key=dict(key, batch=16))
    assert how3 == "measured" and len(calls) == 2


@pytest.mark.slow
def test_the_prepared_gpu_check_runs_its_code_paths_on_a_cpu(tmp_path):
    """benchmarks/bench_gpu.py --smoke: the same code as on a GPU on a tiny model (figures not checked)."""
    import subprocess
    import sys
    out = tmp_path / "gpu"
    p = subprocess.run([sys.executable, "benchmarks/bench_gpu.py", "--smoke", "--skip-tool", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=latency.__file__.rsplit("/", 1)[0])
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads((out / "results.json").read_text())
    models_ = {r["model"] for r in report["speed"] if "model" in r}
    assert {"dense", "-40%", "-60%"} <= models_ and len(models_) == 4
    assert set(report["profile"]["ms_per_forward"]) == {"dense", "-60%"}
    assert len(report["latency_table"]["validation"]["rows"]) == 4     # dense + 3 policies
    assert (out / "results.md").read_text().startswith("# GPU check")
