"""Honest throughput (issue "Fast where it runs", item 4): one half dtype chosen by --amp-dtype,
inference measured in that dtype's weights with latency.time_calls, batch and batch-1 figures,
runtimes (--compile MODE, --cuda-graph) and a speed-up measured against a baseline in one run.
CPU only; no test asserts a timing, only that the figures exist and are sane."""
import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch

import engine
import flags
import main
import models
from helpers import run_cli
from pruning import apply_spec, model_dims, policy_to_spec, uniform_policy

CPU = torch.device("cpu")
PICO = "vit_pico_patch8_32"
NANO = "vit_nano_patch4_32"
KEYS = {"images_per_s", "batch_ms", "batch1_ms", "batch", "dtype", "runtime", "device"}


@pytest.fixture(autouse=True)
def one_thread():
    """Many tiny timed forwards: one thread, no hand-offs (two threads on a busy 2-core CPU run them
    ~50x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def compressed_copy(model):
    """``model`` with half its heads and a quarter of its neurons sliced off (random rankings)."""
    dims = model_dims(model)
    rng = np.random.default_rng(0)
    rankings = {"heads": [rng.permutation(h).tolist() for h in dims["num_heads"]],
                "neurons": [rng.permutation(m).tolist() for m in dims["mlp_hidden"]]}
    policy = uniform_policy(dims["depth"], head=0.5, neuron=0.25)
    return apply_spec(copy.deepcopy(model), policy_to_spec(policy, rankings, dims))


def save(path, model, name=NANO):
    models.save_model_file(str(path), model, models.model_arch(name, model, 32, (0.5,) * 3, (0.5,) * 3))
    return str(path)


def test_throughput_returns_positive_finite_figures():
    model = models.build_model(PICO, num_classes=10)
    got = engine.throughput(model, CPU, batch_size=4, input_size=32, warmup=1, repeats=2, reps=1)
    assert set(got) == KEYS
    for key in ("images_per_s", "batch_ms", "batch1_ms"):
        assert math.isfinite(got[key]) and got[key] > 0, (key, got)
    assert got["batch"] == 4 and got["dtype"] == "float32" and got["runtime"] == "eager" and got["device"] == "cpu"
    assert got["images_per_s"] == pytest.approx(4 * 1e3 / got["batch_ms"])
    # the same path for several models, in the order given
    both = engine.interleaved_throughput([model, compressed_copy(models.build_model(NANO))], CPU, 2, 32, rounds=1,
                                         warmup=1, reps=1)
    assert len(both) == 2 and all(set(r) == KEYS and r["batch1_ms"] > 0 for r in both)


def test_inference_dtype_and_copy():
    assert engine.inference_dtype(CPU, True) == torch.float32
    assert engine.inference_dtype(CPU, "float16") == torch.float32
    assert engine.inference_dtype(torch.device("cuda"), "float16") == torch.float16
    assert engine.inference_dtype(torch.device("cuda"), True) == torch.bfloat16
    assert engine.inference_dtype(torch.device("cuda"), False) == torch.float32
    model = models.build_model(PICO, num_classes=10)
    assert engine.inference_copy(model, CPU, torch.float32) is model  # nothing to convert: no copy
    half = engine.inference_copy(model, CPU, torch.bfloat16)
    assert half is not model and next(half.parameters()).dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is left alone


def test_compressed_model_runs_in_half_weights():
    """The CUDA measurement's dtype handling (a bf16 copy, a bf16 input, no autocast), run on the CPU:
    a model with sliced heads, neurons and token reduction gives the float32 logits to bf16 precision."""
    dense = models.build_model("deit_nano_distilled_patch4_32", num_classes=10).eval()
    dims = model_dims(dense)
    rng = np.random.default_rng(0)
    rankings = {"heads": [rng.permutation(h).tolist() for h in dims["num_heads"]],
                "neurons": [rng.permutation(m).tolist() for m in dims["mlp_hidden"]]}
    model = apply_spec(dense, policy_to_spec(uniform_policy(dims["depth"], head=0.25, neuron=0.3, token=0.3),
                                             rankings, dims, fuse="weighted"))
    half = engine.inference_copy(model, CPU, torch.bfloat16)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        ref, got = model(x), half(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, atol=0.1, rtol=0.05)


def test_amp_dtype_reaches_autocast_and_the_grad_scaler():
    assert engine.half_dtype(False) is None and engine.half_dtype(True) == torch.bfloat16
    assert engine.half_dtype("float16") == torch.float16 and engine.half_dtype(torch.float16) == torch.float16
    with pytest.raises(ValueError, match="float8"):
        engine.half_dtype("float8")
    assert isinstance(engine.autocast(CPU, "float16"), type(engine.autocast(CPU, False)))  # a no-op off CUDA
    # the flag settles into the Context's amp setting, which is what every engine function receives
    cfg = flags.settle(main.Parser("main.py", parents=[main.get_args_parser()]).parse_args(
        ["--model", PICO, "--amp-dtype", "float16"]))[0]
    cuda = {"device": torch.device("cuda"), "rank": 0, "distributed": False, "world_size": 1}
    ctx = main.Context(cfg, cuda)
    assert ctx.amp == "float16" and ctx.amp_dtype == torch.float16
    assert main.Context(cfg, dict(cuda, device=CPU)).amp is False
    with warnings.catch_warnings():  # constructing a CUDA autocast without CUDA warns, entering it is not needed
        warnings.simplefilter("ignore")
        assert engine.autocast(ctx.device, ctx.amp).fast_dtype == torch.float16
        assert engine.autocast(ctx.device, True).fast_dtype == torch.bfloat16
        assert engine.autocast(ctx.device, True, dtype=torch.float16).fast_dtype == torch.float16
    assert engine.needs_grad_scaler(ctx.amp) and not engine.needs_grad_scaler("bfloat16")
    assert not engine.needs_grad_scaler(False)
    recipe = engine.Recipe(epochs=1, lr=1e-3)
    with warnings.catch_warnings():  # a CUDA GradScaler without CUDA warns and disables itself
        warnings.simplefilter("ignore")
        assert engine.training_parts(models.build_model(PICO), recipe, 1, 10, None, "float16")[-1] is not None
    assert engine.training_parts(models.build_model(PICO), recipe, 1, 10, None, "bfloat16")[-1] is None


def test_flag_choices_equal_the_librarys():
    choices = {a.dest: a.choices for a in main.get_args_parser()._actions if a.choices}
    assert tuple(choices["amp_dtype"]) == engine.HALF_DTYPES
    assert tuple(choices["compile"]) == engine.COMPILE_MODES
    args = main.get_args_parser().parse_args(["--compile"])
    assert args.compile == "default" and args.amp_dtype == "bfloat16"
    assert main.get_args_parser().parse_args(["--compile", "max-autotune"]).compile == "max-autotune"
    assert main.get_args_parser().parse_args([]).compile is False
    assert engine.runtime_name() == "eager" and engine.runtime_name(True) == "compile:default"
    assert engine.runtime_name("reduce-overhead") == "compile:reduce-overhead"
    assert engine.runtime_name(cuda_graph=True) == "cuda-graph"


@pytest.mark.parametrize("argv, message", [
    (["--throughput", "--cuda-graph"], "--cuda-graph captures and replays CUDA graphs: it needs a CUDA device"),
    (["--cuda-graph"], "--cuda-graph applies to --throughput"),
    (["--throughput", "--cuda-graph", "--compile"], "not both"),
    (["--throughput-baseline", "x.pth"], "--throughput-baseline applies to --throughput"),
])
def test_speed_flags_refused_in_one_line(argv, message):
    code, out, err = run_cli(argv + ["--model", PICO])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert out == ""


def test_cuda_graph_off_cuda_is_refused_by_the_library_too():
    with pytest.raises(engine.UserError, match="needs a CUDA device"):
        engine.throughput(models.build_model(PICO), CPU, batch_size=2, input_size=32, cuda_graph=True)


def test_throughput_baseline_prints_the_speedup_measured_in_the_run(tmp_path):
    dense = models.build_model(NANO, num_classes=10)
    dense_file = save(tmp_path / "dense.pth", dense)
    small_file = save(tmp_path / "small.pth", compressed_copy(dense))
    code, out, err = run_cli(["--throughput", "--resume", small_file, "--throughput-baseline", dense_file,
                              "--throughput-batch", "2"])
    assert code == 0, err
    line = json.loads(out.strip().splitlines()[-1])
    assert line["compressed"] and line["dtype"] == "float32" and line["runtime"] == "eager"
    assert line["batch1_ms"] > 0 and line["images_per_s"] > 0
    assert line["baseline"]["file"] == dense_file and not math.isnan(line["baseline"]["batch1_ms"])
    assert line["speedup"] > 0 and line["speedup_batch1"] > 0
    assert line["macs_ratio"] == pytest.approx(line["baseline"]["gmacs"] / line["gmacs"]) and line["macs_ratio"] > 1
    assert "speed-up over" in err and "at batch 1; GMACs ratio" in err
    # a baseline that does not load, or one of another input size, is a one-line error
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    for baseline, message in ((tmp_path / "junk.pth", "does not load"), (tmp_path / "none.pth", "does not load")):
        code, _, err = run_cli(["--throughput", "--resume", small_file, "--throughput-baseline", baseline])
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    wide = models.build_model(PICO, num_classes=10, img_size=64)
    models.save_model_file(str(tmp_path / "wide.pth"), wide, models.model_arch(PICO, wide, 64, (0.5,) * 3, (0.5,) * 3))
    code, _, err = run_cli(["--throughput", "--resume", small_file, "--throughput-baseline", tmp_path / "wide.pth"])
    assert code == 2 and "do not compare" in err, err

