"""Ablation of the method on CLUTTERED_DIGITS: each part against the simpler thing.

    python benchmarks/bench_ablation.py --out /work/ablation_out                 # everything
    python benchmarks/bench_ablation.py --out /work/ablation_out --budgets 0.6 --seeds 0 --only ours,uniform
    python benchmarks/bench_ablation.py --out /work/ablation_out --table         # only print the table

One dense vit_nano_d6_patch8_64 (64 px) is trained once with main.py's CLUTTERED_DIGITS recipe
(30 epochs, batch 64, AdamW, base lr 1e-2 x batch/512, 1 warm-up epoch, cosine to 1e-5, weight decay
0.05, label smoothing 0.1) into OUT/dense, or taken from --dense FILE. Then, for every budget
(fraction of the dense GMACs removed) x seed x variant, the script builds a compressed model, records
its val top-1 before finetuning, finetunes it with main.py's finetuning recipe (6 epochs, base lr
2e-3 x batch/512, soft distillation from the dense model, alpha 0.5, tau 1) and records val top-1
after, GMACs, parameters, images/s (interleaved with the dense model, batch 256) and search time.

Variants (all at the same budget, same dense model, same finetuning; rankings per seed):
  ours              HSIC rankings (defaults), GP-EI over per-block head and neuron ratios + token rate
                    (max ratio 0.5, like main.py --search)
  uniform           one ratio h for heads AND neurons in every block with a token rate t: for each t
                    in {0, 0.1, 0.2, 0.3}, h is found by bisection on the GMACs (h in [0, 0.95]);
                    the t's whose h meets the budget (+-tol) are scored on the search hold-out with
                    the search objective and the best is kept (at most 4 hold-out evaluations)
  no_tokens         as ours with the token dimension off (FeasibleSampler active mask); when the
                    budget is unreachable at max ratio 0.5 the max ratio is raised to the first of
                    0.6, 0.7, 0.8, 0.9 that reaches it (recorded as max_ratio)
  tokens_only       heads and neurons kept, token rate found by bisection in [0, 0.99]; an
                    unreachable budget takes the closest reachable rate (budget_met false)
  random_search     as ours, but every policy drawn at random (the same number of evaluations)
  taylor, magnitude, random_criterion
                    as ours, with the taylor / magnitude / random rankings instead of HSIC

Search: --population random feasible policies then --iterations EI steps (20 + 30 by default), each
scored with --search-objective (acc by default) on a stratified hold-out (--holdout images) of the
un-augmented training set (one fixed composition per image; never the validation set), neuron counts
rounded to multiples of --round-to. The seed sets the hold-out, the criterion batches, the search's
random draws and the finetuning's data order.

Resumable: one JSON line per (budget, variant, seed) in OUT/ablation.jsonl; keys already there are
skipped. Inside a unit, the search log (OUT/runs/KEY/search_log.jsonl) and the finetuning checkpoint
(OUT/runs/KEY/finetune/checkpoint.pth) are resumed too, so a kill loses at most one evaluation or
one epoch. The dense training resumes from OUT/dense/checkpoint.pth. Rerunning with other settings
against the same OUT is refused for the dense model and reported (a warning) for finished rows.
Progress (with ETAs) goes to stderr and OUT/log.txt; the Markdown table to stdout and OUT/ablation.md.
"""
import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import datasets  # noqa: E402
import dependency_criterion as dc  # noqa: E402
import engine  # noqa: E402
import expected_improvement as ei  # noqa: E402
import flops  # noqa: E402
import models  # noqa: E402
import pruning  # noqa: E402
import utils  # noqa: E402

logger = logging.getLogger("vitcompress")

DATA_SET = "CLUTTERED_DIGITS"
MODEL = "vit_nano_d6_patch8_64"
INPUT_SIZE = 64
NUM_CLASSES = 10
VARIANTS = ("ours", "uniform", "no_tokens", "tokens_only", "random_search", "taylor", "magnitude",
            "random_criterion")
# variant -> (criterion, search mode, which dimensions are searched (heads, neurons, tokens))
SEARCHED = {"ours": ("hsic", "ei", (1, 1, 1)), "no_tokens": ("hsic", "ei", (1, 1, 0)),
            "random_search": ("hsic", "random", (1, 1, 1)), "taylor": ("taylor", "ei", (1, 1, 1)),
            "magnitude": ("magnitude", "ei", (1, 1, 1)), "random_criterion": ("random", "ei", (1, 1, 1))}
UNIFORM_TOKEN_RATES = (0.0, 0.1, 0.2, 0.3)
NO_TOKENS_MAX_RATIOS = (0.5, 0.6, 0.7, 0.8, 0.9)
UNIFORM_MAX_RATIO, TOKENS_ONLY_MAX_RATE = 0.95, 0.99


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (keep it out of git)")
    p.add_argument("--dense", default=None, help="dense model file to compress (default: train one into OUT/dense)")
    p.add_argument("--budgets", default="0.4,0.6", help="fractions of the dense GMACs removed, comma-separated")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--only", default=",".join(VARIANTS), help=f"variants to run, in this order: {','.join(VARIANTS)}")
    p.add_argument("--table", action="store_true", help="only print the table of OUT/ablation.jsonl")
    p.add_argument("--objective-study", type=int, default=0, metavar="N",
                   help="instead of the ablation: N random feasible policies at the first budget (seed 0 hold-out "
                        "and HSIC rankings), each scored by acc, loss and kl, finetuned --study-epochs, and "
                        "the rank correlation of each score with val top-1 (OUT/objective_study.jsonl)")
    p.add_argument("--study-epochs", type=int, default=1, help="finetuning epochs per policy of --objective-study")
    g = p.add_argument_group("dense model (main.py's CLUTTERED_DIGITS recipe)")
    g.add_argument("--dense-epochs", type=int, default=30)
    g.add_argument("--dense-lr", type=float, default=1e-2, help="base lr, scaled by batch / 512")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--dense-seed", type=int, default=0)
    g = p.add_argument_group("search")
    g.add_argument("--population", type=int, default=20, help="random feasible policies first")
    g.add_argument("--iterations", type=int, default=30, help="EI (or random) steps after them")
    g.add_argument("--pool", type=int, default=1000, help="feasible candidates EI scores per step")
    g.add_argument("--holdout", type=int, default=1000, help="search hold-out: un-augmented training images")
    g.add_argument("--search-objective", default="acc", choices=list(engine.SEARCH_OBJECTIVES))
    g.add_argument("--round-to", type=int, default=8)
    g.add_argument("--max-ratio", type=float, default=0.5, help="upper bound of every searched ratio")
    g.add_argument("--tol", type=float, default=0.02, help="relative GMACs tolerance of the budget")
    g.add_argument("--criterion-batches", type=int, default=4)
    g = p.add_argument_group("finetuning (main.py's prune+finetune recipe)")
    g.add_argument("--finetune-epochs", type=int, default=6)
    g.add_argument("--finetune-lr", type=float, default=2e-3, help="base lr, scaled by batch / 512")
    g = p.add_argument_group("measurement and smoke runs")
    g.add_argument("--throughput-batch", type=int, default=256)
    g.add_argument("--throughput-rounds", type=int, default=3)
    g.add_argument("--monitor-val", type=int, default=540,
                   help="val images (every k-th) evaluated after each training epoch, for the logs only; "
                        "the recorded figures always use --val-limit (all 5,400 by default)")
    g.add_argument("--val-limit", type=int, default=None,
                   help="evaluate on every k-th val image, N in all (smoke runs)")
    g.add_argument("--max-steps", type=int, default=None, help="cap training steps per epoch (smoke runs)")
    g.add_argument("--threads", type=int, default=2)
    return p


# ----------------------------------------------------------------------------- small helpers

def floats(text):
    return [float(x) for x in str(text).split(",") if x.strip()]


def unit_key(budget, variant, seed):
    return f"{budget:g}|{variant}|{seed}"


def strided(dataset, n):
    """Every k-th image, n in all (the validation set is ordered digit by digit: this keeps the classes)."""
    if n is None or n >= len(dataset):
        return dataset
    step = len(dataset) / n
    return torch.utils.data.Subset(dataset, [int(i * step) for i in range(n)])


def loader_of(dataset, cfg):
    return datasets.make_loader(dataset, torch.utils.data.SequentialSampler(dataset), int(1.5 * cfg.batch_size), cfg)


def mean_sd(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def settings_of(a, dense_file):
    """What a row's numbers depend on besides (budget, variant, seed)."""
    return {"dense": os.path.abspath(dense_file), "population": a.population, "iterations": a.iterations,
            "pool": a.pool, "holdout": a.holdout, "objective": a.search_objective, "round_to": a.round_to,
            "max_ratio": a.max_ratio, "tol": a.tol, "criterion_batches": a.criterion_batches,
            "finetune_epochs": a.finetune_epochs, "finetune_lr": a.finetune_lr, "batch_size": a.batch_size,
            "max_steps": a.max_steps, "val_limit": a.val_limit}


def recipe(a, epochs, base_lr, seed, distillation):
    """main.py's DIGITS/CLUTTERED_DIGITS recipe (make_recipe with one process)."""
    return engine.Recipe(epochs=epochs, lr=base_lr * a.batch_size / 512.0, weight_decay=0.05, sched="cosine",
                         min_lr=1e-5, warmup_lr=1e-6, warmup_epochs=1, smoothing=0.1, distillation=distillation,
                         distillation_alpha=0.5, distillation_tau=1.0, seed=seed, max_steps=a.max_steps,
                         log_every=50)


# ----------------------------------------------------------------------------- the dense model

def dense_model(a, cpu):
    """(dense model, file): --dense, or OUT/dense trained (or resumed) with the recipe."""
    if a.dense:
        model, arch, _ = models.load(a.dense, num_classes=NUM_CLASSES)
        if arch.get("prune_spec"):
            raise utils.UserError(f"{a.dense} is already compressed; pass a dense model")
        if arch["input_size"] != INPUT_SIZE:
            raise utils.UserError(f"{a.dense} is for {arch['input_size']} px images, not {INPUT_SIZE}")
        logger.info(f"dense model: {a.dense}")
        return model.eval(), a.dense
    run_dir = os.path.join(a.out, "dense")
    final = os.path.join(run_dir, "dense.pth")
    rec = recipe(a, a.dense_epochs, a.dense_lr, a.dense_seed, "none")
    utils.check_run_identity(run_dir, {"model": MODEL, "data_set": DATA_SET, "input_size": INPUT_SIZE,
                                       "recipe": rec.as_dict()}, "dense training")
    if os.path.exists(final):
        model, _, _ = models.load(final)
        logger.info(f"dense model: {final} (trained earlier)")
        return model.eval(), final
    cfg = datasets.DataConfig(data_set=DATA_SET, input_size=INPUT_SIZE, batch_size=a.batch_size, seed=a.dense_seed)
    train = datasets.build_loaders(cfg, distributed=False, val=False)["train"]
    val_set, _ = datasets.build_dataset(False, cfg)
    monitor = loader_of(strided(val_set, a.monitor_val), cfg)
    utils.seed_everything(a.dense_seed)
    mean, std = datasets.data_stats(DATA_SET)
    model = models.build_model(MODEL, num_classes=NUM_CLASSES, img_size=INPUT_SIZE)
    arch = models.model_arch(MODEL, model, INPUT_SIZE, mean, std)
    ckpt_path = os.path.join(run_dir, "checkpoint.pth")
    state = utils.load_checkpoint_file(ckpt_path) if os.path.exists(ckpt_path) else None
    logger.info(f"training the dense {MODEL} on {DATA_SET}: {len(train.dataset)} images per epoch, "
                f"{rec.epochs} epochs, lr {rec.lr:.3g}" + (f", resuming after epoch {state['epoch']}" if state else "")
                + f"; per-epoch val on {len(monitor.dataset)} images")
    engine.fit(model, train, monitor, recipe=rec, num_classes=NUM_CLASSES, arch=arch, resume=state,
               extra={"recipe": rec.as_dict()}, tag="dense", run_dir=run_dir, device=cpu)
    models.save_model_file(final, model, arch, extra={"recipe": rec.as_dict()})
    return model.eval(), final


# ----------------------------------------------------------------------------- one unit

class Bench:
    """What every unit shares: the dense model, its dims and GMACs, val loader, per-seed caches."""

    def __init__(self, a, dense, dense_file, cpu):
        self.a, self.dense, self.dense_file, self.cpu = a, dense, dense_file, cpu
        self.dims = pruning.model_dims(dense)
        self.depth = self.dims["depth"]
        self.dense_gmacs = flops.model_macs(dense)["macs"] / 1e9
        self.dense_params = flops.model_macs(dense)["params"]
        self.cfg = datasets.DataConfig(data_set=DATA_SET, input_size=INPUT_SIZE, batch_size=a.batch_size)
        self.train_plain, _ = datasets.build_dataset(True, self.cfg, train_transform=False)
        val_set, _ = datasets.build_dataset(False, self.cfg)
        self.val = loader_of(strided(val_set, a.val_limit), self.cfg)
        self.monitor = loader_of(strided(val_set, min(a.monitor_val, a.val_limit or a.monitor_val)), self.cfg)
        self._holdout, self._rankings = {}, {}
        self.dense_acc1 = self._dense_val()

    def _dense_val(self):
        path = os.path.join(self.a.out, "dense_val.json")
        ident = {"dense": os.path.abspath(self.dense_file), "mtime": os.path.getmtime(self.dense_file),
                 "val_images": len(self.val.dataset)}
        if os.path.exists(path):
            old = json.load(open(path))
            if {k: old.get(k) for k in ident} == ident:
                return old["acc1"]
        t0 = time.time()
        acc = engine.evaluate(self.val, self.dense, self.cpu)["acc1"]
        utils.write_json_atomic(path, dict(ident, acc1=acc))
        logger.info(f"dense val top-1 {acc:.2f} on {len(self.val.dataset)} images ({time.time() - t0:.0f}s), "
                    f"{self.dense_gmacs:.5f} GMACs, {self.dense_params / 1e6:.3f}M params")
        return acc

    def holdout(self, seed):
        """(loader, dense reference outputs) of the seed's stratified search hold-out."""
        if seed not in self._holdout:
            split, desc = datasets.search_split(self.train_plain, None, holdout=self.a.holdout, seed=seed)
            loader = datasets.split_loader(split, self.cfg, distributed=False)
            self._holdout[seed] = (loader, engine.reference_outputs(self.dense, loader, self.cpu), desc)
        return self._holdout[seed]

    def rankings(self, criterion, seed):
        """Rankings of the dense model, cached per (criterion, seed) in OUT/rankings."""
        key = (criterion, seed)
        if key not in self._rankings:
            path = os.path.join(self.a.out, "rankings", f"{criterion}_seed{seed}.json")
            ident = {"dense": os.path.abspath(self.dense_file), "mtime": os.path.getmtime(self.dense_file),
                     "batches": self.a.criterion_batches}
            old = json.load(open(path)) if os.path.exists(path) else None
            if old and old.get("identity") == ident:
                self._rankings[key] = (old["rankings"], old["seconds"])
            else:
                t0 = time.time()
                loader = datasets.criterion_loader(self.train_plain, dataclasses.replace(self.cfg, seed=seed),
                                                   num_batches=self.a.criterion_batches)
                ranks = dc.rank_model(self.dense, loader, criterion=criterion, num_batches=self.a.criterion_batches,
                                      seed=seed)
                seconds = time.time() - t0
                utils.write_json_atomic(path, {"identity": ident, "rankings": ranks, "seconds": seconds})
                logger.info(f"ranked heads and neurons with {criterion} (seed {seed}) in {seconds:.1f}s")
                self._rankings[key] = (ranks, seconds)
        return self._rankings[key]

    def gmacs(self, X):
        return flops.policy_gmacs(self.dims, X, round_to=self.a.round_to)

    def vector(self, head, neuron, token):
        return np.array([head] * self.depth + [neuron] * self.depth + [token], dtype=float)

    def score(self, x, rankings, seed):
        """(objective, extras) of policy x on the seed's hold-out, as main.py's search scores it."""
        loader, ref, _ = self.holdout(seed)
        model = pruning.slice_model(self.dense, pruning.policy_from_vector(x, self.depth), rankings, self.a.round_to)
        stats = engine.objective_stats(model, loader, self.cpu, ref)
        return engine.objective_value(stats, self.a.search_objective), {
            "gmacs": flops.model_macs(model)["macs"] / 1e9, "acc1": stats["acc1"], "loss": stats["loss"],
            "kl": stats["kl"]}

    # -- policies --------------------------------------------------------------------------

    def bisect(self, f, lo, hi, target):
        """Largest-to-smallest crossing of the non-increasing f on [lo, hi] onto target: returns
        the argument (of the two bracketing ones after 50 halvings) whose value is closest."""
        if f(lo) <= target:
            return lo
        if f(hi) >= target:
            return hi
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            if f(mid) > target:
                lo = mid
            else:
                hi = mid
        return min((lo, hi), key=lambda t: abs(f(t) - target))

    def searched(self, variant, budget, seed, log_path):
        criterion, mode, on = SEARCHED[variant]
        a = self.a
        rankings, rank_seconds = self.rankings(criterion, seed)
        target = self.dense_gmacs * (1 - budget)
        active = np.repeat(np.asarray(on, dtype=bool), [self.depth, self.depth, 1])
        sampler, max_ratio = None, a.max_ratio
        for max_ratio in ([a.max_ratio] + [r for r in NO_TOKENS_MAX_RATIOS if r > a.max_ratio]
                          if variant == "no_tokens" else [a.max_ratio]):
            try:
                sampler = ei.FeasibleSampler(self.gmacs, target, dim=2 * self.depth + 1, upper=max_ratio,
                                             tol=a.tol, active=active)
                break
            except ei.InfeasibleTarget as e:
                logger.info(f"{variant}: {e}; trying a larger max ratio")
        if sampler is None:
            raise utils.UserError(f"{variant}: budget {budget:g} unreachable even at max ratio {max_ratio}")
        history = utils.read_jsonl(log_path)
        total = a.population + a.iterations
        t0, done = time.time(), [0]

        best_y = [max([r["y"] for r in history], default=-float("inf"))]

        def on_record(rec):
            utils.append_jsonl(log_path, rec)
            done[0] += 1
            best_y[0] = max(best_y[0], rec["y"])
            if (rec["step"] + 1) % 10 == 0 or rec["step"] + 1 == total:
                eta = (time.time() - t0) / done[0] * (total - rec["step"] - 1)
                logger.info(f"  {variant} search [{rec['step'] + 1}/{total}] {rec['phase']} gmacs {rec['gmacs']:.4g} "
                            f"hold-out acc {rec['acc1']:.2f}, best {a.search_objective} {best_y[0]:.4g}, "
                            f"eta {utils.format_seconds(eta)}")
        if history:
            logger.info(f"  {variant} search: resuming after {len(history)} logged evaluations")
        res = ei.run_search(lambda x: self.score(x, rankings, seed), sampler, a.population, a.iterations, seed=seed,
                            mode=mode, history=history, on_record=on_record, pool_size=a.pool,
                            refine_per_point=max(20, a.pool // 20))
        spent = sum(r["seconds"] for r in res["history"])
        best = res["best"]
        return {"vector": list(best["x"]), "rankings": rankings, "criterion": criterion, "mode": mode,
                "max_ratio": max_ratio, "search_score": best["y"], "search_acc1": best["acc1"],
                "evaluations": len(res["history"]), "rank_seconds": rank_seconds, "search_seconds": spent,
                "gp_seconds": res["gp_seconds"], "budget_met": True}

    def uniform(self, budget, seed):
        """One ratio h for heads and neurons per token rate t, h by bisection; best t on the hold-out."""
        rankings, rank_seconds = self.rankings("hsic", seed)
        target, tol = self.dense_gmacs * (1 - budget), self.a.tol
        t0, cands = time.time(), []
        for t in UNIFORM_TOKEN_RATES:
            h = self.bisect(lambda v: float(self.gmacs(self.vector(v, v, t))), 0.0, UNIFORM_MAX_RATIO, target)
            g = float(self.gmacs(self.vector(h, h, t)))
            cand = {"token": t, "ratio": h, "gmacs": g, "within_tol": abs(g / target - 1) <= tol}
            if cand["within_tol"]:
                y, extras = self.score(self.vector(h, h, t), rankings, seed)
                cand.update(score=y, acc1=extras["acc1"])
            cands.append(cand)
            logger.info(f"  uniform: token rate {t:g} -> head = neuron ratio {h:.4f}, {g:.5g} GMACs "
                        + (f"(hold-out acc {cand['acc1']:.2f})" if cand["within_tol"] else
                           f"(misses the budget {target:.5g} by more than {100 * tol:g}%: skipped)"))
        ok = [c for c in cands if c["within_tol"]]
        met = bool(ok)
        best = max(ok, key=lambda c: c["score"]) if ok else min(cands, key=lambda c: abs(c["gmacs"] - target))
        return {"vector": list(self.vector(best["ratio"], best["ratio"], best["token"])), "rankings": rankings,
                "criterion": "hsic", "mode": "uniform", "search_score": best.get("score"),
                "search_acc1": best.get("acc1"), "evaluations": len(ok), "rank_seconds": rank_seconds,
                "search_seconds": time.time() - t0, "budget_met": met, "uniform_candidates": cands}

    def tokens_only(self, budget, seed):
        rankings, _ = self.rankings("hsic", seed)  # unused by the policy (no head or neuron removed)
        target, t0 = self.dense_gmacs * (1 - budget), time.time()
        r = self.bisect(lambda v: float(self.gmacs(self.vector(0.0, 0.0, v))), 0.0, TOKENS_ONLY_MAX_RATE, target)
        g = float(self.gmacs(self.vector(0.0, 0.0, r)))
        met = abs(g / target - 1) <= self.a.tol
        if not met:
            logger.info(f"  tokens_only: budget {target:.5g} GMACs unreachable; closest reachable token rate "
                        f"{r:.4f} gives {g:.5g} GMACs ({100 * (1 - g / self.dense_gmacs):.1f}% fewer)")
        y, extras = self.score(self.vector(0.0, 0.0, r), rankings, seed)
        return {"vector": list(self.vector(0.0, 0.0, r)), "rankings": rankings, "criterion": None,
                "mode": "bisection", "search_score": y, "search_acc1": extras["acc1"], "evaluations": 1,
                "rank_seconds": 0.0, "search_seconds": time.time() - t0, "budget_met": met}

    # -- the unit ----------------------------------------------------------------------------

    def run(self, budget, variant, seed):
        a = self.a
        run_dir = os.path.join(a.out, "runs", unit_key(budget, variant, seed).replace("|", "_"))
        settings = settings_of(a, self.dense_file)
        utils.check_run_identity(run_dir, dict(settings, budget=budget, variant=variant, seed=seed), "ablation unit")
        found_path = os.path.join(run_dir, "policy.json")
        t_unit = time.time()
        if os.path.exists(found_path):
            found = json.load(open(found_path))
        else:
            if variant in SEARCHED:
                found = self.searched(variant, budget, seed, os.path.join(run_dir, "search_log.jsonl"))
            elif variant == "uniform":
                found = self.uniform(budget, seed)
            else:
                found = self.tokens_only(budget, seed)
            policy = pruning.policy_from_vector(found["vector"], self.depth)
            model = pruning.slice_model(self.dense, policy, found["rankings"], a.round_to)
            found["policy"] = policy
            found["acc1_before"] = engine.evaluate(self.val, model, self.cpu)["acc1"]
            utils.write_json_atomic(found_path, found)
        policy = found["policy"]
        model = pruning.slice_model(self.dense, policy, found["rankings"], a.round_to)
        counted = flops.model_macs(model)
        logger.info(f"  {variant}: policy heads {[round(v, 3) for v in policy['head']]} neurons "
                    f"{[round(v, 3) for v in policy['neuron']]} token {policy['token']:.3f}: "
                    f"{counted['macs'] / 1e9:.5g} GMACs ({100 * (1 - counted['macs'] / 1e9 / self.dense_gmacs):.1f}% "
                    f"fewer), val top-1 before finetune {found['acc1_before']:.2f}")

        t_ft = time.time()
        after = found["acc1_before"]
        if a.finetune_epochs > 0:
            cfg = dataclasses.replace(self.cfg, seed=seed)
            train = datasets.build_loaders(cfg, distributed=False, val=False)["train"]
            ft_dir = os.path.join(run_dir, "finetune")
            ckpt_path = os.path.join(ft_dir, "checkpoint.pth")
            state = utils.load_checkpoint_file(ckpt_path) if os.path.exists(ckpt_path) else None
            arch = models.model_arch(MODEL, model, INPUT_SIZE, *datasets.data_stats(DATA_SET))
            rec = recipe(a, a.finetune_epochs, a.finetune_lr, seed, "soft")
            engine.fit(model, train, self.monitor, recipe=rec, num_classes=NUM_CLASSES, arch=arch, teacher=self.dense,
                       resume=state, tag=f"  {variant} finetune", run_dir=ft_dir, device=self.cpu)
            after = engine.evaluate(self.val, model, self.cpu)["acc1"]
        ft_seconds = time.time() - t_ft
        speeds = [s["images_per_s"] for s in engine.interleaved_throughput(
            [self.dense, model.eval()], self.cpu, a.throughput_batch, INPUT_SIZE, rounds=a.throughput_rounds)]
        row = {"key": unit_key(budget, variant, seed), "budget": budget, "variant": variant, "seed": seed,
               "acc1_before": found["acc1_before"], "acc1_after": after, "dense_acc1": self.dense_acc1,
               "gmacs": counted["macs"] / 1e9, "dense_gmacs": self.dense_gmacs,
               "removed": 1 - counted["macs"] / 1e9 / self.dense_gmacs, "params": counted["params"],
               "dense_params": self.dense_params, "images_per_s": speeds[1], "dense_images_per_s": speeds[0],
               "speedup": speeds[1] / speeds[0], "budget_met": found["budget_met"], "policy": policy,
               "criterion": found["criterion"], "mode": found["mode"], "max_ratio": found.get("max_ratio"),
               "search_score": found["search_score"], "search_acc1": found["search_acc1"],
               "evaluations": found["evaluations"], "rank_seconds": found["rank_seconds"],
               "search_seconds": found["search_seconds"], "gp_seconds": found.get("gp_seconds"),
               "uniform_candidates": found.get("uniform_candidates"), "finetune_seconds": ft_seconds,
               "unit_seconds": time.time() - t_unit, "settings": settings,
               "load_average": [round(x, 2) for x in os.getloadavg()], "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        return row


    def objective_unit(self, i, x, rankings):
        """One policy of the objective study: its three search scores, val top-1 before and after a
        short finetune (the ablation's recipe, --study-epochs)."""
        a = self.a
        loader, ref, _ = self.holdout(0)
        model = pruning.slice_model(self.dense, pruning.policy_from_vector(x, self.depth), rankings, a.round_to)
        stats = engine.objective_stats(model, loader, self.cpu, ref)
        before = engine.evaluate(self.val, model, self.cpu)["acc1"]
        cfg = dataclasses.replace(self.cfg, seed=0)
        train = datasets.build_loaders(cfg, distributed=False, val=False)["train"]
        rec = recipe(a, a.study_epochs, a.finetune_lr, 0, "soft")
        engine.fit(model, train, self.monitor, recipe=rec, num_classes=NUM_CLASSES, teacher=self.dense,
                   tag=f"  policy {i}", device=self.cpu)
        after = engine.evaluate(self.val, model, self.cpu)["acc1"]
        return {"i": i, "vector": [float(v) for v in x], "gmacs": flops.model_macs(model)["macs"] / 1e9,
                "acc": stats["acc1"], "loss": stats["loss"], "kl": stats["kl"], "val_before": before,
                "val_after": after, "study_epochs": a.study_epochs, "dense": os.path.abspath(self.dense_file)}


def objective_study(a, bench):
    """Which search score predicts the finetuned model best: Spearman rho over the policies."""
    from scipy.stats import spearmanr
    path = os.path.join(a.out, "objective_study.jsonl")
    rows = utils.read_jsonl(path)
    budget = floats(a.budgets)[0]
    target = bench.dense_gmacs * (1 - budget)
    sampler = ei.FeasibleSampler(bench.gmacs, target, dim=2 * bench.depth + 1, upper=a.max_ratio, tol=a.tol)
    X = sampler.sample(a.objective_study, np.random.default_rng(0))
    rankings, _ = bench.rankings("hsic", 0)
    t0 = time.time()
    todo = [i for i in range(len(X)) if i not in {r["i"] for r in rows}]
    for n, i in enumerate(todo):
        row = bench.objective_unit(i, X[i], rankings)
        utils.append_jsonl(path, row)
        rows.append(row)
        eta = (time.time() - t0) / (n + 1) * (len(todo) - n - 1)
        logger.info(f"objective study [{n + 1}/{len(todo)}] policy {i}: acc {row['acc']:.2f} loss {row['loss']:.4f} "
                    f"kl {row['kl']:.4f}; val {row['val_before']:.2f} -> {row['val_after']:.2f} "
                    f"(eta {utils.format_seconds(eta)})")
    rows = sorted(rows, key=lambda r: r["i"])
    lines = [f"Search scores of {len(rows)} random feasible policies at {100 * budget:g}% fewer GMACs (HSIC rankings, "
             f"seed-0 hold-out of {a.holdout} training images) against val top-1 ({len(bench.val.dataset)} images) "
             f"before and after a {a.study_epochs}-epoch finetune: Spearman rho (higher = predicts better).", "",
             "| search score | rho with val before finetune | rho with val after finetune |", "|---|---|---|"]
    for name, sign in (("acc", 1), ("loss", -1), ("kl", -1)):
        score = [sign * r[name] for r in rows]
        rb = spearmanr(score, [r["val_before"] for r in rows]).correlation
        ra = spearmanr(score, [r["val_after"] for r in rows]).correlation
        lines.append(f"| {name}{' (negated)' if sign < 0 else ''} | {rb:.2f} | {ra:.2f} |")
    rb = spearmanr([r["val_before"] for r in rows], [r["val_after"] for r in rows]).correlation
    lines.append(f"| (val before finetune itself) | 1.00 | {rb:.2f} |")
    text = "\n".join(lines)
    with open(os.path.join(a.out, "objective_study.md"), "w") as f:
        f.write(text + "\n")
    print(text, flush=True)


# ----------------------------------------------------------------------------- the table

def table(rows):
    """Markdown: per budget and variant, mean +- sd over seeds."""
    fmt = lambda m, s, p=2: "" if m is None else f"{m:.{p}f} ± {s:.{p}f}"  # noqa: E731
    lines = ["| GMACs removed (target) | variant | val top-1 before finetune | val top-1 after finetune | "
             "GMACs | removed | params (M) | images/s | speed-up vs dense | search s | n seeds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    dense = [r for r in rows if r.get("dense_acc1") is not None]
    for budget in sorted({r["budget"] for r in rows}):
        for variant in VARIANTS:
            sel = sorted([r for r in rows if r["budget"] == budget and r["variant"] == variant],
                         key=lambda r: r["seed"])
            if not sel:
                continue
            col = lambda k: mean_sd([r.get(k) for r in sel])  # noqa: E731
            name = variant
            if not all(r["budget_met"] for r in sel):
                name += " *"
                reached = ", ".join("%.1f%%" % (100 * r["removed"]) for r in sel)
                notes.append(f"* {variant} at {100 * budget:g}%: the budget was not met within the tolerance "
                             f"(closest reachable: {reached} fewer GMACs)")
            if variant == "no_tokens" and any((r.get("max_ratio") or 0) > r["settings"]["max_ratio"] for r in sel):
                notes.append(f"no_tokens at {100 * budget:g}%: max ratio raised to "
                             f"{', '.join(str(r['max_ratio']) for r in sel)} (unreachable at "
                             f"{sel[0]['settings']['max_ratio']})")
            if variant == "uniform":
                notes.append(f"uniform at {100 * budget:g}%: (token rate, head = neuron ratio) per seed: " + ", ".join(
                    f"({r['policy']['token']:g}, {r['policy']['head'][0]:.3f})" for r in sel))
            g, rem, par = col("gmacs"), col("removed"), col("params")
            s = mean_sd([(r["rank_seconds"] or 0) + (r["search_seconds"] or 0) for r in sel])
            lines.append(f"| {100 * budget:g}% | {name} | {fmt(*col('acc1_before'))} | {fmt(*col('acc1_after'))} | "
                         f"{g[0]:.5f} | {100 * rem[0]:.1f}% | {par[0] / 1e6:.3f} | {fmt(*col('images_per_s'), 0)} | "
                         f"{col('speedup')[0]:.2f}x | {s[0]:.0f} | "
                         f"{len(sel)} ({','.join(str(r['seed']) for r in sel)}) |")
    head = ""
    if dense:
        d = dense[0]
        head = (f"Dense {MODEL}: val top-1 {d['dense_acc1']:.2f}, {d['dense_gmacs']:.5f} GMACs, "
                f"{d['dense_params'] / 1e6:.3f}M params, "
                f"{statistics.median(r['dense_images_per_s'] for r in rows):.0f} images/s (median over rows).\n\n")
    return head + "\n".join(lines) + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else "")


def print_table(a):
    rows = utils.read_jsonl(os.path.join(a.out, "ablation.jsonl"))
    if not rows:
        print(f"no rows in {os.path.join(a.out, 'ablation.jsonl')} yet")
        return
    text = table(rows)
    with open(os.path.join(a.out, "ablation.md"), "w") as f:
        f.write(text + "\n")
    print(text, flush=True)


# ----------------------------------------------------------------------------- main

def main(argv=None):
    a = get_parser().parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    if a.table:
        print_table(a)
        return
    torch.set_num_threads(a.threads)
    utils.setup_logging(a.out)
    budgets, seeds = floats(a.budgets), [int(s) for s in a.seeds.split(",") if s.strip()]
    variants = [v.strip() for v in a.only.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not budgets or not all(0 < b < 1 for b in budgets):
        raise SystemExit(f"error: unknown variants {bad} (choose from {','.join(VARIANTS)})" if bad else
                         f"error: --budgets must be fractions in (0, 1), got {a.budgets}")
    cpu = torch.device("cpu")
    dense, dense_file = dense_model(a, cpu)
    bench = Bench(a, dense, dense_file, cpu)
    if a.objective_study:
        objective_study(a, bench)
        return
    out_path = os.path.join(a.out, "ablation.jsonl")
    rows = utils.read_jsonl(out_path)
    utils.write_jsonl(out_path, rows)  # without a torn last line
    done = {r["key"]: r for r in rows}
    settings = settings_of(a, dense_file)
    units = [(b, v, s) for s in seeds for b in budgets for v in variants]  # seed-major: seed 0 first
    todo = [u for u in units if unit_key(*u) not in done]
    for u in units:
        r = done.get(unit_key(*u))
        if r is not None and r.get("settings") != settings:
            diff = sorted(k for k in settings if r.get("settings", {}).get(k) != settings[k])
            logger.info(f"warning: {r['key']} is kept from a run with other settings ({', '.join(diff)})")
    logger.info(f"ablation: {len(units)} units, {len(units) - len(todo)} done, {len(todo)} to run "
                f"(budgets {budgets}, seeds {seeds}, variants {variants}); rows in {out_path}")
    t0 = time.time()
    for i, (budget, variant, seed) in enumerate(todo):
        logger.info(f"[{i + 1}/{len(todo)}] {unit_key(budget, variant, seed)}: start")
        row = bench.run(budget, variant, seed)
        utils.append_jsonl(out_path, row)
        elapsed = time.time() - t0
        eta = elapsed / (i + 1) * (len(todo) - i - 1)
        logger.info(f"[{i + 1}/{len(todo)}] {row['key']}: val top-1 {row['acc1_before']:.2f} "
                    f"-> {row['acc1_after']:.2f} "
                    f"at {row['gmacs']:.5f} GMACs ({100 * row['removed']:.1f}% fewer), {row['images_per_s']:.0f} "
                    f"images/s ({row['speedup']:.2f}x dense), unit {utils.format_seconds(row['unit_seconds'])}; "
                    f"elapsed {utils.format_seconds(elapsed)}, eta {utils.format_seconds(eta)}")
    print_table(a)


if __name__ == "__main__":
    main()
