"""Multi-dimensional ViT compression: pretrain, search and prune+finetune, DeiT-style.

    python main.py --pipeline --output_dir output/digits         # whole method on digits, CPU
    python main.py --model deit_small_patch16_224 --data-path /data/imagenet --output_dir logs
    python main.py ... --resume logs/deit_small.pth --eval --search --search_flops 1.84
    python main.py ... --resume logs/deit_small.pth --neuron_pruning --head_pruning --token_pruning --prune_finetune

Launch the same way with torchrun, ``python -m torch.distributed.launch --use_env`` or srun.
flags.py parses and settles the configuration; here a Context holds what every mode needs and each
mode composes the library's steps on one screen. Each function imports the library modules it
needs, so that ``--help`` and a bad flag answer without loading torch, timm and scikit-learn.
"""
import argparse
import json
import logging
import os
import sys
import time

from flags import HELP_EPILOG, FlagError, Parser, check_speed_flags, get_args_parser, given_data_set, round_to_note, \
    run_mode, settle

logger = logging.getLogger("vitcompress")


class Context:
    """What every mode needs once: the settled configuration, device, rank info, output folder,
    and the contents of the model file it starts from (read once)."""

    def __init__(self, cfg, dist_info, model_file=None):
        import datasets
        import torch
        self.cfg, self.device, self.rank = cfg, dist_info["device"], dist_info["rank"]
        self.distributed, self.world_size = dist_info["distributed"], dist_info["world_size"]
        self.dist_info, self.out, self._file = dist_info, cfg.output_dir or None, model_file
        self.amp_dtype = getattr(torch, cfg.amp_dtype)  # --amp-dtype, as a torch dtype
        # the library's amp setting (engine.half_dtype): the dtype's name on CUDA with --amp, else False
        self.amp = cfg.amp_dtype if cfg.amp and self.device.type == "cuda" else False
        check_speed_flags(cfg, self.device)
        self.data = datasets.DataConfig.take(cfg)
        self.mean, self.std = datasets.data_stats(cfg.data_set)

    def model_file(self):
        """The contents of --resume, or without it of --finetune (None when neither is given)."""
        import models
        path = self.cfg.resume or self.cfg.finetune
        if self._file is None and path:
            self._file = models.read_model_file(path)
        return self._file

    def derive(self, out, **overrides):
        """A context for one step of the pipeline: its own folder and a few settled values."""
        return Context(argparse.Namespace(**{**vars(self.cfg), **overrides, "output_dir": out or ""}), self.dist_info)


def load_model(ctx, num_classes):
    """(model, arch, ckpt) of --resume (any format models.load reads), or the --model to train."""
    import models
    cfg = ctx.cfg
    if cfg.resume:
        loaded = models.load(cfg.resume, cfg.model, cfg.input_size, num_classes, ctx.mean, ctx.std,
                             ckpt=ctx.model_file())
        warn_misaligned(loaded[0], ctx.device)
        return loaded
    start = ctx.model_file()
    spec_of = (models.inspect_checkpoint(start, cfg.finetune)["arch"] or {}) if start else {}
    # the file's own architecture keywords when it is the model built (a converted Hugging Face model's)
    own = (spec_of.get("model_kwargs") or {}) if spec_of.get("model") == cfg.model else {}
    if spec_of.get("prune_spec"):  # a compressed model adapted to this data set: its shape, a new head
        model = models.build_from_arch(dict(spec_of, num_classes=num_classes, input_size=cfg.input_size))
        warn_misaligned(model, ctx.device)
    else:
        model = models.build_model(cfg.model, num_classes=num_classes, img_size=cfg.input_size,
                                   pretrained=cfg.pretrained, drop_rate=cfg.drop, drop_path_rate=cfg.drop_path, **own)
    if cfg.finetune:
        models.load_finetune(model, cfg.finetune, ckpt=start)
        logger.info(f"initialised from {cfg.finetune}")
    return model, models.model_arch(cfg.model, model, cfg.input_size, ctx.mean, ctx.std, model_kwargs=own), None


def warn_misaligned(model, device):
    """One warning line when a model that runs on CUDA has MLP widths that are not multiples of 8."""
    import pruning
    bad = pruning.misaligned_widths(model, 8) if device.type == "cuda" else []
    if bad:
        logger.warning("MLP widths that are not multiples of 8 run slower on GPUs: " + ", ".join(
            f"block {b} {w}" for b, w in bad) + "; compressing with --round-to 8 or 64 gives faster shapes")


def make_recipe(cfg, world_size, finetune=False):
    """Pretraining's recipe from the flags; finetuning's is its own: --finetune-epochs,
    --finetune-lr and distillation from the dense model (soft unless --distillation-type)."""
    import engine
    base_lr = cfg.finetune_lr if finetune else cfg.lr
    return engine.Recipe.take(cfg, epochs=cfg.finetune_epochs if finetune else cfg.epochs,
                              lr=base_lr if cfg.unscale_lr else base_lr * cfg.batch_size * world_size / 512.0,
                              distillation=cfg.distillation_type or ("soft" if finetune else "none"))


# ----------------------------------------------------------------------------- modes

def run_train(ctx):
    import datasets
    import engine
    import models
    import utils
    cfg = ctx.cfg
    data = datasets.build_loaders(ctx.data, ctx.distributed)
    model, arch, ckpt = load_model(ctx, data["num_classes"])
    state = ckpt if ckpt is not None and models.inspect_checkpoint(ckpt, cfg.resume)["training"] else None
    recipe = make_recipe(cfg, ctx.world_size)
    teacher = None
    if cfg.teacher_path and recipe.distillation == "none":
        logger.warning("--teacher-path is not used: pretraining distils only with --distillation-type soft or hard")
    if recipe.distillation != "none":
        teacher = models.build_teacher(cfg.teacher_model, cfg.teacher_path, data["num_classes"],
                                       arch["input_size"]).to(ctx.device)
    logger.info(f"training {arch['model']} on {cfg.data_set}: {len(data['train_set'])} images, {recipe.epochs} "
                f"epochs, {ctx.world_size} process(es), device {ctx.device}")
    stats = engine.fit(model, data["train"], data["val"], recipe=recipe, num_classes=data["num_classes"], arch=arch,
                       teacher=teacher, resume=state, identity={"data_set": cfg.data_set},
                       extra={"args": utils.primitives(vars(cfg)), "recipe": recipe.as_dict()},
                       run_dir=ctx.out, device=ctx.device, amp=ctx.amp, distributed=ctx.distributed, rank=ctx.rank)
    logger.info(f"final val top-1 {stats['acc1']:.2f} top-5 {stats['acc5']:.2f}")
    return stats


def run_eval(ctx):
    import datasets
    import engine
    data = datasets.build_loaders(ctx.data, ctx.distributed, train=False)
    model, arch, _ = load_model(ctx, data["num_classes"])
    stats = engine.evaluate(data["val"], model.to(ctx.device), ctx.device, ctx.amp, log_every=ctx.cfg.log_every)
    logger.info(f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.4f} "
                f"on {stats['n']} images")
    if ctx.rank == 0:
        print(json.dumps({k: stats[k] for k in ("acc1", "acc5", "loss", "n")}))
    return stats


def run_throughput(ctx):
    """--throughput: GMACs, params and the measured speed of the model (engine.speed_report), in
    --amp-dtype's weights on CUDA, float32 elsewhere, in the runtime that --compile / --cuda-graph
    name; with --throughput-baseline FILE, the speed-ups over FILE's model measured in the same run.
    Prints one JSON line (rank 0) and returns it as a dict."""
    import datasets
    import engine
    cfg = ctx.cfg
    model, arch, _ = load_model(ctx, None if cfg.resume else datasets.num_classes_of(cfg.data_set))
    baseline, base_arch = (load_baseline(cfg.throughput_baseline, arch["input_size"], ctx.device)
                           if cfg.throughput_baseline else (None, None))
    result = {"model": arch["model"], "compressed": bool(arch.get("prune_spec")), **engine.speed_report(
        model.to(ctx.device), ctx.device, cfg.throughput_batch, arch["input_size"], baseline=baseline, amp=ctx.amp,
        compile=cfg.compile, cuda_graph=cfg.cuda_graph)}
    if baseline is not None:
        result["baseline"].update(file=cfg.throughput_baseline, model=base_arch["model"])
    if ctx.rank == 0:
        print(json.dumps(result))
    return result


def load_baseline(path, input_size, device):
    """(model, arch) of --throughput-baseline's file on ``device``: one-line errors for a file that
    does not load or holds a model of another input size (speeds at two sizes do not compare)."""
    import models
    import pruning
    import utils
    try:
        model, arch, _ = models.load(path, device=device)
    except (utils.UserError, pruning.SpecError) as e:
        raise utils.UserError(f"--throughput-baseline {path} does not load: {e}") from e
    if arch["input_size"] != input_size:
        raise utils.UserError(f"--throughput-baseline {path} takes {arch['input_size']} px images and the measured "
                              f"model {input_size} px: their speeds do not compare")
    return model, arch


def run_export(ctx):
    """An ONNX file or a torch.export program (by the suffix), verified against PyTorch on real images
    of the run's data set when they fit."""
    import datasets
    import export
    import utils
    cfg = ctx.cfg
    if not cfg.resume:
        raise utils.UserError("--export needs the model file to export: --resume FILE")
    export.check_export_target(cfg.export, keep=[cfg.resume])  # a suffix of no format, or over the model file

    def on_rank0():  # the other ranks of a torchrun / srun launch wait for its result or error
        model, arch, _ = load_model(ctx, None)
        sample = None
        if cfg.data_path or cfg.data_set in ("DIGITS", "CLUTTERED_DIGITS"):
            data = datasets.build_loaders(ctx.data, False, train=False)
            if data["num_classes"] == arch["num_classes"]:
                sample = next(iter(data["val"]))[0][:8]
        return export.export_model(model, cfg.export, arch, sample=sample, crop_ratio=cfg.eval_crop_ratio)
    meta = utils.decide_on_rank0(on_rank0)
    if ctx.rank == 0:
        fmt = export.export_format(cfg.export)
        print(json.dumps({fmt: meta[f"{fmt}_path"], "json": meta["json_path"], **meta["verification"]}))
    return meta


def load_dense(ctx, num_classes):
    import flops
    import models
    import utils
    if not ctx.cfg.resume:
        raise utils.UserError("search and prune+finetune compress a trained model: pass --resume CHECKPOINT")
    model, arch, _ = load_model(ctx, num_classes)
    if arch.get("prune_spec"):
        raise utils.UserError(f"{ctx.cfg.resume} is already compressed; pass the dense checkpoint to --resume")
    flops.check_compressible(model, ctx.cfg.round_to)  # an uncountable head, a --round-to wider than an MLP
    return model.to(ctx.device).eval(), arch, models.weights_fingerprint(model)


def criterion_settings(cfg):
    import dependency_criterion as dc
    return dc.criterion_kwargs(cfg.criterion, cfg.hsic_kernel, cfg.criterion_batches, cfg.seed, cfg.head_lambda,
                               cfg.neuron_alpha, cfg.head_normalize, cfg.head_alpha, cfg.neuron_magnitude,
                               cfg.hsic_bandwidth)


def rank_dense(ctx, dense, train_plain):
    import datasets
    import dependency_criterion as dc
    if ctx.cfg.criterion == "hsic" and ctx.cfg.hsic_kernel == "original":  # the original ranks augmented images
        train_plain = datasets.build_dataset(True, ctx.data)[0]
    loader = datasets.criterion_loader(train_plain, ctx.data, ctx.cfg.criterion_batches, ctx.world_size, ctx.rank)
    t0 = time.time()
    rankings = dc.rank_model(dense, loader, **criterion_settings(ctx.cfg))
    logger.info(f"ranked heads and neurons with the {ctx.cfg.criterion} criterion in {time.time() - t0:.1f}s")
    return rankings


def active_dims(cfg, dense=None):
    """(heads, neurons, tokens) switched on: the --*_pruning flags, or all three when none is given.
    Given the ``dense`` model: on one that cannot reduce tokens (pruning.token_reduction_refusal:
    EVA) --token_pruning / --token_sparsity are refused in one line, and tokens are off."""
    import pruning
    import utils
    flags = (cfg.head_pruning, cfg.neuron_pruning, cfg.token_pruning)
    active = flags if any(flags) else (True, True, True)
    why = pruning.token_reduction_refusal(dense) if dense is not None else None
    if why and (cfg.token_pruning or cfg.token_sparsity):
        raise utils.UserError(f"--token_pruning / --token_sparsity: {why}")
    if why and active[2]:
        logger.info(why.split(";")[0])  # e.g. EVA: heads and neurons only
    return active[0], active[1], active[2] and why is None


def table_setting(ctx):
    """(default path, key, dtype, batch) of the latency table this run measures: on its device, at
    --latency-batch (default --batch-size), in the dtype it infers in, under output_dir/latency/."""
    import engine
    import latency
    dtype = engine.inference_dtype(ctx.device, ctx.amp)
    batch = ctx.cfg.latency_batch or ctx.cfg.batch_size
    key = latency.table_key(ctx.device, dtype, batch)
    return (os.path.join(ctx.out, "latency", latency.key_slug(key)) if ctx.out else ""), key, dtype, batch


def latency_table(ctx, dense):
    """The latency table of a latency budget (its ``file`` noted in it): --latency-table FILE
    (loaded, or measured and written there when it does not exist), else
    output_dir/latency/<what it is measured on>.json, reused when it was measured on this same
    setting. Measured on this run's device at --latency-batch (default --batch-size) in the dtype
    this run infers in; rank 0 measures, every rank gets the same table."""
    import latency
    import utils
    cfg = ctx.cfg
    default, key, dtype, batch = table_setting(ctx)
    path = cfg.latency_table or default
    table = utils.decide_on_rank0(lambda: latency.obtain_table(
        dense, path, ctx.device, batch, dtype, cfg.round_to, cfg.fuse,
        expect_key=None if cfg.latency_table else key)[0])
    logger.info(f"latency table {path or '(not saved: no --output_dir)'}: measured on {latency.describe(table)}")
    if table["key"]["device"] != ctx.device.type:
        logger.warning(f"the latency table was measured on {table['key']['device']} and this run is on {ctx.device}: "
                       f"the budget holds on the table's device and the result's speed is not measured here")
    return table


def run_search(ctx):
    import datasets
    import engine
    import flops
    import numpy as np
    import pruning
    cfg, out = ctx.cfg, os.path.join(ctx.out, "search") if ctx.out else None
    train_plain, ncls = datasets.build_dataset(True, ctx.data, train_transform=False)
    dense, arch, weights = load_dense(ctx, ncls)
    dense_gmacs = flops.model_macs(dense, convention=cfg.flops_convention)["macs"] / 1e9
    settings = engine.SearchSettings.take(cfg, active=active_dims(cfg, dense))
    dims = pruning.model_dims(dense)
    table = latency_table(ctx, dense) if settings.latency_budget else None
    dense_cost = float(settings.cost(dims, table)(np.zeros((1, 2 * dims["depth"] + 1)))[0])
    sampler = settings.space(dims, settings.target(dense_gmacs, dense_cost), table)
    split, split_desc = datasets.search_split(train_plain, datasets.build_dataset(False, ctx.data)[0],
                                              cfg.search_holdout, cfg.search_on_val, cfg.seed)
    low, high = sampler.reachable_range()
    unit = "ms (predicted)" if table else "GMACs"
    logger.info(f"search: {cfg.search_mode} over {int(sampler.active.sum())} ratios, "
                f"target {sampler.target:.4g} {unit} "
                f"(dense {dense_cost:.4g}, reachable {low:.4g}-{high:.4g}), {cfg.search_population + cfg.search_epoch} "
                f"evaluations on {split_desc}")
    return engine.search_policy(
        dense, datasets.split_loader(split, ctx.data, ctx.distributed),
        rankings=lambda: rank_dense(ctx, dense, train_plain), sampler=sampler, settings=settings,
        val_loader=datasets.build_loaders(ctx.data, ctx.distributed, train=False)["val"],
        identity={"criterion": criterion_settings(cfg), "dense": arch["model"], "dense_weights": weights,
                  "split": split_desc},
        latency_table=table, run_dir=out, device=ctx.device, amp=ctx.amp, distributed=ctx.distributed,
        rank=ctx.rank)["result"]


def searched_table(ctx, dense, source):
    """The latency table of prune+finetune's speed report: --latency-table, else the one the policy
    file's search used (its best_policy.json names it), else None."""
    import latency
    import pruning
    if ctx.cfg.latency_table:
        return latency_table(ctx, dense)
    found = json.load(open(source)).get("latency_table_file") if os.path.isfile(source) else None
    if not found:
        return None
    if not os.path.exists(found):
        logger.warning(f"the latency table {found} that {source} was searched with is gone: no speed report")
        return None
    table = latency.load_table(found)
    latency.check_table(table, pruning.model_dims(dense), found)
    return table


def run_prune_finetune(ctx):
    import datasets
    import engine
    import pruning
    import utils
    cfg = ctx.cfg
    data = datasets.build_loaders(ctx.data, ctx.distributed)
    dense, dense_arch, weights = load_dense(ctx, data["num_classes"])
    policy, source, rankings = pruning.resolve_policy(
        pruning.model_dims(dense)["depth"], (cfg.head_sparsity, cfg.neuron_sparsity, cfg.token_sparsity), cfg.policy,
        os.path.join(ctx.out, "search", "best_policy.json") if ctx.out else "", active_dims(cfg))
    if policy["token"] and not active_dims(cfg, dense)[2]:  # a policy file's token rate, on EVA
        raise utils.UserError(f"policy from {source} removes tokens (rate {policy['token']:g}): "
                              f"{pruning.token_reduction_refusal(dense)}")
    logger.info(f"policy from {source}; components kept by the rankings " + (
        "the search scored its policies with" if rankings else f"of the {cfg.criterion} criterion"))
    return engine.prune_finetune(
        dense, data, dense_arch=dense_arch, policy=policy, rankings=rankings or (lambda: rank_dense(
            ctx, dense, datasets.build_dataset(True, ctx.data, train_transform=False)[0])),
        recipe=make_recipe(cfg, ctx.world_size, finetune=True), settings=engine.SearchSettings.take(cfg),
        identity={"dense_weights": weights, "rankings": "search" if rankings else criterion_settings(cfg),
                  "global_batch": cfg.batch_size * ctx.world_size},  # the lr scales with it: say why a run differs
        extra={"args": utils.primitives(vars(cfg)), "policy_source": source},
        latency_table=searched_table(ctx, dense, source),
        run_dir=os.path.join(ctx.out, "prune_finetune") if ctx.out else None, device=ctx.device, amp=ctx.amp,
        distributed=ctx.distributed, rank=ctx.rank)


def run_pipeline(ctx):
    """Pretrain -> search -> prune+finetune for each reduction, then a dense-vs-compressed table.
    Rerunning the same command re-does no finished step (each decision taken on rank 0)."""
    import engine
    import plots
    import utils
    cfg = ctx.cfg
    t0, dense_dir = time.time(), os.path.join(ctx.out, "dense")
    dense_ckpt = os.path.join(dense_dir, "checkpoint.pth")
    logger.info(f"pipeline 1/3: pretraining {cfg.model} into {dense_dir}")
    exists = utils.decide_on_rank0(lambda: os.path.exists(dense_ckpt))
    run_train(ctx.derive(dense_dir, resume=dense_ckpt if exists else "", eval=False, search=False,
                         prune_finetune=False))
    rows = []
    targets = [("reduce", r) for r in cfg.pipeline_reductions] + [("speedup", s) for s in cfg.pipeline_speedups]
    for kind, r in targets:
        if kind == "reduce":
            sub, budget, what = os.path.join(ctx.out, f"reduce{round(100 * r)}"), {"search_reduction": r}, \
                f"{100 * r:.0f}% fewer GMACs"
        else:  # one latency table for every speed-up, measured by the first search
            sub, what = os.path.join(ctx.out, f"speedup{r:g}"), f"a {r:g}x predicted speed-up"
            budget = {"search_speedup": r, "search_reduction": None,
                      "latency_table": cfg.latency_table or table_setting(ctx)[0]}
        step = ctx.derive(sub, resume=dense_ckpt, search_flops=None,
                          policy=os.path.join(sub, "search", "best_policy.json"), **budget)
        # each step continues or reuses its own folder, and refuses one made from other dense weights
        logger.info(f"pipeline 2/3: searching a policy with {what}")
        found = run_search(step)
        logger.info(f"pipeline 3/3: pruning and finetuning into {sub}/prune_finetune")
        res = run_prune_finetune(step)
        label = f"-{100 * r:.0f}% GMACs" if kind == "reduce" else f"{r:g}x speed-up budget"
        rows.append(dict(res, reduction=r if kind == "reduce" else 1 - res["gmacs"] / res["dense_gmacs"], label=label,
                         search_val_acc1=found.get("val_acc1_before_finetune")))
    if ctx.rank != 0:
        return rows
    summary = engine.compare_models([dense_ckpt] + [row["file"] for row in rows], rows, ctx.device,
                                    cfg.throughput_batch, cfg.input_size, ctx.amp)
    summary["seconds"] = round(time.time() - t0, 1)
    utils.write_json_atomic(os.path.join(ctx.out, "summary.json"), summary)
    with open(os.path.join(ctx.out, "summary.md"), "w") as f:
        f.write(summary["markdown"] + "\n")
    plots.plot_summary(summary["rows"], os.path.join(ctx.out, "summary.png"))
    print(summary["markdown"])
    logger.info(f"pipeline finished in {utils.format_seconds(summary['seconds'])}; summary in {ctx.out}/summary.md")
    return summary


MODES = {"export": run_export, "pipeline": run_pipeline, "search": run_search, "prune_finetune": run_prune_finetune,
         "throughput": run_throughput, "eval": run_eval, "train": run_train}  # flags.MODE_FLAGS, then training


def main(args):
    """Settle the configuration, set up once, run the one mode the flags name."""
    import utils
    cfg, model_file = settle(args)
    dist_info = utils.init_distributed(cfg.device, cfg.dist_url, cfg.local_rank)
    try:
        utils.setup_logging(cfg.output_dir or None)
        note = round_to_note(args, cfg)
        if note:
            logger.warning(note)
        ctx = Context(cfg, dist_info, model_file)
        utils.seed_everything(cfg.seed + ctx.rank)
        if ctx.out and ctx.rank == 0:
            os.makedirs(ctx.out, exist_ok=True)
            utils.write_json_atomic(os.path.join(ctx.out, "args.json"), utils.primitives(vars(cfg)))
        return MODES[run_mode(cfg)](ctx)
    finally:
        utils.cleanup_distributed()


def cli(argv=None):
    try:  # a bad flag is answered before torch is imported
        argv = sys.argv[1:] if argv is None else argv
        args = Parser("main.py", parents=[get_args_parser(given_data_set(argv))], epilog=HELP_EPILOG).parse_args(argv)
    except FlagError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        main(args)
    except KeyboardInterrupt:  # before the clause below, which imports the library
        if args.search or args.prune_finetune or args.pipeline:
            hint = "; rerun the same command to continue"
        elif args.eval or args.throughput or args.export:
            hint = ""
        elif args.output_dir and os.path.exists(os.path.join(args.output_dir, "checkpoint.pth")):
            hint = "; the last finished epoch's checkpoint is intact: rerun with --resume auto to continue"
        else:
            hint = " before the first epoch finished"
        if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":  # one message, not one per rank
            print("interrupted" + hint, file=sys.stderr)
        return 130
    except Exception as e:  # the one-line errors of the library; main() has imported it by now
        import engine
        import expected_improvement as ei
        import pruning
        import utils
        if not isinstance(e, (utils.UserError, pruning.SpecError, ei.InfeasibleTarget, engine.NonFiniteLoss)):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 3 if isinstance(e, engine.NonFiniteLoss) else 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
