"""Multi-dimensional ViT compression: pretrain, search and prune+finetune, DeiT-style.

    python main.py --pipeline --output_dir output/digits         # whole method on digits, CPU
    python main.py --model deit_small_patch16_224 --data-path /data/imagenet --output_dir logs
    python main.py ... --resume logs/deit_small.pth --eval --search --search_flops 1.84
    python main.py ... --resume logs/deit_small.pth --neuron_pruning --head_pruning --token_pruning --prune_finetune

Launch the same way with torchrun, ``python -m torch.distributed.launch --use_env`` or srun.
"""
import argparse
import json
import logging
import os
import sys
import time

import torch

import utils
from utils import UserError

logger = logging.getLogger("vitcompress")

# Defaults that depend on the data set. ``None`` on the command line means "take the recipe's".
# IMAGE is DeiT's ImageNet recipe; DIGITS is a short from-scratch recipe for 2 CPU cores.
RECIPES = {
    "IMAGE": dict(model="deit_base_patch16_224", input_size=224, epochs=300, batch_size=64, lr=5e-4,
                  warmup_epochs=5, cooldown_epochs=10, min_lr=1e-5, weight_decay=0.05, drop_path=0.1,
                  aa="rand-m9-mstd0.5-inc1", smoothing=0.1, reprob=0.25, mixup=0.8, cutmix=1.0,
                  repeated_aug=True, model_ema=True, num_workers=10, finetune_epochs=30, finetune_lr=5e-5,
                  search_epoch=100, search_population=100, criterion_batches=4, search_pool=10000, throughput_batch=64),
    "DIGITS": dict(model="vit_nano_patch4_32", input_size=32, epochs=30, batch_size=64, lr=1e-2,
                   warmup_epochs=2, cooldown_epochs=0, min_lr=1e-5, weight_decay=0.05, drop_path=0.0,
                   aa="none", smoothing=0.1, reprob=0.0, mixup=0.0, cutmix=0.0,
                   repeated_aug=False, model_ema=False, num_workers=0, finetune_epochs=30, finetune_lr=2e-3,
                   search_epoch=30, search_population=20, criterion_batches=4, search_pool=1000, throughput_batch=256),
}
RECIPE_KEYS = tuple(RECIPES["IMAGE"])


def get_args_parser():
    p = argparse.ArgumentParser("Multi-dimensional ViT compression (DeiT-style training, HSIC criterion, "
                                "GP-EI policy search, physical pruning)", add_help=False)
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=None,
                   help="per-process batch size (IMNET: 64, DIGITS: 64)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (IMNET: 300, DIGITS: 30)")

    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, metavar="NAME",
                   help="timm ViT/DeiT name or a preset (vit_nano_patch4_32, deit_nano_distilled_patch4_32, "
                        "vit_pico_patch8_32); default deit_base_patch16_224, or vit_nano_patch4_32 on DIGITS")
    g.add_argument("--input-size", "--input_size", dest="input_size", type=int, default=None,
                   help="image size (IMNET: 224, DIGITS: 32)")
    g.add_argument("--drop", type=float, default=0.0, help="dropout rate")
    g.add_argument("--drop-path", "--drop_path", dest="drop_path", type=float, default=None,
                   help="stochastic depth rate (IMNET: 0.1, DIGITS: 0)")
    g.add_argument("--pretrained", action="store_true", help="start from timm's pretrained weights (needs internet)")
    g.add_argument("--model-ema", dest="model_ema", action="store_true", default=None, help="keep an EMA of weights")
    g.add_argument("--no-model-ema", dest="model_ema", action="store_false")
    g.add_argument("--model-ema-decay", type=float, default=0.99996)
    g.add_argument("--model-ema-force-cpu", action="store_true")

    g = p.add_argument_group("optimizer and schedule")
    g.add_argument("--opt", default="adamw", help="timm optimizer name")
    g.add_argument("--opt-eps", type=float, default=1e-8)
    g.add_argument("--opt-betas", type=float, nargs="+", default=None)
    g.add_argument("--clip-grad", type=float, default=None, help="gradient norm clip (off by default)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=None, help="(default 0.05)")
    g.add_argument("--sched", default="cosine", help="timm scheduler name")
    g.add_argument("--lr", type=float, default=None,
                   help="base learning rate for a global batch of 512, scaled linearly (IMNET: 5e-4, DIGITS: 1e-2)")
    g.add_argument("--unscale-lr", action="store_true", help="do not scale --lr by the global batch size")
    g.add_argument("--warmup-lr", type=float, default=1e-6)
    g.add_argument("--min-lr", type=float, default=None, help="(default 1e-5)")
    g.add_argument("--warmup-epochs", type=int, default=None, help="(IMNET: 5, DIGITS: 2)")
    g.add_argument("--cooldown-epochs", type=int, default=None, help="(IMNET: 10, DIGITS: 0)")
    g.add_argument("--decay-epochs", type=float, default=30)
    g.add_argument("--decay-rate", "--dr", type=float, default=0.1)

    g = p.add_argument_group("augmentation (DeiT recipe)")
    g.add_argument("--color-jitter", type=float, default=0.3)
    g.add_argument("--aa", default=None, help="RandAugment policy, 'none' to turn off (IMNET: rand-m9-mstd0.5-inc1)")
    g.add_argument("--smoothing", type=float, default=None, help="label smoothing (default 0.1)")
    g.add_argument("--train-interpolation", default="bicubic")
    g.add_argument("--repeated-aug", dest="repeated_aug", action="store_true", default=None)
    g.add_argument("--no-repeated-aug", dest="repeated_aug", action="store_false")
    g.add_argument("--ra-reps", type=int, default=3)
    g.add_argument("--reprob", type=float, default=None, help="random erasing probability (IMNET: 0.25, DIGITS: 0)")
    g.add_argument("--remode", default="pixel")
    g.add_argument("--recount", type=int, default=1)
    g.add_argument("--mixup", type=float, default=None, help="mixup alpha (IMNET: 0.8, DIGITS: 0)")
    g.add_argument("--cutmix", type=float, default=None, help="cutmix alpha (IMNET: 1.0, DIGITS: 0)")
    g.add_argument("--cutmix-minmax", type=float, nargs="+", default=None)
    g.add_argument("--mixup-prob", type=float, default=1.0)
    g.add_argument("--mixup-switch-prob", type=float, default=0.5)
    g.add_argument("--mixup-mode", default="batch")
    g.add_argument("--eval-crop-ratio", type=float, default=0.875)

    g = p.add_argument_group("distillation")
    g.add_argument("--teacher-model", default="regnety_160", help="teacher for pretraining distillation")
    g.add_argument("--teacher-path", default="", help="teacher weights file (or a model file of this tool)")
    g.add_argument("--distillation-type", default=None, choices=["none", "soft", "hard"],
                   help="pretrain: none; prune+finetune: soft, from the dense model")
    g.add_argument("--distillation-alpha", type=float, default=0.5)
    g.add_argument("--distillation-tau", type=float, default=1.0)

    g = p.add_argument_group("data and run")
    g.add_argument("--data-path", "--data_path", dest="data_path", default=None, help="data root (train/ and val/)")
    g.add_argument("--data-set", "--data_set", dest="data_set", default=None, type=str.upper,
                   choices=["DIGITS", "IMNET", "IMAGEFOLDER", "CIFAR", "CIFAR10", "CIFAR100"],
                   help="DIGITS (embedded; the default without --data-path), IMNET (the default with "
                        "--data-path, as in DeiT), IMAGEFOLDER, CIFAR10, CIFAR/CIFAR100")
    g.add_argument("--download", action="store_true", help="download CIFAR if it is not under --data-path")
    g.add_argument("--output_dir", "--output-dir", dest="output_dir", default="",
                   help="where checkpoints and logs go (empty: nothing saved)")
    g.add_argument("--device", default=None, help="cuda when available, else cpu")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--finetune", default="", help="initialise from a file or URL (mismatched head dropped)")
    g.add_argument("--resume", default="", help="checkpoint to resume or to compress; 'auto' = output_dir/checkpoint.pth")
    g.add_argument("--start_epoch", "--start-epoch", dest="start_epoch", type=int, default=0)
    g.add_argument("--eval", action="store_true", help="evaluate only")
    g.add_argument("--throughput", action="store_true", help="measure images/s, GMACs and params, then exit")
    g.add_argument("--throughput-batch", type=int, default=None,
                   help="batch for --throughput and the pipeline's speed table (IMNET: 64, DIGITS: 256)")
    g.add_argument("--dist-eval", "--dist_eval", dest="dist_eval", action="store_true",
                   help="shard evaluation over ranks (exact: every image counted once)")
    g.add_argument("--num_workers", "--num-workers", dest="num_workers", type=int, default=None,
                   help="data loader workers (IMNET: 10, DIGITS: 0)")
    g.add_argument("--pin-mem", dest="pin_mem", action="store_true", default=None,
                   help="pin loader memory (default: on with CUDA)")
    g.add_argument("--no-pin-mem", dest="pin_mem", action="store_false")
    g.add_argument("--world_size", type=int, default=1, help="set by the launcher")
    g.add_argument("--dist_url", default="env://")
    g.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=-1,
                   help="passed by legacy launchers; the environment is used otherwise")
    g.add_argument("--amp", dest="amp", action="store_true", default=True, help="mixed precision on CUDA (default)")
    g.add_argument("--no-amp", dest="amp", action="store_false")
    g.add_argument("--log-every", type=int, default=20, help="log every N steps")
    g.add_argument("--max-steps", type=int, default=None, help="cap steps per epoch (smoke tests)")

    g = p.add_argument_group("dependency criterion (ranking heads and neurons)")
    g.add_argument("--criterion", default="hsic", choices=["hsic", "magnitude", "random"],
                   help="how components are ranked (hsic: the paper's dependency criterion)")
    g.add_argument("--criterion-batches", type=int, default=None,
                   help="training batches (per process) the criterion averages over (default 4)")
    g.add_argument("--head-lambda", type=float, default=0.1, help="weight of head redundancy")
    g.add_argument("--neuron-alpha", type=float, default=0.1, help="weight of neuron relevance vs |activation|")
    g.add_argument("--no-head-normalize", dest="head_normalize", action="store_false", default=True,
                   help="use the paper's unnormalised head HSIC (default: normalised, see README)")
    g.add_argument("--hsic-bandwidth", default=None, choices=["multi", "median"],
                   help="Gaussian kernel bandwidth rule (default: the criterion's, see README)")

    g = p.add_argument_group("search (GP expected improvement over per-block keep ratios)")
    g.add_argument("--search", action="store_true", help="search a pruning policy under a FLOPs budget")
    g.add_argument("--search_flops", "--search-flops", dest="search_flops", type=float, default=None,
                   help="target GMACs (multiply-accumulates, the paper's FLOPs: DeiT-S dense = 4.6)")
    g.add_argument("--search-reduction", type=float, default=None,
                   help="target as a fraction of GMACs removed, e.g. 0.4 (instead of --search_flops)")
    g.add_argument("--search_epoch", "--search-epoch", dest="search_epoch", type=int, default=None,
                   help="EI iterations after the initial population (IMNET: 100, DIGITS: 30)")
    g.add_argument("--search_population", "--search-population", dest="search_population", type=int, default=None,
                   help="initial random feasible policies (IMNET: 100, DIGITS: 20)")
    g.add_argument("--search-max-ratio", type=float, default=0.5, help="upper bound of every removal ratio")
    g.add_argument("--search-tol", type=float, default=0.02, help="relative FLOPs tolerance of a feasible policy")
    g.add_argument("--search-mode", default="ei", choices=["ei", "random"], help="ei, or the random-search baseline")
    g.add_argument("--search-pool", type=int, default=None,
                   help="fresh feasible candidates scored by EI per step (IMNET: 10000, DIGITS: 1000)")
    g.add_argument("--search-holdout", default=None,
                   help="search split held out of the training set: images (int) or a fraction "
                        "(default: 20%% of the training set, at most 10000 images)")
    g.add_argument("--search-on-val", action="store_true",
                   help="score candidates on the validation set (the paper's setting; biased)")
    g.add_argument("--round-to", type=int, default=8,
                   help="keep neuron counts at multiples of N (default 8: fast matrix shapes on CPUs and GPUs; 1 = exact ratios)")
    g.add_argument("--fuse", default="mean", choices=["mean", "weighted"], help="how dropped tokens are fused")

    g = p.add_argument_group("prune + finetune")
    g.add_argument("--prune_finetune", "--prune-finetune", dest="prune_finetune", action="store_true",
                   help="prune the --resume model by a policy and finetune it with distillation")
    g.add_argument("--neuron_pruning", "--neuron-pruning", dest="neuron_pruning", action="store_true",
                   help="prune MLP neurons (with none of the three flags: all dimensions)")
    g.add_argument("--head_pruning", "--head-pruning", dest="head_pruning", action="store_true",
                   help="prune attention heads")
    g.add_argument("--token_pruning", "--token-pruning", dest="token_pruning", action="store_true",
                   help="reduce tokens")
    g.add_argument("--neuron_sparsity", "--neuron-sparsity", dest="neuron_sparsity", type=float, default=None,
                   help="uniform fraction of neurons removed per block (instead of a searched policy)")
    g.add_argument("--head_sparsity", "--head-sparsity", dest="head_sparsity", type=float, default=None,
                   help="uniform fraction of heads removed per block")
    g.add_argument("--token_sparsity", "--token-sparsity", dest="token_sparsity", type=float, default=None,
                   help="token-removal rate r (keep (1-r)^k at the k-th reduction)")
    g.add_argument("--policy", default="", help="policy JSON (default: output_dir/search/best_policy.json)")
    g.add_argument("--finetune-epochs", type=int, default=None, help="finetuning epochs (IMNET: 30, DIGITS: 30)")
    g.add_argument("--finetune-lr", type=float, default=None, help="finetuning base lr (IMNET: 5e-5, DIGITS: 2e-3)")

    g = p.add_argument_group("pipeline")
    g.add_argument("--pipeline", action="store_true",
                   help="pretrain, search and prune+finetune in one run, then print a dense-vs-compressed table")
    g.add_argument("--pipeline-reductions", default="0.4,0.6",
                   help="comma-separated FLOPs reductions to search and finetune, e.g. 0.4,0.6")
    return p


def resolve_defaults(args):
    """Fill the recipe-dependent defaults (None) from the data set's recipe."""
    if args.data_set is None:
        args.data_set = "IMNET" if args.data_path else "DIGITS"
    recipe = RECIPES["DIGITS" if args.data_set == "DIGITS" else "IMAGE"]
    if args.input_size is None and args.model is not None and args.model != recipe["model"]:
        args.input_size = native_input_size(args.model)
    for key in RECIPE_KEYS:
        if hasattr(args, key) and getattr(args, key) is None:
            setattr(args, key, recipe[key])
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.pin_mem is None:
        args.pin_mem = args.device.startswith("cuda")
    if args.data_set == "CIFAR":
        args.data_set = "CIFAR100"
    return args


def native_input_size(name):
    """The image size a model was defined for (a preset's img_size, timm's pretrained config)."""
    import models
    if name in models.PRESETS:
        return models.PRESETS[name]["img_size"]
    try:
        import timm
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is not None and cfg.input_size:
            return int(cfg.input_size[-1])
    except (RuntimeError, ValueError, AttributeError):
        pass
    return 224


def check_args(args):
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device} asked for but CUDA is not available")
    if args.round_to < 1:
        raise UserError(f"--round-to must be at least 1, got {args.round_to}")
    if not 0 < args.search_max_ratio < 1:
        raise UserError(f"--search-max-ratio must be in (0, 1), got {args.search_max_ratio}")
    if not 0 < args.search_tol < 1:
        raise UserError(f"--search-tol must be in (0, 1), got {args.search_tol}")
    for name in ("head_sparsity", "neuron_sparsity", "token_sparsity"):
        value = getattr(args, name)
        if value is not None and not 0 <= value < 1:
            raise UserError(f"--{name} must be in [0, 1), got {value}")
    for name in ("batch_size", "epochs", "input_size"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")


class Context:
    """What every mode needs once: args, device, rank info, output folder."""

    def __init__(self, args, dist_info):
        self.args = args
        self.device = dist_info["device"]
        self.distributed = dist_info["distributed"]
        self.rank = dist_info["rank"]
        self.world_size = dist_info["world_size"]
        self.out = args.output_dir or None
        self.amp = bool(args.amp and self.device.type == "cuda")


# ----------------------------------------------------------------------------- data

def build_data(ctx, train=True, val=True):
    import datasets
    args = ctx.args
    data = {}
    if train:
        ds_train, ncls = datasets.build_dataset(True, args)
        sampler = datasets.train_sampler(ds_train, args, ctx.distributed)
        data["train_set"] = ds_train
        data["train"] = datasets.make_loader(ds_train, sampler, args.batch_size, args, drop_last=True)
        if len(data["train"]) == 0:
            raise UserError(f"training set has {len(ds_train)} images, fewer than one batch of "
                            f"{args.batch_size} per process; lower --batch-size")
        data["num_classes"] = ncls
    if val:
        ds_val, ncls = datasets.build_dataset(False, args)
        sampler = datasets.eval_sampler(ds_val, ctx.distributed, args.dist_eval)
        data["val"] = datasets.make_loader(ds_val, sampler, int(1.5 * args.batch_size), args)
        data["num_classes"] = ncls
    return data


def mean_std(args):
    import datasets
    return datasets.data_stats(args.data_set)


# ----------------------------------------------------------------------------- model

def create_dense_model(ctx, num_classes):
    """The model named by --model, from --pretrained or --finetune when asked."""
    import models
    args = ctx.args
    model = models.build_model(args.model, num_classes=num_classes, img_size=args.input_size,
                               pretrained=args.pretrained, drop_rate=args.drop, drop_path_rate=args.drop_path)
    if args.finetune:
        models.load_finetune(model, args.finetune)
        logger.info(f"initialised from {args.finetune}")
    return model


def arch_of(ctx, model):
    import models
    mean, std = mean_std(ctx.args)
    return models.model_arch(ctx.args.model, model, ctx.args.input_size, mean, std)


def load_for_eval(ctx, num_classes):
    """Model for --eval / --throughput / search: a model file (dense or compressed) or --model + weights."""
    import models
    args = ctx.args
    path = resolve_resume(args)
    if path:
        ckpt = utils.load_checkpoint_file(path)
        if isinstance(ckpt.get("arch"), dict):
            model, _ = models.load_model_file(path, ckpt=ckpt)
            check_arch_matches(ctx, ckpt["arch"], path, num_classes)
            return model, ckpt["arch"]
        model = create_dense_model(ctx, num_classes)
        models.load_weights(model, path)
        return model, arch_of(ctx, model)
    model = create_dense_model(ctx, num_classes)
    return model, arch_of(ctx, model)


def check_arch_matches(ctx, arch, path, num_classes):
    args = ctx.args
    if args.model != arch["model"] and args.model != _recipe_model(args):
        raise utils.CheckpointError(f"{path} holds a {arch['model']} model, not {args.model}")
    args.model = arch["model"]
    if num_classes is not None and arch["num_classes"] != num_classes:
        raise utils.CheckpointError(f"{path} has {arch['num_classes']} classes but the data set has {num_classes}")
    if arch["input_size"] != args.input_size:
        logger.info(f"using the model file's input size {arch['input_size']} (not {args.input_size})")
        args.input_size = arch["input_size"]


def _recipe_model(args):
    return RECIPES["DIGITS" if args.data_set == "DIGITS" else "IMAGE"]["model"]


def resolve_resume(args, folder=None):
    """--resume path, or 'auto' = the run's own checkpoint.pth when it exists."""
    if args.resume == "auto":
        path = os.path.join(folder or args.output_dir, "checkpoint.pth")
        return path if os.path.exists(path) else ""
    return args.resume


# ----------------------------------------------------------------------------- training

def build_teacher(ctx, num_classes):
    import models
    args = ctx.args
    if not args.teacher_path:
        raise UserError("--distillation-type needs --teacher-path (a weights file or a model file)")
    ckpt = utils.load_checkpoint_file(args.teacher_path)
    if isinstance(ckpt.get("arch"), dict):
        teacher, _ = models.load_model_file(args.teacher_path, device=ctx.device, ckpt=ckpt)
    else:
        teacher = models.build_model(args.teacher_model, num_classes=num_classes)
        models.load_weights(teacher, args.teacher_path)
    return teacher.to(ctx.device).eval()


def fit(ctx, model, arch, data, run_dir, epochs, lr, teacher=None, distillation="none", resume_path="",
        tag="train"):
    """The DeiT training loop with atomic per-epoch checkpoints in ``run_dir``.

    Resumes model, optimizer, scheduler, scaler, EMA and epoch from ``resume_path`` when it
    holds a training state. Returns the final evaluation stats.
    """
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    import engine
    args = ctx.args
    device = ctx.device
    model.to(device)
    model_without_ddp = model
    if ctx.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    global_batch = args.batch_size * ctx.world_size
    scaled_lr = lr if args.unscale_lr else lr * global_batch / 512.0
    opt_kwargs = dict(eps=args.opt_eps, momentum=args.momentum)
    if args.opt_betas:
        opt_kwargs["betas"] = tuple(args.opt_betas)
    optimizer = create_optimizer_v2(model_without_ddp, opt=args.opt, lr=scaled_lr,
                                    weight_decay=args.weight_decay, **opt_kwargs)
    steps_per_epoch = len(data["train"]) if args.max_steps is None else min(len(data["train"]), args.max_steps)
    scheduler, _ = create_scheduler_v2(optimizer, sched=args.sched, num_epochs=epochs, decay_epochs=args.decay_epochs,
                                       decay_rate=args.decay_rate, min_lr=args.min_lr, warmup_lr=args.warmup_lr,
                                       warmup_epochs=min(args.warmup_epochs, max(epochs - 1, 0)),
                                       cooldown_epochs=0, step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda") if ctx.amp else None
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model_without_ddp, decay=args.model_ema_decay,
                               device="cpu" if args.model_ema_force_cpu else None)

    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=data["num_classes"])
    if mixup_fn is not None:
        base = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        base = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        base = torch.nn.CrossEntropyLoss()
    criterion = engine.DistillationLoss(base, teacher, distillation, args.distillation_alpha, args.distillation_tau)

    start_epoch, best = args.start_epoch, {"acc1": -1.0}
    if resume_path:
        ckpt = utils.load_checkpoint_file(resume_path)
        if "optimizer" in ckpt and "epoch" in ckpt:
            import models
            models.load_state_strict(model_without_ddp, ckpt["model"], resume_path)
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["lr_scheduler"])
            if scaler is not None and ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            if model_ema is not None and isinstance(ckpt.get("model_ema"), dict):
                model_ema.module.load_state_dict(ckpt["model_ema"])
            start_epoch = int(ckpt["epoch"]) + 1
            best = ckpt.get("best", best)
            logger.info(f"resumed {resume_path} at epoch {start_epoch}")

    scheduler.step_update(start_epoch * steps_per_epoch)
    log_path = os.path.join(run_dir, "log.jsonl") if run_dir else None
    stats = None
    if start_epoch >= epochs:
        stats = engine.evaluate(data["val"], model_without_ddp, device, ctx.amp)
        logger.info(f"{tag}: nothing left to train (epoch {start_epoch} of {epochs}); val top-1 {stats['acc1']:.2f}")
        return stats
    t0 = time.time()
    for epoch in range(start_epoch, epochs):
        sampler = data["train"].sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        # seed the augmentation per (seed, rank, epoch): a resumed epoch replays the same draws
        torch.manual_seed(args.seed * 1000 + ctx.rank * 100003 + epoch)
        train_stats = engine.train_one_epoch(
            model, criterion, data["train"], optimizer, device, epoch, scaler=scaler, amp=ctx.amp,
            clip_grad=args.clip_grad, model_ema=model_ema, mixup_fn=mixup_fn, total_epochs=epochs,
            log_every=args.log_every, max_steps=args.max_steps, lr_scheduler=scheduler)
        stats = engine.evaluate(data["val"], model_without_ddp, device, ctx.amp)
        ema_stats = engine.evaluate(data["val"], model_ema.module, device, ctx.amp) if model_ema else None
        is_best = stats["acc1"] > best["acc1"]
        if is_best:
            best = {"acc1": stats["acc1"], "epoch": epoch}
        elapsed = time.time() - t0
        done = epoch + 1 - start_epoch
        eta = elapsed / done * (epochs - epoch - 1)
        logger.info(f"{tag} epoch {epoch}: loss {train_stats.get('loss', float('nan')):.4f} "
                    f"val top-1 {stats['acc1']:.2f} top-5 {stats['acc5']:.2f} (best {best['acc1']:.2f}) "
                    f"elapsed {utils.format_seconds(elapsed)} eta {utils.format_seconds(eta)}")
        if run_dir:
            ckpt = {"arch": arch, "model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
                    "lr_scheduler": scheduler.state_dict(), "epoch": epoch, "args": _plain(vars(args)),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "model_ema": model_ema.module.state_dict() if model_ema else None, "best": best}
            utils.save_atomic(ckpt, os.path.join(run_dir, "checkpoint.pth"))
            if is_best:
                utils.save_atomic({"arch": arch, "model": model_without_ddp.state_dict(), "epoch": epoch,
                                   "args": _plain(vars(args)), "val": stats}, os.path.join(run_dir, "best.pth"))
            record = {"epoch": epoch, **{f"train_{k}": v for k, v in train_stats.items()},
                      **{f"test_{k}": v for k, v in stats.items()}, "seconds": round(elapsed, 2)}
            if ema_stats:
                record.update({f"ema_{k}": v for k, v in ema_stats.items()})
            utils.append_jsonl(log_path, record)
    return stats


def _plain(d):
    """Only primitives survive into checkpoints (weights_only=True loads them)."""
    out = {}
    for k, v in d.items():
        if v is None or isinstance(v, (bool, int, float, str)):
            out[k] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (bool, int, float, str)) for x in v):
            out[k] = list(v)
        else:
            out[k] = str(v)
    return out


# ----------------------------------------------------------------------------- modes

def run_train(ctx):
    args = ctx.args
    data = build_data(ctx)
    resume_path = resolve_resume(args)
    model = create_dense_model(ctx, data["num_classes"])
    arch = arch_of(ctx, model)
    if resume_path:
        ckpt = utils.load_checkpoint_file(resume_path)
        import models
        if isinstance(ckpt.get("arch"), dict) and ckpt["arch"].get("prune_spec"):
            model, _ = models.load_model_file(resume_path, ckpt=ckpt)  # continue a compressed model
            arch = ckpt["arch"]
        elif "optimizer" not in ckpt:
            models.load_weights(model, resume_path)
        if "optimizer" not in ckpt:
            resume_path = ""  # weights only: a fresh schedule from them
    teacher = None
    distillation = args.distillation_type or "none"
    if distillation != "none":
        teacher = build_teacher(ctx, data["num_classes"])
    logger.info(f"training {args.model} on {args.data_set}: {len(data['train_set'])} images, "
                f"{args.epochs} epochs, {ctx.world_size} process(es), device {ctx.device}")
    stats = fit(ctx, model, arch, data, ctx.out, args.epochs, args.lr, teacher=teacher,
                distillation=distillation, resume_path=resume_path)
    logger.info(f"final val top-1 {stats['acc1']:.2f} top-5 {stats['acc5']:.2f}")
    return stats


def run_eval(ctx):
    data = build_data(ctx, train=False)
    model, arch = load_for_eval(ctx, data["num_classes"])
    model.to(ctx.device)
    import engine
    stats = engine.evaluate(data["val"], model, ctx.device, ctx.amp, log_every=ctx.args.log_every)
    logger.info(f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.4f} "
                f"on {stats['n']} images")
    if ctx.rank == 0:
        print(json.dumps({"acc1": stats["acc1"], "acc5": stats["acc5"], "loss": stats["loss"], "n": stats["n"]}))
    return stats


def run_throughput(ctx):
    import engine
    import flops
    args = ctx.args
    model, arch = load_for_eval(ctx, None if args.resume else _num_classes_guess(args))
    model.to(ctx.device)
    macs = flops.model_macs(model)
    rate = engine.throughput(model, ctx.device, args.throughput_batch, arch["input_size"], amp=ctx.amp)
    result = {"model": arch["model"], "compressed": bool(arch.get("prune_spec")), "gmacs": macs["macs"] / 1e9,
              "params": macs["params"], "images_per_s": rate, "batch": args.throughput_batch,
              "device": str(ctx.device), "amp": ctx.amp}
    logger.info(f"{arch['model']}: {result['gmacs']:.3f} GMACs, {macs['params'] / 1e6:.2f} M params, "
                f"{rate:.1f} images/s at batch {args.throughput_batch} on {ctx.device}")
    if ctx.rank == 0:
        print(json.dumps(result))
    return result


# ----------------------------------------------------------------------------- compression helpers

def load_dense(ctx, num_classes):
    """The dense model to compress, from --resume (a model file or plain weights)."""
    if not resolve_resume(ctx.args):
        raise UserError("search and prune+finetune compress a trained model: pass --resume CHECKPOINT")
    model, arch = load_for_eval(ctx, num_classes)
    if arch.get("prune_spec"):
        raise UserError(f"{ctx.args.resume} is already compressed; pass the dense checkpoint to --resume")
    return model.to(ctx.device).eval(), arch


def criterion_loader(ctx, dataset):
    """--criterion-batches batches per process from a fixed shuffle of the (un-augmented)
    training set. Whole batches are dealt to ranks in turn, so W processes with k batches each
    score exactly the batches that one process with k*W batches scores."""
    import datasets
    args = ctx.args
    g = torch.Generator()
    g.manual_seed(args.seed)
    bs = args.batch_size
    n_batches = max(1, min(args.criterion_batches * ctx.world_size, len(dataset) // bs))
    chosen = torch.randperm(len(dataset), generator=g)[:n_batches * bs].tolist()
    batches = [chosen[i * bs:(i + 1) * bs] for i in range(n_batches)]
    mine = [i for b in batches[ctx.rank::ctx.world_size] for i in b]
    subset = torch.utils.data.Subset(dataset, mine)
    return datasets.make_loader(subset, torch.utils.data.SequentialSampler(subset), bs, args)


def rank_dense(ctx, model, train_plain):
    import dependency_criterion as dc
    args = ctx.args
    kw = dict(num_batches=args.criterion_batches, criterion=args.criterion, head_lambda=args.head_lambda,
              neuron_alpha=args.neuron_alpha, seed=args.seed, head_normalize=args.head_normalize)
    if args.hsic_bandwidth:
        kw["bandwidth"] = args.hsic_bandwidth
    t0 = time.time()
    rankings = dc.rank_model(model, criterion_loader(ctx, train_plain), **kw)
    logger.info(f"ranked heads and neurons with the {args.criterion} criterion in {time.time() - t0:.1f}s")
    return rankings


def active_dims(args):
    """(heads, neurons, tokens) switched on: the --*_pruning flags, or all three when none is given."""
    flags = (args.head_pruning, args.neuron_pruning, args.token_pruning)
    return flags if any(flags) else (True, True, True)


def sliced_copy(dense, spec):
    import copy
    import pruning
    model = copy.deepcopy(dense)
    pruning.apply_spec(model, spec)
    return model


def search_split(ctx, train_plain, val_set):
    """(dataset, description) that candidates are scored on: a stratified hold-out of the
    training set by default, the validation set with --search-on-val."""
    import datasets
    args = ctx.args
    if args.search_on_val:
        return val_set, f"the validation set ({len(val_set)} images; --search-on-val)"
    size = args.search_holdout
    if size is None:
        size = min(10000, max(1, round(0.2 * len(train_plain))))
    else:
        size = float(size) if "." in str(size) else int(size)
    targets = getattr(train_plain, "targets", None)
    if targets is None:
        targets = [train_plain[i][1] for i in range(len(train_plain))]
    held = datasets.stratified_holdout(targets, size, seed=args.seed)
    return torch.utils.data.Subset(train_plain, held), f"a stratified hold-out of {len(held)} training images"


def split_loader(ctx, dataset):
    import datasets
    sampler = datasets.ShardSampler(len(dataset)) if ctx.distributed else \
        torch.utils.data.SequentialSampler(dataset)
    return datasets.make_loader(dataset, sampler, int(1.5 * ctx.args.batch_size), ctx.args)


def search_target(args, dense_gmacs):
    if args.search_flops is not None and args.search_reduction is not None:
        raise UserError("give either --search_flops or --search-reduction, not both")
    if args.search_flops is not None:
        if args.search_flops <= 0:
            raise UserError(f"--search_flops must be positive GMACs, got {args.search_flops}")
        return float(args.search_flops)
    if args.search_reduction is not None:
        if not 0 < args.search_reduction < 1:
            raise UserError(f"--search-reduction must be in (0, 1), got {args.search_reduction}")
        return dense_gmacs * (1 - args.search_reduction)
    raise UserError(f"--search needs a budget: --search_flops GMACS (the dense model has {dense_gmacs:.3f}) "
                    f"or --search-reduction FRACTION")


# ----------------------------------------------------------------------------- search mode

def run_search(ctx):
    import datasets
    import engine
    import expected_improvement as ei
    import flops
    import numpy as np
    import pruning
    args = ctx.args
    train_plain, ncls = datasets.build_dataset(True, args, train_transform=False)
    val_set, _ = datasets.build_dataset(False, args)
    dense, arch = load_dense(ctx, ncls)
    dims = pruning.model_dims(dense)
    depth = dims["depth"]
    dense_gmacs = flops.model_macs(dense)["macs"] / 1e9
    target = search_target(args, dense_gmacs)

    heads_on, neurons_on, tokens_on = active_dims(args)
    active = np.array([heads_on] * depth + [neurons_on] * depth + [tokens_on])

    def flops_fn(X):
        return flops.policy_gmacs(dims, X, round_to=args.round_to)
    try:
        sampler = ei.FeasibleSampler(flops_fn, target, dim=2 * depth + 1, lower=0.0, upper=args.search_max_ratio,
                                     tol=args.search_tol, active=active)
    except ei.InfeasibleTarget as e:
        raise UserError(str(e)) from e

    split, split_desc = search_split(ctx, train_plain, val_set)
    loader = split_loader(ctx, split)
    rankings = rank_dense(ctx, dense, train_plain)
    out = os.path.join(ctx.out, "search") if ctx.out else None
    log_path = os.path.join(out, "search_log.jsonl") if out else None
    if out and ctx.rank == 0:
        os.makedirs(out, exist_ok=True)
        utils.write_json_atomic(os.path.join(out, "rankings.json"), rankings)

    total = args.search_population + args.search_epoch
    def new_search():
        # local refinement scores 2 x 5 x pool/20 candidates: together about as many as the pool
        return ei.GPEI(2 * depth + 1, sampler, n_init=args.search_population, seed=args.seed,
                       pool_size=args.search_pool, mode=args.search_mode,
                       refine_per_point=max(20, args.search_pool // 20))
    search = new_search()
    header = {"target_gmacs": target, "seed": args.seed, "mode": args.search_mode, "criterion": args.criterion,
              "active": active.tolist(), "max_ratio": args.search_max_ratio, "tol": args.search_tol}
    records = []
    if log_path and os.path.exists(log_path):
        records = utils.read_jsonl(log_path)
        for rec in records:
            if rec.get("search") != header:
                raise UserError(f"{log_path} belongs to another search ({rec.get('search')}); "
                                f"use another --output_dir or delete it")
            search.tell(np.asarray(rec["x"]), rec["acc1"])
        records = records[:total]
        if records:
            logger.info(f"search: resuming after {len(records)} finished evaluations from {log_path}")
        if ctx.rank == 0:  # rewrite without a torn last line
            with open(log_path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
    records = utils.broadcast_object(records)
    if ctx.rank != 0:
        search = new_search()
        for rec in records:
            search.tell(np.asarray(rec["x"]), rec["acc1"])

    logger.info(f"search: {args.search_mode} over {int(active.sum())} ratios, target {target:.4g} GMACs "
                f"(dense {dense_gmacs:.4g}, reachable {sampler.reachable_range()[0]:.4g}-"
                f"{sampler.reachable_range()[1]:.4g}), {total} evaluations on {split_desc}")
    t_start = time.time()
    done_here = 0
    for step in range(len(records), total):
        t0 = time.time()
        gp_before = search.gp_seconds
        proposal = None
        if ctx.rank == 0:
            x, acq = search.ask()
            proposal = (np.asarray(x, dtype=np.float64).tolist(), None if acq is None else float(acq))
        x_list, acq = utils.broadcast_object(proposal)
        x = np.asarray(x_list)
        policy = pruning.policy_from_vector(x, depth)
        spec = pruning.policy_to_spec(policy, rankings, dims, round_to=args.round_to, fuse=args.fuse)
        model = sliced_copy(dense, spec)
        counted = flops.model_macs(model)
        stats = engine.evaluate(loader, model, ctx.device, ctx.amp)
        search.tell(x, stats["acc1"])
        rec = {"step": step, "search": header, "x": x_list, "policy": policy, "gmacs": counted["macs"] / 1e9,
               "params": counted["params"], "acc1": stats["acc1"], "loss": stats["loss"], "ei": acq,
               "phase": "init" if step < args.search_population else args.search_mode,
               "seconds": round(time.time() - t0, 3), "gp_seconds": round(search.gp_seconds - gp_before, 4)}
        records.append(rec)
        if log_path:
            utils.append_jsonl(log_path, rec)
        done_here += 1
        best = max(r["acc1"] for r in records)
        eta = (time.time() - t_start) / done_here * (total - step - 1)
        logger.info(f"search [{step + 1}/{total}] {rec['phase']} gmacs {rec['gmacs']:.4g} acc {stats['acc1']:.2f} "
                    f"best {best:.2f} eta {utils.format_seconds(eta)}")

    best_rec = max(records, key=lambda r: (r["acc1"], -r["step"]))
    best_policy = pruning.policy_from_vector(np.asarray(best_rec["x"]), depth)
    spec = pruning.policy_to_spec(best_policy, rankings, dims, round_to=args.round_to, fuse=args.fuse)
    best_model = sliced_copy(dense, spec)
    val_loader = build_data(ctx, train=False)["val"]
    val_stats = engine.evaluate(val_loader, best_model, ctx.device, ctx.amp)
    spent = sum(r["seconds"] for r in records)
    gp_spent = sum(r.get("gp_seconds", 0.0) for r in records)  # per-step GP+EI time, also over a resume
    result = {"policy": best_policy, "vector": best_rec["x"], "target_gmacs": target, "gmacs": best_rec["gmacs"],
              "dense_gmacs": dense_gmacs, "params": best_rec["params"], "search_acc1": best_rec["acc1"],
              "val_acc1_before_finetune": val_stats["acc1"], "step": best_rec["step"], "evaluations": len(records),
              "mode": args.search_mode, "criterion": args.criterion, "split": split_desc, "model": arch["model"],
              "input_size": arch["input_size"], "round_to": args.round_to, "fuse": args.fuse,
              "gp_share": (gp_spent / spent) if spent > 0 and args.search_mode == "ei" else None}
    logger.info(f"search done: best {best_rec['acc1']:.2f} on the search split at {best_rec['gmacs']:.4g} GMACs "
                f"(target {target:.4g}); val top-1 before finetune {val_stats['acc1']:.2f}")
    if out and ctx.rank == 0:
        utils.write_json_atomic(os.path.join(out, "best_policy.json"), result)
        plot_search(records, os.path.join(out, "search.png"))
    return result


def plot_search(records, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed: no search plot (pip install matplotlib)")
        return
    steps = [r["step"] for r in records]
    acc = [r["acc1"] for r in records]
    running = [max(acc[:i + 1]) for i in range(len(acc))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.scatter(steps, acc, s=12, label="evaluated policy")
    ax.plot(steps, running, color="C1", label="best so far")
    n_init = sum(1 for r in records if r["phase"] == "init")
    if n_init:
        ax.axvline(n_init - 0.5, color="grey", linestyle=":", label="end of random population")
    ax.set_xlabel("evaluation")
    ax.set_ylabel("top-1 on the search split (%)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- prune + finetune mode

def resolve_policy(ctx, depth):
    """The policy to apply: --policy, the search's best_policy.json in output_dir, or the
    uniform --*_sparsity ratios. Dimensions not switched on by the --*_pruning flags are zeroed."""
    import pruning
    args = ctx.args
    uniform = any(v is not None for v in (args.head_sparsity, args.neuron_sparsity, args.token_sparsity))
    path = args.policy or (os.path.join(ctx.out, "search", "best_policy.json") if ctx.out else "")
    if uniform and not args.policy:
        policy = pruning.uniform_policy(depth, head=args.head_sparsity or 0.0, neuron=args.neuron_sparsity or 0.0,
                                        token=args.token_sparsity or 0.0)
        source = "uniform ratios"
    elif path and os.path.exists(path):
        try:
            with open(path) as f:
                loaded = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read policy {path}: {e}") from e
        policy = loaded.get("policy", loaded) if isinstance(loaded, dict) else loaded
        source = path
    else:
        where = f" ({path} does not exist)" if path else ""
        raise UserError(f"no pruning policy{where}: run --search first, pass --policy FILE, or give "
                        f"--head_sparsity/--neuron_sparsity/--token_sparsity")
    try:
        pruning.validate_policy(policy, depth)
    except pruning.SpecError as e:
        raise UserError(f"policy from {source}: {e}") from e
    heads_on, neurons_on, tokens_on = active_dims(args)
    policy = {"head": [float(v) if heads_on else 0.0 for v in policy["head"]],
              "neuron": [float(v) if neurons_on else 0.0 for v in policy["neuron"]],
              "token": float(policy["token"]) if tokens_on else 0.0}
    return policy, source


def run_prune_finetune(ctx):
    import datasets
    import engine
    import flops
    import models
    import pruning
    args = ctx.args
    data = build_data(ctx)
    train_plain, _ = datasets.build_dataset(True, args, train_transform=False)
    dense, dense_arch = load_dense(ctx, data["num_classes"])
    dims = pruning.model_dims(dense)
    policy, source = resolve_policy(ctx, dims["depth"])
    run_dir = os.path.join(ctx.out, "prune_finetune") if ctx.out else None
    resume = os.path.join(run_dir, "checkpoint.pth") if run_dir and os.path.exists(
        os.path.join(run_dir, "checkpoint.pth")) else ""

    if resume:
        model, ckpt = models.load_model_file(resume, device=ctx.device)
        arch = ckpt["arch"]
        if arch["prune_spec"].get("policy") and arch["prune_spec"]["policy"]["head"] != policy["head"]:
            raise UserError(f"{run_dir} holds the finetuning of another policy; use another --output_dir")
        logger.info(f"prune+finetune: continuing the compressed model in {resume}")
    else:
        rankings = rank_dense(ctx, dense, train_plain)
        spec = pruning.policy_to_spec(policy, rankings, dims, round_to=args.round_to, fuse=args.fuse)
        model = sliced_copy(dense, spec)
        arch = dict(dense_arch, prune_spec=model.prune_spec)
    model.to(ctx.device)
    dense_m, comp_m = flops.model_macs(dense), flops.model_macs(model)
    logger.info(f"policy from {source}: {dense_m['macs'] / 1e9:.4g} -> {comp_m['macs'] / 1e9:.4g} GMACs "
                f"({100 * (1 - comp_m['macs'] / dense_m['macs']):.1f}% fewer), params "
                f"{dense_m['params'] / 1e6:.3f}M -> {comp_m['params'] / 1e6:.3f}M")
    before = engine.evaluate(data["val"], model, ctx.device, ctx.amp)
    dense_stats = engine.evaluate(data["val"], dense, ctx.device, ctx.amp)
    logger.info(f"val top-1: dense {dense_stats['acc1']:.2f}, pruned before finetune {before['acc1']:.2f}")

    distillation = args.distillation_type or "soft"
    teacher = dense if distillation != "none" else None
    stats = fit(ctx, model, arch, data, run_dir, args.finetune_epochs, args.finetune_lr, teacher=teacher,
                distillation=distillation, resume_path=resume, tag="finetune")
    result = {"policy": policy, "policy_source": source, "dense_gmacs": dense_m["macs"] / 1e9,
              "gmacs": comp_m["macs"] / 1e9, "dense_params": dense_m["params"], "params": comp_m["params"],
              "dense_acc1": dense_stats["acc1"], "acc1_before_finetune": before["acc1"],
              "acc1": stats["acc1"], "acc5": stats["acc5"], "finetune_epochs": args.finetune_epochs}
    if run_dir and ctx.rank == 0:
        final = os.path.join(run_dir, "compressed.pth")
        models.save_model_file(final, model, arch, extra={"val": stats, "args": _plain(vars(args))})
        result["file"] = final
        utils.write_json_atomic(os.path.join(run_dir, "result.json"), result)
        logger.info(f"compressed model written to {final} (load it with models.load_model_file)")
    logger.info(f"prune+finetune done: val top-1 {stats['acc1']:.2f} (dense {dense_stats['acc1']:.2f}, "
                f"before finetune {before['acc1']:.2f}) at {result['gmacs']:.4g} GMACs")
    return result


# ----------------------------------------------------------------------------- pipeline

def _sub_context(ctx, out, **overrides):
    import copy
    args = copy.copy(ctx.args)
    for k, v in overrides.items():
        setattr(args, k, v)
    sub = copy.copy(ctx)
    sub.args = args
    sub.out = out
    args.output_dir = out or ""
    return sub


def measure_speed(ctx, path, batch, repeats=15):
    """Images/s of each model file, interleaved over rounds so machine noise hits all alike."""
    import statistics
    import engine
    import models
    loaded = [models.load_model_file(p, device=ctx.device)[0] for p in path]
    size = ctx.args.input_size
    rates = [[] for _ in loaded]
    for _ in range(repeats):
        for i, m in enumerate(loaded):
            rates[i].append(engine.throughput(m, ctx.device, batch, size, amp=ctx.amp, warmup=1, repeats=3))
    return [statistics.median(r) for r in rates]


def run_pipeline(ctx):
    """Pretrain -> search -> prune+finetune for each reduction, then a dense-vs-compressed table.
    Rerunning the same command resumes: each step picks up what it finished."""
    args = ctx.args
    if not ctx.out:
        raise UserError("--pipeline needs --output_dir")
    try:
        reductions = [float(r) for r in str(args.pipeline_reductions).split(",") if r.strip()]
    except ValueError:
        raise UserError(f"--pipeline-reductions must be comma-separated fractions, got {args.pipeline_reductions}") from None
    if not reductions or not all(0 < r < 1 for r in reductions):
        raise UserError(f"--pipeline-reductions must be fractions in (0, 1), got {args.pipeline_reductions}")
    t0 = time.time()
    dense_dir = os.path.join(ctx.out, "dense")
    dense_ckpt = os.path.join(dense_dir, "checkpoint.pth")
    logger.info(f"pipeline 1/3: pretraining {args.model} into {dense_dir}")
    run_train(_sub_context(ctx, dense_dir, resume="auto", eval=False, search=False, prune_finetune=False))
    rows = []
    for r in reductions:
        sub_dir = os.path.join(ctx.out, f"reduce{round(100 * r)}")
        best = os.path.join(sub_dir, "search", "best_policy.json")
        if os.path.exists(best) and ctx.rank == 0:
            logger.info(f"pipeline 2/3: using the finished search in {best}")
            with open(best) as f:
                found = json.load(f)
        else:
            logger.info(f"pipeline 2/3: searching a policy with {100 * r:.0f}% fewer GMACs")
            found = run_search(_sub_context(ctx, sub_dir, resume=dense_ckpt, search_reduction=r, search_flops=None))
        found = utils.broadcast_object(found)
        logger.info(f"pipeline 3/3: pruning and finetuning into {sub_dir}/prune_finetune")
        res = run_prune_finetune(_sub_context(ctx, sub_dir, resume=dense_ckpt, policy=best))
        res["reduction"] = r
        res["search_val_acc1"] = found.get("val_acc1_before_finetune")
        rows.append(res)
    if ctx.rank != 0:
        return rows
    files = [dense_ckpt] + [row["file"] for row in rows]
    speeds = measure_speed(ctx, files, batch=args.throughput_batch)
    table = [{"model": "dense", "gmacs": rows[0]["dense_gmacs"], "params": rows[0]["dense_params"],
              "acc1": rows[0]["dense_acc1"], "acc1_before_finetune": None, "images_per_s": speeds[0],
              "speedup": 1.0, "macs_ratio": 1.0, "file": dense_ckpt}]
    for row, speed in zip(rows, speeds[1:]):
        table.append({"model": f"-{100 * row['reduction']:.0f}% GMACs", "gmacs": row["gmacs"], "params": row["params"],
                      "acc1": row["acc1"], "acc1_before_finetune": row["acc1_before_finetune"],
                      "images_per_s": speed, "speedup": speed / speeds[0],
                      "macs_ratio": row["dense_gmacs"] / row["gmacs"], "file": row["file"]})
    summary = {"rows": table, "seconds": round(time.time() - t0, 1), "device": str(ctx.device),
               "throughput_batch": args.throughput_batch}
    utils.write_json_atomic(os.path.join(ctx.out, "summary.json"), summary)
    text = format_table(table)
    with open(os.path.join(ctx.out, "summary.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    logger.info(f"pipeline finished in {utils.format_seconds(summary['seconds'])}; summary in "
                f"{os.path.join(ctx.out, 'summary.md')}")
    return summary


def format_table(rows):
    head = "| model | GMACs | params (M) | val top-1 | top-1 before finetune | images/s | speed-up | MACs ratio |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        before = "" if r["acc1_before_finetune"] is None else f"{r['acc1_before_finetune']:.2f}"
        lines.append(f"| {r['model']} | {r['gmacs']:.4g} | {r['params'] / 1e6:.3f} | {r['acc1']:.2f} | {before} | "
                     f"{r['images_per_s']:.0f} | {r['speedup']:.2f}x | {r['macs_ratio']:.2f}x |")
    return "\n".join(lines)


def _num_classes_guess(args):
    return 10 if args.data_set in ("DIGITS", "CIFAR10") else 100 if args.data_set == "CIFAR100" else 1000


def main(args):
    resolve_defaults(args)
    check_args(args)
    dist_info = utils.init_distributed(args.device, args.dist_url, args.local_rank)
    try:
        utils.setup_logging(args.output_dir or None)
        ctx = Context(args, dist_info)
        utils.seed_everything(args.seed + ctx.rank)
        if ctx.out and ctx.rank == 0:
            os.makedirs(ctx.out, exist_ok=True)
            utils.write_json_atomic(os.path.join(ctx.out, "args.json"), _plain(vars(args)))
        mode = dispatch(ctx)
        return mode
    finally:
        utils.cleanup_distributed()


def dispatch(ctx):
    args = ctx.args
    if args.pipeline:
        return run_pipeline(ctx)
    if args.search:
        return run_search(ctx)
    if args.prune_finetune:
        return run_prune_finetune(ctx)
    if args.throughput:
        return run_throughput(ctx)
    if args.eval:
        return run_eval(ctx)
    return run_train(ctx)


def engine_errors():
    from engine import NonFiniteLoss
    return (NonFiniteLoss,)


def cli(argv=None):
    parser = argparse.ArgumentParser("main.py", parents=[get_args_parser()])
    args = parser.parse_args(argv)
    from pruning import SpecError
    try:
        main(args)
    except (UserError, SpecError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except engine_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted: the last finished epoch's checkpoint is intact; rerun with --resume auto",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
