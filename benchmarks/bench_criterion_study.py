"""Criterion study: how well each ranking of heads and MLP neurons keeps a trained
model's accuracy when the lowest-ranked components are removed, with no finetuning.

    python benchmarks/bench_criterion_study.py --model-file /work/ablation_out/dense/best.pth \
        --data-set CLUTTERED_DIGITS --out /work/criterion_study
    python benchmarks/bench_criterion_study.py --model-file output/digits/dense/checkpoint.pth \
        --data-set DIGITS --out /work/criterion_study_digits
    python benchmarks/bench_criterion_study.py ... --table          # only print the tables

Every block loses the same fraction of heads and/or neurons (pruning.uniform_policy, neuron counts
rounded to --round-to). Shapes: 1 head per block, half the heads, 25% and 50% of the neurons, and
two budgets matched in GMACs: 40% fewer (1 head per block + the neuron ratio that meets it) and 60%
fewer (half the heads + neurons). Each ranking is computed on --calib-sets calibration sets:
--criterion-batches x --batch-size un-augmented training images drawn with seed k from the training
images outside a fixed tune split (--tune-size images). Reported: val top-1 (mean +- sd over the
calibration sets) and top-1 on the tune split (the column that choices are made on), and each
ranking's stability: the mean Spearman correlation of its scores between calibration sets (per
block, averaged over blocks), for heads and for neurons. And each ranking's agreement with an oracle
for heads: the increase of the tune split's cross-entropy when that one head alone is removed
(leave-one-out, computed once, OUT/oracle.json); the mean Spearman rho between a ranking's head
scores and that increase, per block, averaged over blocks and calibration sets.

Resumable: one JSON line per (ranking, calibration set) in OUT/study.jsonl; finished lines are
skipped. The Markdown tables go to stdout and OUT/study.md.
"""
import argparse
import itertools
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

import datasets  # noqa: E402
import dependency_criterion as dc  # noqa: E402
import engine  # noqa: E402
import flops  # noqa: E402
import models  # noqa: E402
import pruning  # noqa: E402
import utils  # noqa: E402

# name -> compute_scores keyword arguments ("num_batches" is filled in from --criterion-batches
# unless given; "seed" is the calibration set's)
RANKINGS = {
    "hsic": {},  # this project's defaults
    "hsic_paper_form": {"kernel": "scaled", "bandwidth": "multi", "head_normalize": False, "num_batches": 1},
    "hsic_original": dict(dc.original_criterion_kwargs()),
    # candidate improvements: size terms measured as the contribution to the residual stream
    "hsic_contrib": {"magnitude": "contribution"},
    "hsic_contrib_heads05": {"magnitude": "contribution", "head_alpha": 0.5},
    "hsic_contrib_heads01": {"magnitude": "contribution", "head_alpha": 0.1},
    "hsic_taylor01": {"magnitude": "taylor", "head_alpha": 0.1},
    "hsic_taylor03": {"magnitude": "taylor", "head_alpha": 0.3, "neuron_alpha": 0.3},
    # the size terms alone (no dependency at all): what the dependency adds on top of them
    "contribution_only": {"magnitude": "contribution", "head_alpha": 0.0, "neuron_alpha": 0.0},
    "magnitude": {"criterion": "magnitude"},
    "taylor": {"criterion": "taylor"},
    "random": {"criterion": "random"},
}


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-file", required=True,
                   help="dense model or training checkpoint (any format models.load reads)")
    p.add_argument("--data-set", default="CLUTTERED_DIGITS", choices=["DIGITS", "CLUTTERED_DIGITS"])
    p.add_argument("--out", required=True, help="output folder (keep it out of git)")
    p.add_argument("--rankings", default=",".join(RANKINGS), help=f"comma-separated, of {','.join(RANKINGS)}")
    p.add_argument("--calib-sets", type=int, default=5)
    p.add_argument("--criterion-batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--tune-size", type=int, default=500)
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--table", action="store_true", help="only print the tables of OUT/study.jsonl")
    return p


def neuron_ratio_for(dims, head, reduction, round_to):
    """The neuron ratio that, with ``head`` in every block and no token reduction, removes
    ``reduction`` of the dense GMACs (bisection on flops.policy_gmacs)."""
    depth = dims["depth"]
    dense = float(flops.policy_gmacs(dims, np.zeros(2 * depth + 1), round_to))

    def gm(n):
        return float(flops.policy_gmacs(dims, np.array([head] * depth + [n] * depth + [0.0]), round_to))
    lo, hi = 0.0, 0.95
    if gm(hi) > dense * (1 - reduction):
        raise SystemExit(f"{100 * reduction:.0f}% fewer GMACs is out of reach with head ratio {head}")
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gm(mid) > dense * (1 - reduction) else (lo, mid)
    return hi, gm(hi) / dense


def shapes_of(dims, round_to):
    heads = dims["num_heads"][0]
    one = 1.0 / heads
    n40, f40 = neuron_ratio_for(dims, one, 0.4, round_to)
    n60, f60 = neuron_ratio_for(dims, 0.5, 0.6, round_to)
    return [("1 head/block", one, 0.0), ("half the heads", 0.5, 0.0), ("25% neurons", 0.0, 0.25),
            ("50% neurons", 0.0, 0.5), (f"-40% GMACs (1 head + {100 * n40:.0f}% neurons)", one, n40),
            (f"-60% GMACs (half heads + {100 * n60:.0f}% neurons)", 0.5, n60)]


def splits(train_plain, tune_size, calib_sets, n_calib):
    """(tune indices, [calibration indices per set]): the tune split is fixed; calibration set k
    is a seeded draw (seed k) from the rest."""
    perm = torch.randperm(len(train_plain), generator=torch.Generator().manual_seed(12345)).tolist()
    tune, rest = perm[:tune_size], perm[tune_size:]
    calib = []
    for k in range(calib_sets):
        order = torch.randperm(len(rest), generator=torch.Generator().manual_seed(k)).tolist()
        calib.append([rest[i] for i in order[:n_calib]])
    return tune, calib


def mean_sd(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}"


def stability(score_sets, key):
    """Mean Spearman rho of one ranking's scores between calibration sets (per block, then averaged)."""
    rhos = []
    for a, b in itertools.combinations(score_sets, 2):
        for sa, sb in zip(a[key], b[key]):
            if len(sa) > 2 and np.std(sa) > 0 and np.std(sb) > 0:
                rhos.append(spearmanr(sa, sb).correlation)
    return statistics.mean(rhos) if rhos else None


def head_oracle(model, dims, loader, round_to, path):
    """Per block, per head: tune cross-entropy with that head alone removed minus the dense one."""
    if os.path.exists(path):
        return json.load(open(path))
    cpu = torch.device("cpu")
    depth = dims["depth"]
    base = engine.evaluate(loader, model, cpu)["loss"]
    oracle = []
    for b in range(depth):
        H = dims["num_heads"][b]
        row = []
        for h in range(H):
            policy = pruning.uniform_policy(depth)
            policy["head"][b] = 1.0 / H
            ranks = {"heads": [[h] + [j for j in range(dims["num_heads"][c]) if j != h] if c == b
                               else list(range(dims["num_heads"][c])) for c in range(depth)],
                     "neurons": [list(range(m)) for m in dims["mlp_hidden"]]}
            pruned = pruning.slice_model(model, policy, ranks, round_to)
            row.append(engine.evaluate(loader, pruned, cpu)["loss"] - base)
        oracle.append(row)
    utils.write_json_atomic(path, oracle)
    return oracle


def oracle_agreement(score_sets, oracle):
    rhos = []
    for scores in score_sets:
        for s, o in zip(scores["heads"], oracle):
            if len(s) > 2 and np.std(s) > 0:
                rhos.append(spearmanr(s, o).correlation)
    return statistics.mean(rhos) if rhos else None


def write_tables(out, rows, dense_row, oracle=None):
    names = list(dict.fromkeys(r["ranking"] for r in rows))
    shapes = list(dict.fromkeys(s for r in rows for s in r["val"]))
    lines = [f"dense: val top-1 {dense_row['val']:.2f}, tune top-1 {dense_row['tune']:.2f} "
             f"({dense_row['n_val']} val images, {dense_row['n_tune']} tune images)", ""]
    for split in ("val", "tune"):
        lines += [f"{split} top-1 (%), no finetuning, mean ± sd over calibration sets", "",
                  "| ranking | sets | " + " | ".join(shapes) + " |", "|---|---|" + "---|" * len(shapes)]
        for name in names:
            mine = [r for r in rows if r["ranking"] == name]
            lines.append(f"| {name} | {len(mine)} | " + " | ".join(mean_sd([r[split].get(s) for r in mine])
                                                                 for s in shapes) + " |")
        lines.append("")
    lines += ["stability: mean Spearman rho of the scores between calibration sets; agreement: mean Spearman rho "
              "of the head scores with the leave-one-head-out increase of the tune loss", "",
              "| ranking | stability, heads | stability, neurons | head agreement with the oracle |",
              "|---|---|---|---|"]
    show = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for name in names:
        mine = [r["scores"] for r in rows if r["ranking"] == name]
        agree = oracle_agreement(mine, oracle) if oracle else None
        lines.append(f"| {name} | {show(stability(mine, 'heads'))} | {show(stability(mine, 'neurons'))} | "
                     f"{show(agree)} |")
    text = "\n".join(lines)
    with open(os.path.join(out, "study.md"), "w") as f:
        f.write(text + "\n")
    print(text)


def main(argv=None):
    a = get_parser().parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "study.jsonl")
    done = utils.read_jsonl(path)
    dense_rows = [r for r in done if r.get("ranking") == "dense"]
    rows = [r for r in done if r.get("ranking") != "dense"]
    oracle_path = os.path.join(a.out, "oracle.json")
    if a.table:
        write_tables(a.out, rows, dense_rows[0], json.load(open(oracle_path)) if os.path.exists(oracle_path) else None)
        return
    torch.set_num_threads(a.threads)
    cpu = torch.device("cpu")
    model, arch, _ = models.load(a.model_file, device=cpu)
    model.eval()
    cfg = datasets.DataConfig(data_set=a.data_set, input_size=arch["input_size"], batch_size=a.batch_size)
    train_plain, _ = datasets.build_dataset(True, cfg, train_transform=False)
    val, _ = datasets.build_dataset(False, cfg)
    tune_idx, calib = splits(train_plain, a.tune_size, a.calib_sets, a.criterion_batches * a.batch_size)

    def loader(ds, idx=None):  # evaluation: fixed order, large batches
        ds = torch.utils.data.Subset(ds, idx) if idx is not None else ds
        return torch.utils.data.DataLoader(ds, batch_size=256)
    val_loader, tune_loader = loader(val), loader(train_plain, tune_idx)
    dims = pruning.model_dims(model)
    shapes = shapes_of(dims, a.round_to)
    if not dense_rows:
        dense_row = {"ranking": "dense", "val": engine.evaluate(val_loader, model, cpu)["acc1"],
                     "tune": engine.evaluate(tune_loader, model, cpu)["acc1"], "n_val": len(val),
                     "n_tune": len(tune_idx), "model_file": os.path.abspath(a.model_file)}
        utils.append_jsonl(path, dense_row)
        dense_rows = [dense_row]
    elif dense_rows[0]["model_file"] != os.path.abspath(a.model_file):
        raise SystemExit(f"{path} was made from {dense_rows[0]['model_file']}; use another --out")
    todo = [(n, k) for n in a.rankings.split(",") for k in range(a.calib_sets)
            if not any(r["ranking"] == n and r["calib"] == k for r in rows)]
    t0 = time.time()
    for i, (name, k) in enumerate(todo):
        kw = dict(RANKINGS[name])
        kw.setdefault("num_batches", a.criterion_batches)
        kw["seed"] = k
        crit = torch.utils.data.DataLoader(torch.utils.data.Subset(train_plain, calib[k]), batch_size=a.batch_size)
        t = time.time()
        scores = dc.compute_scores(model, crit, **kw)
        rank_s = time.time() - t
        rankings = dc.rank_components(scores)
        row = {"ranking": name, "calib": k, "rank_seconds": rank_s, "val": {}, "tune": {},
               "scores": {key: [s.tolist() for s in scores[key]] for key in ("heads", "neurons")}}
        for label, h, n in shapes:
            pruned = pruning.slice_model(model, pruning.uniform_policy(dims["depth"], h, n), rankings, a.round_to)
            row["val"][label] = engine.evaluate(val_loader, pruned, cpu)["acc1"]
            row["tune"][label] = engine.evaluate(tune_loader, pruned, cpu)["acc1"]
        utils.append_jsonl(path, row)
        rows.append(row)
        eta = (time.time() - t0) / (i + 1) * (len(todo) - i - 1)
        print(f"[{i + 1}/{len(todo)}] {name} calib {k}: val " + ", ".join(f"{v:.1f}" for v in row["val"].values())
              + f" (eta {utils.format_seconds(eta)})", file=sys.stderr, flush=True)
    oracle = head_oracle(model, dims, tune_loader, a.round_to, oracle_path)
    write_tables(a.out, rows, dense_rows[0], oracle)


if __name__ == "__main__":
    main()
