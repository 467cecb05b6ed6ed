"""Is the dependency criterion worth it? Prune a trained dense model by HSIC, magnitude and random
rankings (no finetuning) and compare top-1.

    python benchmarks/bench_criterion_evidence.py --model-file /tmp/dense_digits.pth
    python benchmarks/bench_criterion_evidence.py --model-file /tmp/dense_digits.pth --sweep

Every block loses the same fraction of heads and of neurons (pruning.uniform_policy), ranked on
--criterion-batches batches of --batch-size un-augmented training images (a fixed shuffle, as
main.py's criterion_loader does with one process). The table reports val top-1, and also top-1 on
a "tune" split: training images NOT used by the criterion. --sweep varies the criterion's options
(batches, bandwidth, lambda, head normalisation, alpha) and reports both columns; defaults are to
be chosen on the tune column, never on val (val is printed so the choice can be audited).
"""
import argparse
import copy
import os
import statistics
import sys
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import datasets  # noqa: E402
import dependency_criterion as dc  # noqa: E402
import engine  # noqa: E402
import models  # noqa: E402
import pruning  # noqa: E402


def evaluate(model, dims, rankings, head, neuron, ds):
    spec = pruning.policy_to_spec(pruning.uniform_policy(dims["depth"], head=head, neuron=neuron), rankings, dims)
    m2 = copy.deepcopy(model)
    pruning.apply_spec(m2, spec)
    loader = torch.utils.data.DataLoader(ds, batch_size=512)
    return engine.evaluate(loader, m2, torch.device("cpu"))["acc1"]


def fmt(vals):
    if len(vals) == 1:
        return f"{vals[0]:.1f}"
    return f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-file", default="/tmp/dense_digits.pth")
    ap.add_argument("--data-set", default="DIGITS")
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--criterion-batches", type=int, default=4)
    ap.add_argument("--tune-size", type=int, default=512, help="training images (not used by the criterion) for tuning")
    ap.add_argument("--random-seeds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0, help="shuffle seed of the criterion batches")
    ap.add_argument("--sweep", action="store_true", help="also sweep the criterion's options")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, _ = models.load_model_file(args.model_file)
    model.eval()
    dargs = types.SimpleNamespace(data_set=args.data_set, input_size=args.input_size, reprob=0.0)
    train_plain, _ = datasets.build_dataset(True, dargs, train_transform=False)
    val, _ = datasets.build_dataset(False, dargs)
    g = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(len(train_plain), generator=g).tolist()
    n_crit = args.criterion_batches * args.batch_size
    crit = torch.utils.data.Subset(train_plain, perm[:n_crit])
    tune = torch.utils.data.Subset(train_plain, perm[n_crit:n_crit + args.tune_size])
    dims = pruning.model_dims(model)
    dense = evaluate(model, dims, dc.rank_model(model, [], criterion="magnitude"), 0.0, 0.0, val)
    print(f"model {args.model_file}: dense val top-1 {dense:.1f} ({len(val)} images); criterion on "
          f"{args.criterion_batches} x {args.batch_size} training images; tune split {len(tune)} other training images")

    def loader(nb):
        return torch.utils.data.DataLoader(torch.utils.data.Subset(crit, range(nb * args.batch_size)),
                                           batch_size=args.batch_size)

    stats_cache = {}

    def stats(nb, bw):
        if (nb, bw) not in stats_cache:
            stats_cache[(nb, bw)] = dc.hsic_statistics(model, loader(nb), num_batches=nb, bandwidth=bw)
        return stats_cache[(nb, bw)]

    def hsic_rank(nb=args.criterion_batches, bw=dc.DEFAULT_BANDWIDTH, lam=dc.DEFAULT_HEAD_LAMBDA,
                  alpha=dc.DEFAULT_NEURON_ALPHA, norm=dc.DEFAULT_HEAD_NORMALIZE):
        return dc.rank_components(dc.scores_from_statistics(stats(nb, bw), lam, alpha, norm))

    settings = [("50% heads + 50% neurons", 0.5, 0.5), ("25% heads + 25% neurons", 0.25, 0.25),
                ("50% heads only", 0.5, 0.0), ("50% neurons only", 0.0, 0.5)]
    d = dc
    rows = [
        (f"hsic (defaults: {d.DEFAULT_BANDWIDTH} bandwidth, lambda {d.DEFAULT_HEAD_LAMBDA}, "
         f"head_normalize {d.DEFAULT_HEAD_NORMALIZE}, alpha {d.DEFAULT_NEURON_ALPHA}, "
         f"{args.criterion_batches} batches)",
         [hsic_rank()]),
        ("hsic, paper options (multi bandwidth, lambda 0.1, alpha 0.1, 1 batch)",
         [hsic_rank(nb=1, bw="multi", lam=0.1, alpha=0.1, norm=False)]),
        ("hsic relevance only (lambda 0, alpha 1)", [hsic_rank(lam=0.0, alpha=1.0, norm=False)]),
        ("mean |activation| only for neurons (alpha 0)", [hsic_rank(alpha=0.0)]),
        ("magnitude (weights)", [dc.rank_model(model, [], criterion="magnitude")]),
        (f"random ({args.random_seeds} seeds, mean ± sd)",
         [dc.rank_model(model, [], criterion="random", seed=s) for s in range(args.random_seeds)]),
    ]
    print("\nval top-1 (%) after pruning every block, no finetuning\n")
    print("| ranking | " + " | ".join(s[0] for s in settings) + " |")
    print("|---|" + "---|" * len(settings))
    for name, ranks in rows:
        cells = [fmt([evaluate(model, dims, r, h, n, val) for r in ranks]) for _, h, n in settings]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)

    if not args.sweep:
        return
    print("\nsweep: top-1 on the tune split / on val (choose on tune)\n")
    print("| option | heads 50% (tune / val) | neurons 50% (tune / val) | both 50% (tune / val) |")
    print("|---|---|---|---|")

    def line(label, r):
        cells = []
        for h, n in ((0.5, 0.0), (0.0, 0.5), (0.5, 0.5)):
            cells.append(f"{evaluate(model, dims, r, h, n, tune):.1f} / {evaluate(model, dims, r, h, n, val):.1f}")
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)

    for nb in sorted({1, args.criterion_batches}):
        for bw in dc.BANDWIDTHS:
            for lam in (0.0, 0.1, 1.0):
                for norm in (False, True):
                    if lam == 0.0 and norm:
                        continue  # normalisation then only rescales relevance: same as norm relevance below
                    line(f"batches {nb}, {bw}, lambda {lam}, head_normalize {norm}, alpha 0.1",
                         hsic_rank(nb, bw, lam, 0.1, norm))
            line(f"batches {nb}, {bw}, relevance/sqrt(self) only (lambda 0, normalised)",
                 hsic_rank(nb, bw, 0.0, 0.1, True))
            for alpha in (0.0, 0.5, 1.0):
                line(f"batches {nb}, {bw}, lambda 0.1, alpha {alpha}", hsic_rank(nb, bw, 0.1, alpha, False))


if __name__ == "__main__":
    main()
