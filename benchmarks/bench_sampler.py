"""Speed of feasible-policy sampling and of one GP fit + EI, for a DeiT-S-sized search space.

    python benchmarks/bench_sampler.py [--n 10000] [--repeats 3] [--skip-gp] [--flops real]

The FLOPs model is the single global ``flops_fn``: by default a self-contained DeiT-S-like formula
(12 blocks, 6 heads of 64, 1536 MLP neurons, 196 patches, token reduction at blocks 4, 7, 10
with keep rates (1-r)^k, rounding to whole heads and neurons); ``--flops real`` swaps in the
project's ``flops.policy_gmacs`` for timm's deit_small_patch16_224 (needs torch and timm).

Reported: time to draw 10,000 feasible candidates at 8 targets spanning 2% above the smallest
reachable GMACs to 2% below the dense GMACs; the original's blind rejection sampling rate
(uniform over [0, 0.5]^25, keep those within 2%) at 1.84 / 1.25 / 4.0 GMACs; one GP fit plus EI
over a 10,000-candidate pool with 100 and 200 observations.
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from expected_improvement import GPEI, FeasibleSampler  # noqa: E402

DEPTH, HEADS, HEAD_DIM, EMBED, MLP, PATCHES = 12, 6, 64, 384, 1536, 196
REDUCE_AT = (3, 6, 9)  # 0-based blocks 4, 7, 10


def deit_small_like_gmacs(X):
    """GMACs of DeiT-S policies X [n, 2*DEPTH+1] (head ratios, neuron ratios, token rate)."""
    X = np.asarray(X, dtype=float)
    heads = HEADS - np.round(X[:, :DEPTH] * HEADS)
    neurons = MLP - np.round(X[:, DEPTH:2 * DEPTH] * MLP)
    r = X[:, 2 * DEPTH]
    macs = np.full(X.shape[0], PATCHES * 3 * 16 * 16 * EMBED + EMBED * 1000, dtype=float)
    kept = np.full(X.shape[0], float(PATCHES))
    k = 0
    for b in range(DEPTH):
        if b in REDUCE_AT:
            k += 1
            kept = np.ceil(PATCHES * (1.0 - r) ** k - 1e-9)
        n = 1 + kept + (kept < PATCHES)  # class token + kept patches + one fused token
        a = heads[:, b] * HEAD_DIM
        macs += n * EMBED * 3 * a + 2 * n * n * a + n * a * EMBED + 2 * n * EMBED * neurons[:, b]
    return macs / 1e9


def real_deit_small_gmacs():
    """``flops.policy_gmacs`` bound to timm's DeiT-S (built without weights)."""
    import functools

    import timm

    import flops
    import pruning

    model = timm.create_model("deit_small_patch16_224", pretrained=False)
    return functools.partial(flops.policy_gmacs, pruning.model_dims(model))


flops_fn = deit_small_like_gmacs
DIM = 2 * DEPTH + 1


def bench_sampler(n, repeats):
    probe = FeasibleSampler(flops_fn, 1.0, DIM, tol=10.0)
    fmin, fmax = probe.reachable_range()
    print(f"reachable range [{fmin:.3f}, {fmax:.3f}] GMACs (max ratio 0.5)")
    targets = np.linspace(fmin * 1.02, fmax * 0.98, 8)
    for target in targets:
        s = FeasibleSampler(flops_fn, target, DIM)
        times = []
        for rep in range(repeats):
            rng = np.random.default_rng(rep)
            t0 = time.perf_counter()
            X = s.sample(n, rng)
            times.append(time.perf_counter() - t0)
        assert X.shape == (n, DIM) and s.is_feasible(X).all()
        spread = np.ptp(np.percentile(X[:, :-1], [5, 95], axis=0), axis=0).mean()
        within = X[:, :-1].std(axis=1).mean()
        print(f"target {target:6.3f} GMACs: {n} feasible in {min(times):.3f} s "
              f"(median {np.median(times):.3f} s); mean 5-95% coord spread {spread:.3f}, "
              f"mean within-policy std {within:.3f}, token rate {X[:, -1].min():.2f}.."
              f"{X[:, -1].max():.2f}")


def bench_rejection(seconds=5.0):
    for target in (1.84, 1.25, 4.0):
        rng = np.random.default_rng(0)
        found = drawn = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            X = rng.uniform(0.0, 0.5, size=(10000, DIM))
            f = flops_fn(X)
            found += int(np.sum(np.abs(f - target) <= 0.02 * target))
            drawn += X.shape[0]
        dt = time.perf_counter() - t0
        print(f"rejection sampling at {target:.2f} GMACs: {found} feasible of {drawn} drawn in "
              f"{dt:.1f} s ({found / dt:.0f}/s; acceptance {found / drawn:.2e})")


def bench_gp(pool_size):
    s = FeasibleSampler(flops_fn, 1.84, DIM)
    rng = np.random.default_rng(0)
    w = rng.normal(size=DIM)
    X_all = s.sample(200, rng)
    y_all = 0.7 - 0.3 * np.tanh(X_all @ w / 3) + 0.01 * rng.normal(size=200)  # smooth + noise
    for n_obs in (100, 200):
        for ard, restarts, refine in ((True, 0, False), (True, 0, True), (True, 1, True),
                                      (False, 0, True)):
            opt = GPEI(DIM, s, n_init=10, seed=0, pool_size=pool_size, refine=refine, ard=ard,
                       n_restarts=restarts)
            for x, v in zip(X_all[:n_obs], y_all[:n_obs]):
                opt.tell(x, v)
            opt.ask()
            print(f"one EI ask: {n_obs} observations, pool {pool_size}, ard={ard}, "
                  f"n_restarts={restarts}, refine={refine}: {opt.gp_seconds:.2f} s")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rejection-seconds", type=float, default=5.0)
    p.add_argument("--skip-gp", action="store_true")
    p.add_argument("--flops", choices=["synthetic", "real"], default="synthetic",
                   help="FLOPs model: the formula in this file, or flops.policy_gmacs")
    args = p.parse_args()
    if args.flops == "real":
        global flops_fn
        flops_fn = real_deit_small_gmacs()
    bench_sampler(args.n, args.repeats)
    bench_rejection(args.rejection_seconds)
    if not args.skip_gp:
        bench_gp(args.n)


if __name__ == "__main__":
    main()
