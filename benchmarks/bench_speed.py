"""Measured speed-up of compressed ViTs against their MACs reduction.

    python benchmarks/bench_speed.py [--model deit_small_patch16_224] [--batch-size 32] [--repeats 7]

Builds the dense model (random weights: speed does not depend on them), makes compressed
copies with ~40% and ~60% fewer MACs that mix head, neuron and token reduction (random
rankings), then times dense and compressed forwards interleaved under ``torch.inference_mode``
(warm-up first, medians over repeats). Prints, per compressed model, the MACs ratio
(dense / compressed), the measured speed-up (dense time / compressed time) and their quotient
(1.0 = the speed-up the MACs promise). On CUDA the forwards run under bf16 autocast.
"""
import argparse
import copy
import os
import statistics
import sys
import time

import numpy as np
import timm
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flops  # noqa: E402
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
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    dense = timm.create_model(args.model, pretrained=False, img_size=args.img_size).eval()
    dims = model_dims(dense)
    rng = np.random.default_rng(0)
    rankings = {"heads": [rng.permutation(h).tolist() for h in dims["num_heads"]],
                "neurons": [rng.permutation(m).tolist() for m in dims["mlp_hidden"]]}
    models = {"dense": dense}
    for red in args.reductions:
        x = policy_for_reduction(dims, red, args.round_to, args.jitter)
        spec = policy_to_spec(policy_from_vector(x, dims["depth"]), rankings, dims, args.round_to, args.fuse)
        models[f"-{red:.0%}"] = apply_spec(copy.deepcopy(dense), spec)
    macs = {name: flops.model_macs(m)["macs"] for name, m in models.items()}
    for name, m in models.items():
        m.to(device)
        if name != "dense":
            spec = m.prune_spec
            print(f"{name}: heads/block {[len(h) for h in spec['heads']]}, neurons/block "
                  f"{[len(n) for n in spec['neurons']]}, tokens {spec['tokens']['keep_rates'] if spec['tokens'] else None}"
                  f" -> kept {[b.token_keep for b in m.blocks if hasattr(b, 'token_keep')]}", flush=True)

    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def run(model):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    times = {name: [] for name in models}
    with torch.inference_mode(), amp:
        for _ in range(args.warmup):
            for m in models.values():
                run(m)
        for rep in range(args.repeats):
            for name, m in models.items():
                times[name].append(run(m))
    med = {name: statistics.median(t) for name, t in times.items()}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.model} {args.img_size}px batch {args.batch_size} on {device} ({torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, 1-min load average {load:.1f}), median of {args.repeats} interleaved repeats")
    print(f"dense: {macs['dense'] / 1e9:.3f} GMACs, {med['dense'] * 1e3:.1f} ms/batch, "
          f"{args.batch_size / med['dense']:.1f} img/s")
    for name in models:
        if name == "dense":
            continue
        macs_ratio = macs["dense"] / macs[name]
        speedup = med["dense"] / med[name]
        paired = statistics.median(d / c for d, c in zip(times["dense"], times[name]))
        print(f"{name}: {macs[name] / 1e9:.3f} GMACs ({1 - macs[name] / macs['dense']:.1%} fewer), "
              f"{med[name] * 1e3:.1f} ms/batch, {args.batch_size / med[name]:.1f} img/s | MACs ratio {macs_ratio:.3f}, "
              f"speed-up {speedup:.3f}, speed-up / MACs ratio {speedup / macs_ratio:.3f} "
              f"(median of paired repeats {paired / macs_ratio:.3f})")


if __name__ == "__main__":
    main()
