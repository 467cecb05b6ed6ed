"""Measured speed-up of compressed ViTs against their MACs reduction, in PyTorch and ONNX Runtime.

    python benchmarks/bench_speed.py [--model deit_small_patch16_224] [--batch-size 32] [--repeats 7]
    python benchmarks/bench_speed.py --onnxruntime [--exporter dynamo torchscript:17 ...] [--repeats 5]

Builds the dense model (random weights: speed does not depend on them), makes compressed
copies with ~40% and ~60% fewer MACs that mix head, neuron and token reduction (random
rankings), then times dense and compressed forwards interleaved under ``torch.inference_mode``
(warm-up first, medians over repeats). Prints, per compressed model, the MACs ratio
(dense / compressed), the measured speed-up (dense time / compressed time) and their quotient
(1.0 = the speed-up the MACs promise). On CUDA the models run in bf16 weights (engine.inference_copy,
the dtype handling of ``main.py --throughput``), elsewhere in float32; forwards are timed by
latency.time_calls.

With ``--onnxruntime`` every model is also exported with ``export.export_onnx`` (verified against
PyTorch) and run in ONNX Runtime's CPU execution provider, interleaved with the PyTorch eager
forwards of the same batch; the table then gives ORT images/s next to eager images/s, each
speed-up against the dense model run the same way, and that speed-up over the MACs ratio.
Several ``--exporter NAME[:OPSET]`` time the graphs of torch.onnx's exporters side by side.
"""
import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import engine  # noqa: E402
import export  # noqa: E402
import flops  # noqa: E402
import latency  # noqa: E402
import models  # noqa: E402
from pruning import apply_spec, model_dims, policy_from_vector, policy_to_spec  # noqa: E402


def mixed_policy_vector(depth, t, jitter=0.0, seed=0):
    """One knob t for all three dimensions: heads t, neurons t, token rate t/2; with ``jitter`` > 0
    every block's head and neuron ratios are scaled by its own factor in [1 - jitter, 1 + jitter]
    (searched policies are not uniform)."""
    rng = np.random.default_rng(seed)
    f_head, f_neuron = rng.uniform(1 - jitter, 1 + jitter, (2, depth))
    return np.concatenate([np.minimum(t * f_head, 0.95), np.minimum(t * f_neuron, 0.95), [t / 2]])


def policy_for_reduction(dims, reduction, round_to, jitter=0.0):
    """Smallest knob (by bisection on policy_gmacs) whose MACs are <= (1 - reduction) x dense."""
    dense = flops.policy_gmacs(dims, np.zeros(2 * dims["depth"] + 1))
    lo, hi = 0.0, 0.95
    for _ in range(40):
        mid = (lo + hi) / 2
        g = flops.policy_gmacs(dims, mixed_policy_vector(dims["depth"], mid, jitter), round_to)
        lo, hi = (mid, hi) if g > (1 - reduction) * dense else (lo, mid)
    return mixed_policy_vector(dims["depth"], hi, jitter)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--round-to", type=int, default=8,
                   help="neuron counts rounded to multiples of this (odd widths such as 1146 run ~25%% slower "
                        "per MAC than 1144 in CPU GEMMs)")
    p.add_argument("--fuse", default="mean", choices=["mean", "weighted"])
    p.add_argument("--jitter", type=float, default=0.5, help="per-block spread of head / neuron ratios")
    p.add_argument("--reductions", type=float, nargs="+", default=[0.4, 0.6])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads and ONNX Runtime intra-op threads (0: each library's default)")
    p.add_argument("--onnxruntime", action="store_true",
                   help="also export each model to ONNX and time it in ONNX Runtime (CPU execution provider)")
    p.add_argument("--exporter", nargs="+", default=[export.DEFAULT_ONNX_EXPORTER], metavar="NAME[:OPSET]",
                   help=f"torch.onnx exporter(s) for --onnxruntime, each timed side by side: "
                        f"{' or '.join(export.ONNX_EXPORTERS)}, optionally with an opset (dynamo:18)")
    p.add_argument("--opset", type=int, default=export.ONNX_OPSET, help="opset of an --exporter given without one")
    p.add_argument("--onnx-dir", default=None, help="keep the exported files here (default: a temporary folder)")
    args = p.parse_args()
    try:
        args.variants = [parse_variant(v, args.opset) for v in args.exporter]
    except ValueError as e:
        p.error(str(e))
    if args.onnxruntime and args.device != "cpu":
        p.error("--onnxruntime measures the CPU execution provider: use it with --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    dense = models.build_model(args.model, img_size=args.img_size).eval()   # timm names and this project's presets
    dims = model_dims(dense)
    rng = np.random.default_rng(0)
    rankings = {"heads": [rng.permutation(h).tolist() for h in dims["num_heads"]],
                "neurons": [rng.permutation(m).tolist() for m in dims["mlp_hidden"]]}
    models_ = {"dense": dense}
    for red in args.reductions:
        x = policy_for_reduction(dims, red, args.round_to, args.jitter)
        spec = policy_to_spec(policy_from_vector(x, dims["depth"]), rankings, dims, args.round_to, args.fuse)
        models_[f"-{red:.0%}"] = apply_spec(copy.deepcopy(dense), spec)
    macs = {name: flops.model_macs(m)["macs"] for name, m in models_.items()}
    for name, m in models_.items():
        m.to(device)
        if name != "dense":
            spec = m.prune_spec
            print(f"{name}: heads/block {[len(h) for h in spec['heads']]}, neurons/block "
                  f"{[len(n) for n in spec['neurons']]}, "
                  f"tokens {spec['tokens']['keep_rates'] if spec['tokens'] else None}"
                  f" -> kept {[b.token_keep for b in m.blocks if hasattr(b, 'token_keep')]}", flush=True)

    dtype = engine.inference_dtype(device, "bfloat16")  # bf16 weights and input on CUDA, float32 elsewhere
    models_ = {name: engine.inference_copy(m, device, dtype) for name, m in models_.items()}
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device, dtype=dtype)

    # runners[engine][model] = a call that runs one batch
    runners = {"eager": {name: (lambda m=m: m(x)) for name, m in models_.items()}}
    with tempfile.TemporaryDirectory() as tmp:
        if args.onnxruntime:
            runners.update(export_runners(models_, args, args.onnx_dir or tmp, x))
        times = {eng: {name: [] for name in models_} for eng in runners}
        # interleaved: every model and engine once per round
        order = [(eng, name) for name in models_ for eng in runners]
        with torch.inference_mode():
            for rep in range(args.repeats):  # one round per call keeps every repeat's times (paired medians)
                ms = latency.time_calls([runners[eng][name] for eng, name in order], device, rounds=1, reps=1,
                                        warmup=args.warmup if rep == 0 else 0)
                for (eng, name), t in zip(order, ms):
                    times[eng][name].append(t / 1e3)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.model} {args.img_size}px batch {args.batch_size} on {device} ({torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, 1-min load average {load:.1f}), median of {args.repeats} interleaved repeats")
    if not args.onnxruntime:
        report_eager(times["eager"], macs, args.batch_size)
    else:
        report_table(times, macs, args.batch_size)


def report_eager(times, macs, batch):
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"dense: {macs['dense'] / 1e9:.3f} GMACs, {med['dense'] * 1e3:.1f} ms/batch, "
          f"{batch / med['dense']:.1f} img/s")
    for name in times:
        if name == "dense":
            continue
        macs_ratio = macs["dense"] / macs[name]
        speedup = med["dense"] / med[name]
        paired = statistics.median(d / c for d, c in zip(times["dense"], times[name]))
        print(f"{name}: {macs[name] / 1e9:.3f} GMACs ({1 - macs[name] / macs['dense']:.1%} fewer), "
              f"{med[name] * 1e3:.1f} ms/batch, {batch / med[name]:.1f} img/s | MACs ratio {macs_ratio:.3f}, "
              f"speed-up {speedup:.3f}, speed-up / MACs ratio {speedup / macs_ratio:.3f} "
              f"(median of paired repeats {paired / macs_ratio:.3f})")


def parse_variant(text, default_opset):
    name, _, opset = text.partition(":")
    if name not in export.ONNX_EXPORTERS:
        raise ValueError(f"unknown exporter '{name}' (choose {', '.join(export.ONNX_EXPORTERS)})")
    return name, int(opset) if opset else default_opset


def export_runners(models_, args, folder, x):
    """Export every model with each chosen exporter and opset (verified by export.export_onnx) and
    return {"ort-<exporter>-<opset>": {model name: call}} running the batch ``x`` in an ONNX Runtime
    CPU session."""
    mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    feed = {export.ONNX_INPUT_NAME: x.detach().cpu().float().numpy()}
    out = {}
    for exporter, opset in args.variants:
        key = f"ort-{exporter}-{opset}"
        out[key] = {}
        for name, m in models_.items():
            path = os.path.join(folder, f"{args.model}{name.replace('%', 'pct')}-{exporter}-{opset}.onnx")
            arch = models.model_arch(args.model, m, args.img_size, mean, std)
            t0 = time.perf_counter()
            meta = export.export_onnx(m, path, arch, opset=opset, exporter=exporter)
            check = meta["verification"]
            print(f"exported {name} with {exporter} (opset {opset}) in {time.perf_counter() - t0:.0f} s: "
                  f"{os.path.getsize(path) / 1e6:.1f} MB, max |ORT - PyTorch| {check['max_abs_diff']:.2e}, "
                  f"top-1 agreement {check['top1_agreement']:.0%}", flush=True)
            sess = export.onnx_session(path, threads=args.threads, spinning=False)
            out[key][name] = (lambda s=sess: s.run(None, feed))
    return out


def report_table(times, macs, batch):
    """Markdown table: per model, images/s and speed-up over dense for every engine."""
    engines = list(times)
    med = {eng: {name: statistics.median(t) for name, t in times[eng].items()} for eng in engines}
    head = "| model | GMACs | MACs ratio |"
    rule = "|---|---|---|"
    for eng in engines:
        head += f" {eng} img/s | {eng} speed-up | {eng} speed-up / MACs ratio |"
        rule += "---|---|---|"
    print(head)
    print(rule)
    for name in times["eager"]:
        ratio = macs["dense"] / macs[name]
        row = f"| {name} | {macs[name] / 1e9:.4g} | {ratio:.2f}x |"
        for eng in engines:
            speedup = med[eng]["dense"] / med[eng][name]
            row += f" {batch / med[eng][name]:.1f} | {speedup:.2f}x | {speedup / ratio:.2f} |"
        print(row)
    for eng in engines[1:]:
        print(f"dense in {eng} runs at {med['eager']['dense'] / med[eng]['dense']:.2f}x PyTorch eager's images/s")


if __name__ == "__main__":
    main()
