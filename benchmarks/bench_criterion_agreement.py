"""How far apart are the original's HSIC criterion and ours? Spearman rank correlation of the
per-block head and neuron scores of a trained model, and val top-1 after removing the lowest-ranked
components (no finetuning).

    python benchmarks/bench_criterion_agreement.py --model-file output/digits/dense/checkpoint.pth

Criteria compared (all on the same fixed shuffle of un-augmented training images, eval mode, so
only the kernel and the score formula differ):
  original   kernel="original" (raw features, bandwidths 1..16 averaged, no length scaling),
             unnormalised heads, lambda 0.1, alpha 0.1, 1 batch (dc.original_criterion_kwargs()
             without train mode: the digits recipe has no dropout or drop-path, so train mode
             would change nothing but batch-norm-free timm ViTs' flags)
  paper-form kernel="scaled", bandwidth="multi" (standardised, length-scaled), unnormalised,
             1 batch: what README called "the paper's form" before
  default    kernel="scaled", bandwidth="median", normalised heads, --criterion-batches batches
Rho is computed per block and averaged over blocks (a block with 4 heads gives a coarse rho).
"""
import argparse
import copy
import os
import sys
import types

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import datasets  # noqa: E402
import dependency_criterion as dc  # noqa: E402
import engine  # noqa: E402
import models  # noqa: E402
import pruning  # noqa: E402


def mean_rho(a, b):
    return float(np.mean([spearmanr(x.numpy(), y.numpy())[0] for x, y in zip(a, b)]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-file", required=True)
    ap.add_argument("--data-set", default="DIGITS")
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--criterion-batches", type=int, default=4)
    ap.add_argument("--tune-size", type=int, default=512, help="training images (not used by the criterion) "
                    "on which pruned models are also scored")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, _ = models.load_model_file(args.model_file)
    model.eval()
    dargs = types.SimpleNamespace(data_set=args.data_set, input_size=args.input_size, reprob=0.0)
    train_plain, _ = datasets.build_dataset(True, dargs, train_transform=False)
    val, _ = datasets.build_dataset(False, dargs)
    perm = torch.randperm(len(train_plain), generator=torch.Generator().manual_seed(args.seed)).tolist()
    crit = torch.utils.data.Subset(train_plain, perm[:args.criterion_batches * args.batch_size])
    loader = torch.utils.data.DataLoader(crit, batch_size=args.batch_size)
    n_crit = len(crit)
    tune = torch.utils.data.Subset(train_plain, perm[n_crit:n_crit + args.tune_size])

    orig_kw = dc.original_criterion_kwargs()
    orig_kw["train_mode"] = False
    scores = {
        "original": dc.compute_scores(model, loader, **orig_kw),
        "paper-form": dc.compute_scores(model, loader, num_batches=1, bandwidth="multi", head_normalize=False),
        "default": dc.compute_scores(model, loader, num_batches=args.criterion_batches),
    }
    dims = pruning.model_dims(model)
    val_loader = torch.utils.data.DataLoader(val, batch_size=512)
    tune_loader = torch.utils.data.DataLoader(tune, batch_size=512)
    print(f"model {args.model_file}; {len(val)} val images; dense val top-1 "
          f"{engine.evaluate(val_loader, model, torch.device('cpu'))['acc1']:.2f}")
    print("| pair | head rho (mean over blocks) | neuron rho (mean over blocks) |")
    print("|---|---|---|")
    for a, b in (("original", "paper-form"), ("original", "default"), ("paper-form", "default")):
        print(f"| {a} vs {b} | {mean_rho(scores[a]['heads'], scores[b]['heads']):+.2f} | "
              f"{mean_rho(scores[a]['neurons'], scores[b]['neurons']):+.2f} |")
    print()
    print(f"top-1 % after removing the lowest-ranked components, no finetuning: val / tune split "
          f"({len(tune)} training images the criterion did not see)")
    print("| ranking | 50% heads + 50% neurons | 25% + 25% | 50% heads only | 50% neurons only |")
    print("|---|---|---|---|---|")
    for name, s in scores.items():
        rankings = dc.rank_components(s)
        row = []
        for head, neuron in ((0.5, 0.5), (0.25, 0.25), (0.5, 0.0), (0.0, 0.5)):
            spec = pruning.policy_to_spec(pruning.uniform_policy(dims["depth"], head=head, neuron=neuron),
                                          rankings, dims)
            pruned = pruning.apply_spec(copy.deepcopy(model), spec)
            row.append(f"{engine.evaluate(val_loader, pruned, torch.device('cpu'))['acc1']:.1f} / "
                       f"{engine.evaluate(tune_loader, pruned, torch.device('cpu'))['acc1']:.1f}")
        print(f"| {name} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
