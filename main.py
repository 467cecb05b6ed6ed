"""Multi-dimensional ViT compression: pretrain, search and prune+finetune, DeiT-style.

    python main.py --pipeline --output_dir output/digits         # whole method on digits, CPU
    python main.py --model deit_small_patch16_224 --data-path /data/imagenet --output_dir logs
    python main.py ... --resume logs/deit_small.pth --eval --search --search_flops 1.84
    python main.py ... --resume logs/deit_small.pth --neuron_pruning --head_pruning --token_pruning --prune_finetune

Launch the same way with torchrun, ``python -m torch.distributed.launch --use_env`` or srun.
Each function imports the library modules it needs, so that ``--help`` and a bad flag (flags.py)
answer without loading torch, timm and scikit-learn.
"""
import argparse
import json
import logging
import os
import sys
import tempfile
import time

from flags import (HELP_EPILOG, FlagError, Parser, data_set_defaults, flag_problems, get_args_parser, given_data_set,
                   paper_settings, run_mode)

logger = logging.getLogger("vitcompress")


# ----------------------------------------------------------------------------- settling the configuration

def settle(args):
    """The run's configuration, settled once: recipe defaults, the --resume (or --finetune) file's
    own model and input size, every check of the flags. Returns (cfg, contents of that file, or None
    when it was not read);
    nothing assigns to the configuration after this."""
    import datasets
    import models
    import torch
    import utils
    cfg = argparse.Namespace(**vars(args))
    if cfg.data_set is None:
        cfg.data_set = "IMNET" if cfg.data_path else "DIGITS"
    cfg.data_set = "CIFAR100" if cfg.data_set == "CIFAR" else cfg.data_set
    recipe = data_set_defaults(cfg.data_set)
    if cfg.output_dir and os.path.exists(cfg.output_dir) and not os.path.isdir(cfg.output_dir):
        raise utils.UserError(f"--output_dir {cfg.output_dir} is a file, not a folder")
    cfg.resume, ckpt = resume_path(cfg), None
    if cfg.resume:
        ckpt = models.read_model_file(cfg.resume)
        info = models.inspect_checkpoint(ckpt, cfg.resume)
        for key in ("model", "input_size"):
            if info[key] is not None and getattr(args, key) is not None and getattr(args, key) != info[key] \
                    and info["arch"] is not None:
                raise utils.UserError(f"{cfg.resume} holds a model with {key} {info[key]}, not {getattr(args, key)}; "
                                f"leave out --{key.replace('_', '-')} to use the file's")
            if info[key] is not None and getattr(args, key) is None:
                setattr(cfg, key, info[key])
    if (cfg.finetune and not cfg.resume and os.path.exists(cfg.finetune)
            and (args.model is None or args.input_size is None)):
        ckpt = models.read_model_file(cfg.finetune)  # a file, or a Hugging Face folder
        info = models.inspect_checkpoint(ckpt, cfg.finetune)
        cfg.model = cfg.model or info["model"]  # this tool's file (or one naming its model): no --model needed
        cfg.input_size = cfg.input_size or (info["input_size"] if cfg.model == info["model"] else None)
    if cfg.recipe == "paper":  # the original's settings, for every flag the user left at its default
        # what each flag parses to when it is not given: get_default would answer --no-model-ema's True
        # for model_ema, which parses to None when neither --model-ema nor --no-model-ema is given
        untouched = vars(get_args_parser().parse_args([]))
        for key, value in paper_settings().items():
            if getattr(args, key) == untouched[key]:
                setattr(cfg, key, value)
    if cfg.criterion is None:  # the paper's setting (--hsic-kernel original) ranks with its HSIC criterion
        cfg.criterion = "hsic" if cfg.hsic_kernel == "original" else "taylor"
    elif cfg.hsic_kernel == "original" and cfg.criterion != "hsic":
        raise utils.UserError(f"--hsic-kernel original is the HSIC criterion's kernel; it does not apply to "
                              f"--criterion {cfg.criterion}")
    if cfg.criterion_batches is None and cfg.hsic_kernel == "original":
        cfg.criterion_batches = 1  # the original ranks on one batch
    if cfg.input_size is None and cfg.model is not None and cfg.model != recipe["model"]:
        cfg.input_size = models.native_input_size(cfg.model)
    for key in recipe:
        if getattr(cfg, key, None) is None:
            setattr(cfg, key, recipe[key])
    if args.num_workers is None:  # DeiT's 10 loader workers, but never more than this machine's CPUs
        cfg.num_workers = min(cfg.num_workers, os.cpu_count() or 1)
    cfg.device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg.round_to = cfg.round_to or round_to_default(cfg)
    cfg.pin_mem = cfg.device.startswith("cuda") if cfg.pin_mem is None else cfg.pin_mem
    cfg.search_holdout = datasets.parse_holdout(cfg.search_holdout)
    check_config(cfg)
    check_flags_apply(args, cfg)
    return cfg, ckpt


def round_to_default(cfg):
    """--round-to left out: 64 on CUDA (GPU matrix units like such widths), unless the model is a small
    preset whose MLPs are narrower than 8 x 64; otherwise 8 (fast on CPUs), 1 with --flops-convention
    original (the original's exact widths)."""
    import models
    preset = models.PRESETS.get(cfg.model)
    small = preset is not None and preset["embed_dim"] * preset.get("mlp_ratio", 4.0) < 8 * 64
    if cfg.device.startswith("cuda") and not small:
        return 64
    return 1 if cfg.flops_convention == "original" else 8


def round_to_note(args, cfg):
    """The warning for a model rebuilt in the original's convention but at GPU widths, or None."""
    slices = cfg.search or cfg.prune_finetune or cfg.pipeline
    if slices and args.round_to is None and cfg.flops_convention == "original" and cfg.round_to > 1:
        return (f"--flops-convention original on {cfg.device}: MLP widths are kept at multiples of {cfg.round_to} "
                f"(GPU-friendly shapes), not the original's exact widths; --round-to 1 gives those")
    return None


def resume_path(cfg):
    """--resume, with 'auto' = output_dir/checkpoint.pth: optional when training, required otherwise."""
    import utils
    if cfg.resume != "auto":
        return cfg.resume
    path = os.path.join(cfg.output_dir, "checkpoint.pth") if cfg.output_dir else ""
    if path and os.path.exists(path):
        return path
    if cfg.eval or cfg.search or cfg.prune_finetune or cfg.throughput:
        raise utils.UserError(f"--resume auto found no checkpoint ({path or 'no --output_dir given'}); "
                        f"train first or pass --resume FILE")
    return ""


RUN_MARKERS = ("run.json", "checkpoint.pth", "args.json")  # what this tool leaves in a run's folder


def check_output_dir_nesting(output_dir):
    """Refuse a user's --output_dir inside another run's folder (a parent holding one of
    RUN_MARKERS): that run's resumable steps, checkpoints and summaries would mix with this one's.
    The folders the tool lays out itself (a pipeline's dense/, reduceNN/, a run's search/ and
    prune_finetune/) are derived contexts, which never come through here."""
    import utils
    here = os.path.abspath(output_dir)
    parent = os.path.dirname(here)
    while parent and parent != here:
        found = [m for m in RUN_MARKERS if os.path.isfile(os.path.join(parent, m))]
        if found:
            raise utils.UserError(f"--output_dir {output_dir} is inside another run's folder {parent} (it holds "
                                  f"{found[0]}); pass a folder outside it")
        here, parent = parent, os.path.dirname(parent)


def check_config(cfg):
    import torch
    import utils
    if cfg.device.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise utils.UserError(f"--device {cfg.device}: use cpu, cuda or cuda:N")
    if cfg.output_dir:  # the user's own folder only: derived step contexts do not pass here
        check_output_dir_nesting(cfg.output_dir)
    if cfg.output_dir:  # every rank checks: a folder it cannot write fails here, not in the first checkpoint
        try:
            os.makedirs(cfg.output_dir, exist_ok=True)
            tempfile.TemporaryFile(dir=cfg.output_dir).close()
        except OSError as e:
            raise utils.UserError(f"--output_dir {cfg.output_dir} cannot be written ({e.strerror or e})")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise utils.UserError(f"--device {cfg.device} asked for but CUDA is not available")
    trains = not (cfg.eval or cfg.search or cfg.throughput) or cfg.prune_finetune or cfg.pipeline
    if trains and (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise utils.UserError(f"mixup/cutmix need an even --batch-size, got {cfg.batch_size} "
                              "(or pass --mixup 0 --cutmix 0)")
    if cfg.pipeline and not cfg.output_dir:
        raise utils.UserError("--pipeline needs --output_dir")
    budgets = [flag for flag, value in (("--search_flops", cfg.search_flops),
                                        ("--search-reduction", cfg.search_reduction),
                                        ("--search-speedup", cfg.search_speedup),
                                        ("--search-latency-ms", cfg.search_latency_ms)) if value is not None]
    if len(budgets) > 1:
        raise utils.UserError(f"give one budget, not {' and '.join(budgets)}")
    latency_budget = cfg.search_speedup is not None or cfg.search_latency_ms is not None or cfg.pipeline_speedups
    if (cfg.latency_table or cfg.latency_batch) and not (latency_budget or cfg.prune_finetune):
        raise utils.UserError("--latency-table and --latency-batch apply to a latency budget (--search-speedup, "
                              "--search-latency-ms, --pipeline-speedups) and to --prune_finetune's speed report")

def check_flags_apply(args, cfg):
    """Refuses the first flag given where it does nothing and contradicts the run (UserError, one
    line), and warns about the others on stderr, one line each, from rank 0 alone."""
    import utils
    refusals, warnings = flag_problems(args, cfg)
    if refusals:
        raise utils.UserError(refusals[0])
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
        for line in warnings:
            print(f"warning: {line}", file=sys.stderr)


def check_speed_flags(cfg, device):
    """The flags of --throughput alone, refused in one line before any work: --cuda-graph and
    --throughput-baseline need --throughput, --cuda-graph a CUDA device and no --compile."""
    import engine
    import utils
    for flag, given in (("--cuda-graph", cfg.cuda_graph), ("--throughput-baseline", cfg.throughput_baseline)):
        if given and not cfg.throughput:
            raise utils.UserError(f"{flag} applies to --throughput measurements; add --throughput or drop {flag}")
    if cfg.cuda_graph:
        engine.runtime_name(cfg.compile, cfg.cuda_graph)  # refuses --compile with it
        engine.check_cuda_graph(device)


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
    if ctx.out:
        identity = {"step": "train", "model": arch["model"], "data_set": cfg.data_set, "input_size": arch["input_size"],
                    "num_classes": arch["num_classes"], "prune_spec": bool(arch.get("prune_spec")),
                    "seed": cfg.seed, "distillation": recipe.distillation}
        fresh = state is None or os.path.dirname(os.path.abspath(cfg.resume)) != os.path.abspath(ctx.out)
        utils.decide_on_rank0(lambda: utils.check_run_identity(ctx.out, identity, "training", fresh=fresh))
    teacher = None
    if cfg.teacher_path and recipe.distillation == "none":
        logger.warning("--teacher-path is not used: pretraining distils only with --distillation-type soft or hard")
    if recipe.distillation != "none":
        teacher = models.build_teacher(cfg.teacher_model, cfg.teacher_path, data["num_classes"],
                                       arch["input_size"]).to(ctx.device)
    logger.info(f"training {arch['model']} on {cfg.data_set}: {len(data['train_set'])} images, {recipe.epochs} "
                f"epochs, {ctx.world_size} process(es), device {ctx.device}")
    stats = engine.fit(model, data["train"], data["val"], recipe=recipe, num_classes=data["num_classes"], arch=arch,
                       teacher=teacher, resume=state,
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
    """--throughput: GMACs, params and the measured speed of the model (engine.interleaved_throughput:
    images/s at --throughput-batch and ms at batch 1, in --amp-dtype's weights on CUDA, float32
    elsewhere, in the runtime that --compile / --cuda-graph name). With --throughput-baseline FILE,
    FILE's model is measured interleaved in the same run and the speed-ups over it are reported
    beside the GMACs ratio. Prints one JSON line (rank 0) and returns it as a dict."""
    import datasets
    import engine
    import flops
    cfg = ctx.cfg
    model, arch, _ = load_model(ctx, None if cfg.resume else datasets.num_classes_of(cfg.data_set))
    macs = flops.model_macs(model.to(ctx.device))
    measured = [model]
    if cfg.throughput_baseline:
        baseline, base_arch = load_baseline(cfg.throughput_baseline, arch["input_size"], ctx.device)
        base_macs = flops.model_macs(baseline)
        measured.append(baseline)
    speeds = engine.interleaved_throughput(measured, ctx.device, cfg.throughput_batch, arch["input_size"], amp=ctx.amp,
                                           rounds=10, warmup=3, compile=cfg.compile, cuda_graph=cfg.cuda_graph)
    speed = speeds[0]
    result = {"model": arch["model"], "compressed": bool(arch.get("prune_spec")), "gmacs": macs["macs"] / 1e9,
              "params": macs["params"], "images_per_s": speed["images_per_s"], "batch1_ms": speed["batch1_ms"],
              "batch": cfg.throughput_batch, "device": str(ctx.device), "dtype": speed["dtype"],
              "runtime": speed["runtime"], "amp": bool(ctx.amp), "compiled": bool(cfg.compile)}
    logger.info(f"{arch['model']}: {result['gmacs']:.4g} GMACs, {macs['params'] / 1e6:.2f} M params, "
                f"{speed['images_per_s']:.1f} images/s at batch {cfg.throughput_batch}, {speed['batch1_ms']:.3g} ms at "
                f"batch 1 on {ctx.device} ({speed['dtype']}, {speed['runtime']})")
    if cfg.throughput_baseline:
        base = speeds[1]
        result.update(baseline={"file": cfg.throughput_baseline, "model": base_arch["model"],
                                "gmacs": base_macs["macs"] / 1e9, "params": base_macs["params"],
                                "images_per_s": base["images_per_s"], "batch1_ms": base["batch1_ms"]},
                      speedup=base["batch_ms"] / speed["batch_ms"],
                      speedup_batch1=base["batch1_ms"] / speed["batch1_ms"],
                      macs_ratio=base_macs["macs"] / macs["macs"])
        logger.info(f"speed-up over {cfg.throughput_baseline} ({result['baseline']['gmacs']:.4g} GMACs), measured "
                    f"in this run: {result['speedup']:.2f}x at batch {cfg.throughput_batch}, "
                    f"{result['speedup_batch1']:.2f}x at batch 1; GMACs ratio {result['macs_ratio']:.2f}x")
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
    """(table, path) of a latency budget: --latency-table FILE (loaded, or measured and written there
    when it does not exist), else output_dir/latency/<what it is measured on>.json, reused when it
    was measured on this same setting. Measured on this run's device at --latency-batch (default
    --batch-size) in the dtype this run infers in; rank 0 measures, every rank gets the same table."""
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
    return table, path


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
    table, table_path = latency_table(ctx, dense) if settings.latency_budget else (None, "")
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
        record=dict(criterion=cfg.criterion, model=arch["model"], input_size=arch["input_size"],
                    **({"latency_table_file": table_path} if table else {})),
        latency_table=table, run_dir=out, device=ctx.device, amp=ctx.amp, distributed=ctx.distributed,
        rank=ctx.rank)["result"]


def searched_table(ctx, dense, source):
    """The latency table of prune+finetune's speed report: --latency-table, else the one the policy
    file's search used (its best_policy.json names it), else None."""
    import latency
    import pruning
    if ctx.cfg.latency_table:
        return latency_table(ctx, dense)[0]
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
        record={"policy": policy, "policy_source": source}, extra={"args": utils.primitives(vars(cfg))},
        latency_table=searched_table(ctx, dense, source),
        run_dir=os.path.join(ctx.out, "prune_finetune") if ctx.out else None, device=ctx.device, amp=ctx.amp,
        distributed=ctx.distributed, rank=ctx.rank)


def run_pipeline(ctx):
    """Pretrain -> search -> prune+finetune for each reduction, then a dense-vs-compressed table.
    Rerunning the same command re-does no finished step (each decision taken on rank 0)."""
    import engine
    import models
    import plots
    import utils
    cfg = ctx.cfg
    t0, dense_dir = time.time(), os.path.join(ctx.out, "dense")
    dense_ckpt = os.path.join(dense_dir, "checkpoint.pth")
    logger.info(f"pipeline 1/3: pretraining {cfg.model} into {dense_dir}")
    exists = utils.decide_on_rank0(lambda: os.path.exists(dense_ckpt))
    run_train(ctx.derive(dense_dir, resume=dense_ckpt if exists else "", eval=False, search=False,
                         prune_finetune=False))
    rows, weights = [], models.weights_fingerprint(models.load(dense_ckpt)[0])
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

        def finished(name, path):
            if os.path.exists(path):
                done = json.load(open(path))
                if done.get("dense_weights", weights) != weights:
                    raise utils.UserError(f"the {name} in {path} started from other weights than {dense_ckpt} holds "
                                          f"now (retrained?); delete {sub} to redo it, or use another --output_dir")
                logger.info(f"pipeline: using the finished {name} in {path}")
                return done
        found = utils.decide_on_rank0(lambda: finished("search", step.cfg.policy))
        if found is None:
            logger.info(f"pipeline 2/3: searching a policy with {what}")
            found = run_search(step)
        res = utils.decide_on_rank0(
            lambda: finished("prune+finetune", os.path.join(sub, "prune_finetune", "result.json")))
        if res is None:
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
