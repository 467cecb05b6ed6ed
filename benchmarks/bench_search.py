"""EI search against random search with the same number of evaluations, on a dense digits model.

    python benchmarks/bench_search.py --resume output/digits/dense/checkpoint.pth \
        --reductions 0.4,0.6 --seeds 0,1,2 --out /tmp/bench_search

For each reduction, seed and mode it runs ``main.py --search`` (in-process), then prints a table:
best top-1 on the search split, val top-1 of the best policy before finetuning, and the share of
the search's wall-clock spent in GP fitting + EI.
"""
import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--resume", required=True, help="dense checkpoint (digits)")
    p.add_argument("--reductions", default="0.4,0.6")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--modes", default="ei,random")
    p.add_argument("--out", default="/tmp/bench_search")
    p.add_argument("extra", nargs="*", help="more main.py flags, after --")
    a = p.parse_args()
    import main as cli_main

    rows = []
    for r in [float(x) for x in a.reductions.split(",")]:
        for seed in [int(s) for s in a.seeds.split(",")]:
            for mode in a.modes.split(","):
                out = os.path.join(a.out, f"r{round(100 * r)}_s{seed}_{mode}")
                argv = ["--search", "--resume", a.resume, "--search-reduction", str(r), "--seed", str(seed),
                        "--search-mode", mode, "--output_dir", out, "--log-every", "1000"] + a.extra
                t0 = time.time()
                code = cli_main.cli(argv)
                if code != 0:
                    raise SystemExit(f"search failed: {' '.join(argv)}")
                with open(os.path.join(out, "search", "best_policy.json")) as f:
                    best = json.load(f)
                rows.append({"reduction": r, "seed": seed, "mode": mode, "search_acc1": best["search_acc1"],
                             "val_acc1": best["val_acc1_before_finetune"], "gmacs": best["gmacs"],
                             "evaluations": best["evaluations"], "gp_share": best["gp_share"],
                             "seconds": round(time.time() - t0, 1)})
                print(json.dumps(rows[-1]), flush=True)

    print("\n| GMACs removed | mode | best search-split top-1 (mean ± sd over seeds) | "
          "val top-1 of best, before finetune | GP+EI share of search time |")
    print("|---|---|---|---|---|")
    for r in sorted({x["reduction"] for x in rows}):
        for mode in a.modes.split(","):
            sel = [x for x in rows if x["reduction"] == r and x["mode"] == mode]
            s = [x["search_acc1"] for x in sel]
            v = [x["val_acc1"] for x in sel]
            g = [x["gp_share"] for x in sel if x["gp_share"] is not None]  # None for random search
            sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0
            share = f"{100 * statistics.mean(g):.1f}%" if g else "-"
            print(f"| {100 * r:.0f}% | {mode} | {statistics.mean(s):.2f} ± {sd(s):.2f} | "
                  f"{statistics.mean(v):.2f} ± {sd(v):.2f} | {share} |")
    with open(os.path.join(a.out, "bench_search.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
