"""What the paper's FLOPs budgets cost when every MAC is counted.

The original implementation (Hou & Kung 2022) states budgets as --search_flops in its own
convention (flops.py convention="original": blocks only, int() rounding), as a fraction of the
DeiT model-card FLOPs: 1.84 = 0.4 x 4.6 for "60% fewer" on DeiT-S. For DeiT-Ti/S/B at 40% and
60% fewer this script draws policies the way the original's search did (every ratio uniform in
[0, 0.5), kept when the original's count is within 2% of the budget), builds each the way the
original's model was built (pruning.policy_to_spec rounding="original") and counts it exactly
(flops.policy_gmacs, which equals the built model's count), and prints a Markdown table.

    python benchmarks/bench_paper_budgets.py [--samples 200] [--seed 0]
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flops  # noqa: E402
import models  # noqa: E402
import pruning  # noqa: E402

MODEL_CARD_GFLOPS = {"deit_tiny_patch16_224": 1.3, "deit_small_patch16_224": 4.6, "deit_base_patch16_224": 17.6}


def feasible_original(dims, target, samples, rng, tol=0.02, upper=0.5, chunk=100000, max_draws=20_000_000):
    """Policies drawn like the original's screen(): uniform in [0, upper)^(2L+1), kept when the
    original convention's GMACs are within tol of target. Returns [samples, 2L+1] (or fewer)."""
    dim = 2 * int(dims["depth"]) + 1
    found, draws = [], 0
    while sum(len(f) for f in found) < samples and draws < max_draws:
        X = rng.uniform(0.0, upper, size=(chunk, dim))
        g = flops.policy_gmacs(dims, X, convention="original")
        found.append(X[np.abs(g - target) <= tol * target])
        draws += chunk
    X = np.concatenate(found)[:samples]
    return X, draws


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    print("| model | paper's budget | --search_flops | original convention: dense, budget share | "
          "exact GMACs: dense | exact GMACs of its models: mean [min, max] | fewer MACs, exact | "
          "--search_flops read exactly |")
    print("|---|---|---|---|---|---|---|---|")
    for name, card in MODEL_CARD_GFLOPS.items():
        with torch.device("meta"):
            dense = models.build_model(name)
        dims = pruning.model_dims(dense)
        zero = np.zeros(2 * dims["depth"] + 1)
        dense_orig = flops.policy_gmacs(dims, zero, convention="original")
        dense_exact = flops.policy_gmacs(dims, zero)
        for reduction in (0.4, 0.6):
            target = round(card * (1 - reduction), 4)
            X, draws = feasible_original(dims, target, args.samples, rng)
            if len(X) == 0:
                print(f"| {name} | {reduction:.0%} fewer | {target:g} | no feasible policy in {draws} draws |")
                continue
            exact = flops.policy_gmacs(dims, X, rounding="original")
            print(f"| {name} | {reduction:.0%} fewer | {target:g} | {dense_orig:.4f}, {target / dense_orig:.1%} | "
                  f"{dense_exact:.4f} | {exact.mean():.3f} [{exact.min():.3f}, {exact.max():.3f}] "
                  f"(n={len(X)}) | {1 - exact.mean() / dense_exact:.1%} | "
                  f"{1 - target / dense_exact:.1%} fewer |")


if __name__ == "__main__":
    main()
