"""The prepared GPU check: speed of compressed DeiT-S against dense where users run it, in one script.

    python benchmarks/bench_gpu.py --out docs/gpu                # one GPU, under 8 minutes
    python benchmarks/bench_gpu.py --smoke --out /tmp/gpu-smoke  # the same code paths on a CPU, tiny

Writes ``results.json`` and ``results.md`` to ``--out`` (progress on stdout):
1. the models: dense DeiT-S, -40% and -60% GMACs (mixed head / neuron / token policies, neuron
   counts at multiples of ``--round-to``, random weights: speed does not depend on them), and a
   ``--speedup`` budget model searched on a latency table measured on this device at the largest batch;
2. ms per batch of every model at every ``--batches`` in every runtime: eager under bf16 autocast
   (fp32 weights), eager in bf16 weights, CUDA-graph replay of the bf16 forward, and torch.compile
   (default mode) of it; models interleaved within each (batch, runtime); speed-up over dense and
   its quotient with the GMACs ratio;
3. a kernel-time profile by category (matrix multiply, attention, norm, casts, gather/sort/cat,
   other elementwise) of dense and -60% at the largest batch (bf16 eager);
4. the latency table's prediction error on ``--validate`` random policies of the speed-up budget;
5. the tool's own CUDA paths (main.py subprocesses on digits): a short AMP training, a search with
   ``--search-speedup``, a prune + finetune and an ONNX export; their exit codes and last lines.
Parts that would overrun ``--budget-s`` are skipped and recorded as skipped.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import engine  # noqa: E402
import expected_improvement as ei  # noqa: E402
import flops  # noqa: E402
import latency  # noqa: E402
import models  # noqa: E402
import pruning  # noqa: E402
from bench_speed import policy_for_reduction  # noqa: E402

CATEGORIES = (("matmul", ("gemm", "matmul", "cutlass", "sm90", "sm80", "addmm", "mm", "linear", "cublas")),
              ("attention", ("flash", "fmha", "attention", "sdpa", "efficient")),
              ("norm", ("layer_norm", "layernorm", "norm")),
              ("cast", ("copy", "cast", "to_copy", "convert")),
              ("gather/sort/cat", ("gather", "sort", "topk", "cat", "index", "scatter")))


def category(name):
    low = name.lower()
    for cat, words in CATEGORIES:
        if any(w in low for w in words):
            return cat
    return "other elementwise"


def build_models(args, device):
    dense = models.build_model(args.model, img_size=args.img_size).eval()
    dims = pruning.model_dims(dense)
    rng = np.random.default_rng(0)
    rankings = {"heads": [rng.permutation(h).tolist() for h in dims["num_heads"]],
                "neurons": [rng.permutation(m).tolist() for m in dims["mlp_hidden"]]}
    out = {"dense": dense}
    for red in (0.4, 0.6):
        x = policy_for_reduction(dims, red, args.round_to, jitter=0.5)
        out[f"-{red:.0%}"] = pruning.slice_model(dense, pruning.policy_from_vector(x, dims["depth"]), rankings,
                                                 args.round_to)
    return dense, dims, rankings, out


def speedup_model(args, dense, dims, rankings, device, dtype, report):
    """Measure a latency table at the largest batch, draw a policy on the --speedup budget, and check
    the table's predictions on --validate more of them."""
    t0 = time.time()
    table = latency.measure_table(dense, device, max(args.batches), dtype, args.round_to,
                                  token_points=4 if args.smoke else 10, width_points=3 if args.smoke else 12,
                                  calibration_models=2 if args.smoke else 6)
    latency.save_table(table, os.path.join(args.out, "latency_table.json"))
    dense_ms = latency.predict_ms(table, dims, np.zeros(2 * dims["depth"] + 1), args.round_to)
    cost = lambda X: latency.predict_ms(table, dims, X, args.round_to)  # noqa: E731
    fastest = float(cost(np.full((1, 2 * dims["depth"] + 1), 0.5))[0])
    if dense_ms / args.speedup < fastest * 1.03:   # not reachable with ratios up to 0.5 on this device
        print(f"a {args.speedup:g}x budget is not reachable here (at most {dense_ms / fastest:.2f}x): using "
              f"{0.97 * dense_ms / fastest:.2f}x", flush=True)
        args.speedup = 0.97 * dense_ms / fastest
    report["speedup_budget"] = args.speedup
    sampler = ei.FeasibleSampler(cost, dense_ms / args.speedup, 2 * dims["depth"] + 1, upper=0.5, tol=0.03, unit="ms")
    X = sampler.sample(1 + args.validate, np.random.default_rng(1))
    check = latency.validate(table, dense, X[1:], device, dtype, args.round_to)
    report["latency_table"] = {"seconds": round(time.time() - t0, 1), "key": table["key"],
                               "calibration": {k: table["calibration"][k] for k in ("scale", "offset", "error_before",
                                                                                    "error_after")},
                               "validation": check}
    print(f"latency table in {time.time() - t0:.0f} s; prediction error on {args.validate} policies: median "
          f"{100 * check['median']:.1f}%, worst {100 * check['max']:.1f}%", flush=True)
    return pruning.slice_model(dense, pruning.policy_from_vector(X[0], dims["depth"]), rankings, args.round_to)


def runners(model, runtime, x, device):
    """A zero-argument forward of ``model`` on batch ``x`` in ``runtime``."""
    if runtime == "eager-autocast":
        m = engine.inference_copy(model, device, torch.float32)
        xf = x.float()

        def call():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                return m(xf)
        return call
    m = engine.inference_copy(model, device, x.dtype)
    if runtime == "cuda-graph":
        return engine.cuda_graph_call(m, x)
    if runtime == "compiled":
        m = engine.compile_model(m, device)
    return lambda: m(x)


def speed_table(args, zoo, macs, device, dtype, report, deadline):
    rows = []
    runtimes = ["eager-autocast", "eager-bf16"] + (["cuda-graph", "compiled"] if device.type == "cuda" else [])
    for batch in args.batches:
        x = torch.randn(batch, 3, args.img_size, args.img_size, device=device, dtype=dtype)
        for runtime in runtimes:
            if time.time() > deadline:
                rows.append({"batch": batch, "runtime": runtime, "skipped": "time budget"})
                continue
            t0 = time.time()
            with torch.inference_mode():
                calls = [runners(m, runtime, x, device) for m in zoo.values()]
                for c in calls:
                    c()
                ms = latency.time_calls(calls, device, rounds=args.rounds, reps=3 if device.type == "cuda" else 1,
                                        warmup=1)
            for name, t in zip(zoo, ms):
                rows.append({"batch": batch, "runtime": runtime, "model": name, "ms": t,
                             "images_per_s": batch * 1e3 / t, "speedup": ms[0] / t,
                             "macs_ratio": macs["dense"] / macs[name],
                             "of_macs_ratio": (ms[0] / t) / (macs["dense"] / macs[name])})
            print(f"batch {batch:4d} {runtime:15s} " + "  ".join(f"{n} {t:.3f} ms" for n, t in zip(zoo, ms))
                  + f"  ({time.time() - t0:.0f} s)", flush=True)
    report["speed"] = rows


def profile(args, zoo, device, dtype, report):
    from torch.profiler import ProfilerActivity, profile as torch_profile
    batch = max(args.batches)
    x = torch.randn(batch, 3, args.img_size, args.img_size, device=device, dtype=dtype)
    out = {}
    for name in ("dense", "-60%"):
        m = engine.inference_copy(zoo[name], device, dtype)
        acts = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
        with torch.inference_mode():
            for _ in range(2):
                m(x)
            latency.synchronize(device)
            with torch_profile(activities=acts) as prof:
                for _ in range(5):
                    m(x)
                latency.synchronize(device)
        cats = {}
        for ev in prof.key_averages():
            t = ev.self_device_time_total if device.type == "cuda" else ev.self_cpu_time_total   # self: no double count
            if t > 0:
                cats[category(ev.key)] = cats.get(category(ev.key), 0.0) + t / 5 / 1e3  # ms per forward
        out[name] = dict(sorted(cats.items(), key=lambda kv: -kv[1]))
        print(f"profile {name} at batch {batch}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in out[name].items()),
              flush=True)
    report["profile"] = {"batch": batch, "ms_per_forward": out}


def tool_paths(args, device, report, deadline):
    """The CLI's own CUDA paths on digits, as subprocesses."""
    work = os.path.join(args.out, "tool")
    dense = os.path.join(work, "dense")
    base = [sys.executable, os.path.join(ROOT, "main.py"), "--device", device.type, "--num_workers", "0",
            "--log-every", "1000", "--model", "vit_nano_patch4_32"]
    steps = [("train (AMP)", base + ["--epochs", "2", "--max-steps", "30", "--output_dir", dense]),
             ("search --search-speedup 1.5", base + ["--resume", os.path.join(dense, "checkpoint.pth"), "--search",
                                                     "--search-speedup", "1.5", "--search_population", "4",
                                                     "--search_epoch", "2", "--search-holdout", "200",
                                                     "--output_dir", os.path.join(work, "speedup")]),
             ("prune+finetune", base + ["--resume", os.path.join(dense, "checkpoint.pth"), "--prune_finetune",
                                        "--finetune-epochs", "1", "--max-steps", "20",
                                        "--output_dir", os.path.join(work, "speedup")]),
             ("export", base + ["--resume", os.path.join(work, "speedup", "prune_finetune", "compressed.pth"),
                                "--export", os.path.join(work, "compressed.onnx")])]
    out = []
    for name, cmd in steps:
        if time.time() > deadline:
            out.append({"step": name, "skipped": "time budget"})
            continue
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(30, deadline - time.time() + 60))
        tail = (p.stdout + p.stderr).strip().splitlines()[-3:]
        out.append({"step": name, "exit": p.returncode, "seconds": round(time.time() - t0, 1), "tail": tail})
        print(f"{name}: exit {p.returncode} in {time.time() - t0:.0f} s: {tail[-1] if tail else ''}", flush=True)
    report["tool"] = out


def markdown(report):
    lines = [f"# GPU check: {report['device']}", "", f"torch {report['torch']}, {report['model']}, command "
             f"`{report['command']}`", ""]
    lines += ["| batch | runtime | model | ms | images/s | speed-up | GMACs ratio | speed-up / GMACs ratio |",
              "|---|---|---|---|---|---|---|---|"]
    for r in report.get("speed", []):
        if "skipped" in r:
            lines.append(f"| {r['batch']} | {r['runtime']} | skipped ({r['skipped']}) | | | | | |")
        else:
            lines.append(f"| {r['batch']} | {r['runtime']} | {r['model']} | {r['ms']:.3f} | {r['images_per_s']:.0f} | "
                         f"{r['speedup']:.2f}x | {r['macs_ratio']:.2f}x | {r['of_macs_ratio']:.2f} |")
    if "profile" in report:
        lines += ["", f"Kernel time per forward at batch {report['profile']['batch']} (ms):", ""]
        for name, cats in report["profile"]["ms_per_forward"].items():
            lines.append(f"- {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in cats.items()))
    if "latency_table" in report:
        v = report["latency_table"]["validation"]
        lines += ["", f"Latency table prediction error on {len(v['rows']) - 1} policies: median "
                      f"{100 * v['median']:.1f}%, worst {100 * v['max']:.1f}%"]
    for step in report.get("tool", []):
        lines.append(f"- tool {step['step']}: " + (f"skipped ({step['skipped']})" if "skipped" in step
                                                    else f"exit {step['exit']} in {step['seconds']} s"))
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for results.json, results.md and the latency table")
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    p.add_argument("--round-to", type=int, default=64, help="neuron counts at multiples of N (64: GPU-friendly)")
    p.add_argument("--speedup", type=float, default=2.0, help="the speed-up budget model's predicted speed-up")
    p.add_argument("--validate", type=int, default=10)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--budget-s", type=float, default=450, help="skip parts that would start after this many seconds")
    p.add_argument("--skip-tool", action="store_true", help="leave out the main.py subprocess runs")
    p.add_argument("--smoke", action="store_true", help="a tiny model and batches on whatever device is here (a test)")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.img_size, args.batches, args.round_to, args.validate, args.rounds = \
            "vit_nano_patch4_32", 32, [1, 8], 8, 3, 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        p.error("no CUDA device here: run with --smoke to exercise the code paths on a CPU")
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()
    deadline = t_start + args.budget_s
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    report = {"device": latency.device_name(device), "torch": torch.__version__, "model": args.model,
              "python": platform.python_version(), "command": " ".join(sys.argv)}
    dense, dims, rankings, zoo = build_models(args, device)
    zoo[f"{args.speedup:g}x budget"] = speedup_model(args, dense, dims, rankings, device, dtype, report)
    macs = {name: flops.model_macs(m)["macs"] for name, m in zoo.items()}
    report["gmacs"] = {name: m / 1e9 for name, m in macs.items()}
    speed_table(args, zoo, macs, device, dtype, report, deadline)
    profile(args, zoo, device, dtype, report)
    if not args.skip_tool:
        tool_paths(args, device, report, deadline + 90)
    report["seconds"] = round(time.time() - t_start, 1)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown(report))
    print(f"done in {report['seconds']:.0f} s; figures in {args.out}/results.md")


if __name__ == "__main__":
    main()
