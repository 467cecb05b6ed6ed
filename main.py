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
                  repeated_aug=True, model_ema=True, num_workers=10, finetune_epochs=30, finetune_lr=5e-5),
    "DIGITS": dict(model="vit_nano_patch4_32", input_size=32, epochs=60, batch_size=64, lr=1e-2,
                   warmup_epochs=3, cooldown_epochs=0, min_lr=1e-5, weight_decay=0.05, drop_path=0.0,
                   aa="none", smoothing=0.1, reprob=0.0, mixup=0.0, cutmix=0.0,
                   repeated_aug=False, model_ema=False, num_workers=0, finetune_epochs=15, finetune_lr=2e-3),
}
RECIPE_KEYS = tuple(RECIPES["IMAGE"])


def get_args_parser():
    p = argparse.ArgumentParser("Multi-dimensional ViT compression (DeiT-style training, HSIC criterion, "
                                "GP-EI policy search, physical pruning)", add_help=False)
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=None,
                   help="per-process batch size (IMNET: 64, DIGITS: 64)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (IMNET: 300, DIGITS: 60)")

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
    g.add_argument("--warmup-epochs", type=int, default=None, help="(IMNET: 5, DIGITS: 3)")
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
    g.add_argument("--throughput-batch", type=int, default=64)
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
    return p


def resolve_defaults(args):
    """Fill the recipe-dependent defaults (None) from the data set's recipe."""
    if args.data_set is None:
        args.data_set = "IMNET" if args.data_path else "DIGITS"
    recipe = RECIPES["DIGITS" if args.data_set == "DIGITS" else "IMAGE"]
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


def check_args(args):
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device} asked for but CUDA is not available")
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
            model, _ = models.load_model_file(path)
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
        teacher, _ = models.load_model_file(args.teacher_path, device=ctx.device)
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
    scheduler, _ = create_scheduler_v2(optimizer, sched=args.sched, num_epochs=epochs, decay_epochs=args.decay_epochs,
                                       decay_rate=args.decay_rate, min_lr=args.min_lr, warmup_lr=args.warmup_lr,
                                       warmup_epochs=min(args.warmup_epochs, max(epochs - 1, 0)),
                                       cooldown_epochs=0)
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
            models._load_state(model_without_ddp, ckpt["model"], resume_path)
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["lr_scheduler"])
            if scaler is not None and ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            if model_ema is not None and isinstance(ckpt.get("model_ema"), dict):
                model_ema.module.load_state_dict(ckpt["model_ema"])
            start_epoch = int(ckpt["epoch"]) + 1
            best = ckpt.get("best", best)
            logger.info(f"resumed {resume_path} at epoch {start_epoch}")

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
            log_every=args.log_every, max_steps=args.max_steps)
        scheduler.step(epoch + 1)
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
        if isinstance(ckpt.get("arch"), dict) and ckpt["arch"].get("prune_spec"):
            import models
            model, _ = models.load_model_file(resume_path)
            arch = ckpt["arch"]
        if "optimizer" not in ckpt:
            import models
            models.load_weights(model, resume_path)
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
    try:
        main(args)
    except UserError as e:
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
