"""EI search against random search with the same number of evaluations, on a dense digits model.

    python benchmarks/bench_search.py --resume output/digits/dense/checkpoint.pth \
        --reductions 0.4,0.6 --seeds 0,1,2

Calls the library directly (the same functions ``main.py --search`` composes): rank the dense
model once per seed, then for each reduction, seed and mode run ``expected_improvement.run_search``
scoring candidates on a stratified hold-out of the training set. Prints a table: best top-1 on the
search split, val top-1 of the best policy before finetuning, and the share of the search's time
spent in GP fitting + EI.
"""
import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import datasets  # noqa: E402
import dependency_criterion as dc  # noqa: E402
import engine  # noqa: E402
import expected_improvement as ei  # noqa: E402
import flops  # noqa: E402
import models  # noqa: E402
import pruning  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--resume", required=True, help="dense model file (digits)")
    p.add_argument("--reductions", default="0.4,0.6")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--modes", default="ei,random")
    p.add_argument("--population", type=int, default=20)
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--pool", type=int, default=1000)
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--out", default="/tmp/bench_search")
    a = p.parse_args()
    cpu = torch.device("cpu")
    dense, arch, _ = models.load(a.resume)
    cfg = datasets.DataConfig(data_set="DIGITS", input_size=arch["input_size"], batch_size=64)
    train_plain, _ = datasets.build_dataset(True, cfg, train_transform=False)
    val = datasets.build_loaders(cfg, distributed=False, train=False)["val"]
    dims = pruning.model_dims(dense)
    dense_gmacs = flops.model_macs(dense)["macs"] / 1e9
    os.makedirs(a.out, exist_ok=True)

    rows = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        calibration = datasets.criterion_loader(train_plain, dataclasses.replace(cfg, seed=seed), num_batches=4)
        rankings = dc.rank_model(dense, calibration)
        split, _ = datasets.search_split(train_plain, None, seed=seed)
        held = datasets.split_loader(split, cfg, distributed=False)

        def evaluate(x):
            model = pruning.slice_model(dense, pruning.policy_from_vector(x, dims["depth"]), rankings, a.round_to)
            return engine.evaluate(held, model, cpu)["acc1"]
        for r in [float(x) for x in a.reductions.split(",")]:
            sampler = ei.FeasibleSampler(lambda X: flops.policy_gmacs(dims, X, round_to=a.round_to),
                                         dense_gmacs * (1 - r), dim=2 * dims["depth"] + 1, upper=0.5)
            for mode in a.modes.split(","):
                t0 = time.time()
                res = ei.run_search(evaluate, sampler, a.population, a.iterations, seed=seed, mode=mode,
                                    pool_size=a.pool, refine_per_point=max(20, a.pool // 20))
                best = pruning.slice_model(dense, pruning.policy_from_vector(res["best_x"], dims["depth"]),
                                           rankings, a.round_to)
                spent = sum(h["seconds"] for h in res["history"])
                rows.append({"reduction": r, "seed": seed, "mode": mode, "search_acc1": res["best_y"],
                             "val_acc1": engine.evaluate(val, best, cpu)["acc1"],
                             "gmacs": flops.model_macs(best)["macs"] / 1e9, "evaluations": len(res["history"]),
                             "gp_share": res["gp_seconds"] / spent if mode == "ei" and spent > 0 else None,
                             "seconds": round(time.time() - t0, 1)})
                print(json.dumps(rows[-1]), flush=True)

    print("\n| GMACs removed | mode | best search-split top-1 (mean ± sd over seeds) | "
          "val top-1 of best, before finetune | GP+EI share of search time |")
    print("|---|---|---|---|---|")
    sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
    for r in sorted({x["reduction"] for x in rows}):
        for mode in a.modes.split(","):
            sel = [x for x in rows if x["reduction"] == r and x["mode"] == mode]
            s, v = [x["search_acc1"] for x in sel], [x["val_acc1"] for x in sel]
            g = [x["gp_share"] for x in sel if x["gp_share"] is not None]  # None for random search
            share = f"{100 * statistics.mean(g):.1f}%" if g else "-"
            print(f"| {100 * r:.0f}% | {mode} | {statistics.mean(s):.2f} ± {sd(s):.2f} | "
                  f"{statistics.mean(v):.2f} ± {sd(v):.2f} | {share} |")
    with open(os.path.join(a.out, "bench_search.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
