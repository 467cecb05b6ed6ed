"""One training epoch, evaluation and throughput: device-agnostic (CPU, CUDA, AMP on CUDA)."""
import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import statistics
import time
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

import expected_improvement as ei
import flops
import pruning
from models import load, load_state_strict, save_model_file
from utils import (Progress, UserError, all_reduce_sum, append_jsonl, broadcast_object, check_run_identity,
                   decide_on_rank0, format_seconds, load_checkpoint_file, markdown_table, read_jsonl, save_atomic,
                   write_json_atomic, write_jsonl)

logger = logging.getLogger("vitcompress")


class NonFiniteLoss(RuntimeError):
    pass


def autocast(device, enabled):
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


class DistillationLoss(torch.nn.Module):
    """Base loss plus knowledge distillation from a teacher (DeiT): none, soft (KL at
    temperature tau) or hard (teacher's argmax). A distilled student returns (cls, dist)
    in training; a plain student's single output serves both terms."""

    def __init__(self, base_criterion, teacher, kind="none", alpha=0.5, tau=1.0):
        super().__init__()
        if kind not in ("none", "soft", "hard"):
            raise ValueError(f"unknown distillation type {kind}")
        if kind != "none" and teacher is None:
            raise ValueError("distillation needs a teacher model")
        self.base = base_criterion
        self.teacher = teacher
        self.kind = kind
        self.alpha = alpha
        self.tau = tau

    def forward(self, inputs, outputs, targets):
        cls_out, dist_out = (outputs if isinstance(outputs, (tuple, list)) else (outputs, outputs))
        base = self.base(cls_out, targets)
        if self.kind == "none":
            return base
        with torch.no_grad():
            t = self.teacher(inputs)
            if isinstance(t, (tuple, list)):
                t = (t[0] + t[1]) / 2
        if self.kind == "soft":
            T = self.tau
            kd = F.kl_div(F.log_softmax(dist_out / T, dim=1), F.log_softmax(t / T, dim=1),
                          reduction="batchmean", log_target=True) * (T * T)
        else:
            kd = F.cross_entropy(dist_out, t.argmax(dim=1))
        return base * (1 - self.alpha) + kd * self.alpha


def train_one_epoch(model, criterion, loader, optimizer, device, epoch, scaler=None, amp=False,
                    clip_grad=None, model_ema=None, mixup_fn=None, total_epochs=None, log_every=10,
                    max_steps=None, lr_scheduler=None):
    """Train for one pass over ``loader``. Raises NonFiniteLoss on a NaN/inf loss (before the
    optimizer step, so the weights and the last checkpoint stay good)."""
    model.train()
    steps = len(loader) if max_steps is None else min(len(loader), max_steps)
    header = f"Epoch [{epoch}/{total_epochs}]" if total_epochs else f"Epoch [{epoch}]"
    progress = Progress(steps, header, every=log_every)
    for step, (images, targets) in enumerate(loader):
        if step >= steps:
            break
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        with autocast(device, amp):
            outputs = model(images)
            loss = criterion(images, outputs, targets)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise NonFiniteLoss(f"loss is {loss_value} at epoch {epoch} step {step}; stopping "
                                f"(the last good checkpoint is kept; try a lower --lr or --clip-grad)")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
        if model_ema is not None:
            model_ema.update(model)
        if lr_scheduler is not None:  # per-step schedule: warm-up and cosine move every update
            lr_scheduler.step_update(epoch * steps + step + 1)
        progress.update(step, loss=loss_value, lr=optimizer.param_groups[0]["lr"])
    return progress.averages()


@torch.no_grad()
def evaluate(loader, model, device, amp=False, log_every=0, header="Test"):
    """Top-1, top-5 and mean loss over the loader. A loader sharded over ranks (its sampler has
    num_replicas > 1) has its counts summed over them, so a sharded evaluation (every image once)
    equals a single-process one exactly; an unsharded one (every rank sees every image) is not
    summed. No image at all is an error, not 0%."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss*n, correct1, correct5, n
    progress = Progress(len(loader), header, every=log_every) if log_every else None
    for step, (images, targets) in enumerate(loader):
        if targets.numel() == 0:  # every image of the batch was unreadable (skipped)
            continue
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp):
            out = model(images)
        if isinstance(out, (tuple, list)):
            out = (out[0] + out[1]) / 2
        out = out.float()
        loss = F.cross_entropy(out, targets, reduction="sum")
        k = min(5, out.shape[1])
        top = out.topk(k, dim=1).indices
        hit = top.eq(targets.view(-1, 1))
        sums += torch.tensor([loss.item(), hit[:, :1].sum().item(), hit.sum().item(), targets.numel()],
                             dtype=torch.float64)
        if progress:
            progress.update(step)
    if getattr(getattr(loader, "sampler", None), "num_replicas", 1) > 1:
        sums = sums.to(device) if device.type == "cuda" else sums
        all_reduce_sum(sums)
        sums = sums.cpu()
    if sums[3].item() == 0:
        raise UserError(f"no image was evaluated: all {len(loader.dataset)} validation images were unreadable "
                        f"(see the warnings above)")
    n = sums[3].item()
    model.train(was_training)
    return {"acc1": 100.0 * sums[1].item() / n, "acc5": 100.0 * sums[2].item() / n,
            "loss": sums[0].item() / n, "n": int(sums[3].item())}


def compile_model(model, device, fullgraph=False):
    """``torch.compile`` for inference at fixed shapes (inductor). On a CPU inductor builds C++
    kernels, so a missing compiler is reported as a one-line UserError before compiling.
    ``fullgraph=True`` makes any graph break an error (the test of the token-reducing block)."""
    if torch.device(device).type == "cpu":
        cxx = os.environ.get("CXX", "g++")
        if shutil.which(cxx) is None:
            raise UserError(f"torch.compile on a CPU needs a C++ compiler and '{cxx}' is not on PATH "
                            f"(Debian/Ubuntu: apt-get install g++); or run without --compile")
    return torch.compile(model, dynamic=False, fullgraph=fullgraph)


@torch.no_grad()
def throughput(model, device, batch_size=64, input_size=224, amp=False, warmup=3, repeats=10, compile=False):
    """Images per second: warm-up, then ``repeats`` timed batches; returns the median rate.
    ``compile=True`` measures ``compile_model(model)``: the first warm-up batch compiles (not timed)."""
    model.eval()
    if compile:
        model = compile_model(model, device)
        warmup = max(int(warmup), 1)
    try:
        return _timed_batches(model, device, batch_size, input_size, amp, warmup, repeats, compile)
    except RuntimeError as e:  # torch.OutOfMemoryError, or the CPU allocator's "can't allocate memory"
        if "memory" not in str(e) and "alloc" not in str(e):
            raise
        raise UserError(f"a batch of {batch_size} does not fit in memory on {device}; use a smaller "
                        f"--throughput-batch") from e


def _timed_batches(model, device, batch_size, input_size, amp, warmup, repeats, compile):
    x = torch.randn(batch_size, 3, input_size, input_size, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode(), autocast(device, amp):
        t0 = time.perf_counter()
        for _ in range(warmup):
            model(x)
        sync()
        if compile:
            logger.info(f"torch.compile and {warmup} warm-up batches took {time.perf_counter() - t0:.1f} s")
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            sync()
            rates.append(batch_size / (time.perf_counter() - t0))
    return statistics.median(rates)


# --------------------------------------------------------------------------- the training loop

@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that defines how a model is trained, as one explicit value.

    ``lr`` is the learning rate actually used (any batch-size scaling is the caller's).
    Pretraining and finetuning each build their own Recipe, so nothing leaks between them.
    """
    epochs: int
    lr: float
    opt: str = "adamw"
    opt_eps: float = 1e-8
    opt_betas: Optional[Tuple[float, ...]] = None
    momentum: float = 0.9
    weight_decay: float = 0.05
    sched: str = "cosine"
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_epochs: int = 0
    decay_epochs: float = 30
    decay_rate: float = 0.1
    clip_grad: Optional[float] = None
    smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    cutmix_minmax: Optional[Tuple[float, ...]] = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    model_ema: bool = False
    model_ema_decay: float = 0.99996
    model_ema_force_cpu: bool = False
    distillation: str = "none"
    distillation_alpha: float = 0.5
    distillation_tau: float = 1.0
    seed: int = 0
    max_steps: Optional[int] = None
    log_every: int = 20

    @property
    def uses_mixup(self):
        return self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None

    def as_dict(self):
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def take(cls, obj, **overrides):
        """A Recipe from the attributes of ``obj`` that this class names (lists become tuples)."""
        values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(cls) if hasattr(obj, f.name)}
        values.update(overrides)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _training_parts(model, recipe, steps_per_epoch, num_classes, teacher, amp):
    opt_kwargs = dict(eps=recipe.opt_eps, momentum=recipe.momentum)
    if recipe.opt_betas:
        opt_kwargs["betas"] = tuple(recipe.opt_betas)
    optimizer = create_optimizer_v2(model, opt=recipe.opt, lr=recipe.lr, weight_decay=recipe.weight_decay,
                                    **opt_kwargs)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=recipe.sched, num_epochs=max(recipe.epochs, 1), decay_epochs=recipe.decay_epochs,
        decay_rate=recipe.decay_rate, min_lr=recipe.min_lr, warmup_lr=recipe.warmup_lr,
        warmup_epochs=min(recipe.warmup_epochs, max(recipe.epochs - 1, 0)), cooldown_epochs=0,
        step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    mixup_fn = None
    if recipe.uses_mixup:
        mixup_fn = Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, cutmix_minmax=recipe.cutmix_minmax,
                         prob=recipe.mixup_prob, switch_prob=recipe.mixup_switch_prob, mode=recipe.mixup_mode,
                         label_smoothing=recipe.smoothing, num_classes=num_classes)
        base = SoftTargetCrossEntropy()
    elif recipe.smoothing > 0:
        base = LabelSmoothingCrossEntropy(smoothing=recipe.smoothing)
    else:
        base = torch.nn.CrossEntropyLoss()
    criterion = DistillationLoss(base, teacher, recipe.distillation, recipe.distillation_alpha,
                                 recipe.distillation_tau)
    scaler = torch.amp.GradScaler("cuda") if amp else None
    return optimizer, scheduler, mixup_fn, criterion, scaler


def fit(model, train_loader, val_loader, recipe, device, num_classes, run_dir=None, arch=None, teacher=None,
        resume=None, distributed=False, amp=False, rank=0, tag="train", extra=None):
    """Train ``model`` by ``recipe``, evaluating after every epoch; returns the final val stats.

    With ``run_dir``, every epoch atomically writes ``checkpoint.pth`` (arch, weights, optimizer,
    scheduler, scaler, EMA, epoch, best, ``extra`` primitives), ``best.pth`` and one line of
    ``log.jsonl``. ``resume`` is a loaded training checkpoint of this tool (its contents): the run
    continues after its epoch, and the log holds exactly the epochs up to that one.
    """
    model.to(device)
    inner = model
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    steps = len(train_loader) if recipe.max_steps is None else min(len(train_loader), recipe.max_steps)
    optimizer, scheduler, mixup_fn, criterion, scaler = _training_parts(
        inner, recipe, steps, num_classes, teacher, amp)
    model_ema = ModelEmaV3(inner, decay=recipe.model_ema_decay,
                           device="cpu" if recipe.model_ema_force_cpu else None) if recipe.model_ema else None

    start_epoch, best = 0, {"acc1": -1.0}
    if resume is not None:
        load_state_strict(inner, resume["model"], "the resumed checkpoint")
        optimizer.load_state_dict(resume["optimizer"])
        planned = (resume.get("recipe") or {}).get("epochs", recipe.epochs)
        if planned == recipe.epochs:
            scheduler.load_state_dict(resume["lr_scheduler"])
        else:  # the old schedule would keep the minimum lr for every epoch past its end
            logger.info(f"{tag}: {recipe.epochs} epochs instead of the checkpoint's {planned}: the learning-rate "
                        f"schedule is rebuilt for {recipe.epochs} epochs")
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        if model_ema is not None and isinstance(resume.get("model_ema"), dict):
            model_ema.module.load_state_dict(resume["model_ema"])
        start_epoch = int(resume["epoch"]) + 1
        best = resume.get("best", best)
        logger.info(f"{tag}: resumed at epoch {start_epoch}")
    log_path = os.path.join(run_dir, "log.jsonl") if run_dir else None
    if run_dir and rank == 0 and resume is None:
        _keep_previous_run(run_dir, tag)
    if log_path and rank == 0:  # only rank 0 writes the log; a restart must not append to a stale one
        _trim_log(log_path, start_epoch, resume)

    scheduler.step_update(start_epoch * steps)
    if start_epoch >= recipe.epochs:
        stats = evaluate(val_loader, inner, device, amp)
        logger.info(f"{tag}: nothing left to train (epoch {start_epoch} of {recipe.epochs}); "
                    f"val top-1 {stats['acc1']:.2f}")
        return stats
    t0, stats = time.time(), None
    for epoch in range(start_epoch, recipe.epochs):
        for part in (train_loader.sampler, train_loader.dataset):  # a data set may redraw per epoch
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)
        # seed the augmentation per (seed, rank, epoch): a resumed epoch replays the same draws
        torch.manual_seed(recipe.seed * 1000 + rank * 100003 + epoch)
        train_stats = train_one_epoch(
            model, criterion, train_loader, optimizer, device, epoch, scaler=scaler, amp=amp,
            clip_grad=recipe.clip_grad, model_ema=model_ema, mixup_fn=mixup_fn, total_epochs=recipe.epochs,
            log_every=recipe.log_every, max_steps=recipe.max_steps, lr_scheduler=scheduler)
        stats = evaluate(val_loader, inner, device, amp)
        ema_stats = evaluate(val_loader, model_ema.module, device, amp) if model_ema else None
        is_best = stats["acc1"] > best["acc1"]
        if is_best:
            best = {"acc1": stats["acc1"], "epoch": epoch}
        elapsed = time.time() - t0
        eta = elapsed / (epoch + 1 - start_epoch) * (recipe.epochs - epoch - 1)
        logger.info(f"{tag} epoch {epoch}: loss {train_stats.get('loss', float('nan')):.4f} "
                    f"val top-1 {stats['acc1']:.2f} top-5 {stats['acc5']:.2f} (best {best['acc1']:.2f}) "
                    + (f"EMA top-1 {ema_stats['acc1']:.2f} " if ema_stats else "") +
                    f"elapsed {format_seconds(elapsed)} eta {format_seconds(eta)}")
        if run_dir:  # the checkpoint carries its epoch's log line: a kill between the two loses none
            record = {"epoch": epoch, **{f"train_{k}": v for k, v in train_stats.items()},
                      **{f"test_{k}": v for k, v in stats.items()}, "seconds": round(elapsed, 2)}
            if ema_stats:
                record.update({f"ema_{k}": v for k, v in ema_stats.items()})
            _write_epoch(run_dir, inner, arch, optimizer, scheduler, scaler, model_ema, epoch, best, is_best,
                         stats, dict(extra or {}, log_record=record))
            append_jsonl(log_path, record)
    return stats


def _keep_previous_run(run_dir, tag):
    """A fresh run in a folder that holds another one (a rerun without --resume): the old run's
    files are renamed beside it (checkpoint.previous.pth, ...), not overwritten."""
    names = [n for n in ("checkpoint.pth", "best.pth", "log.jsonl") if os.path.exists(os.path.join(run_dir, n))]
    if "checkpoint.pth" not in names:
        return
    kept = []
    for name in names:
        stem, ext = os.path.splitext(name)
        kept.append(f"{stem}.previous{ext}")
        os.replace(os.path.join(run_dir, name), os.path.join(run_dir, kept[-1]))
    logger.warning(f"{tag}: {run_dir} held a run and this one starts afresh (no --resume); the old run's files are "
                   f"kept as {', '.join(kept)} (--resume auto continues a run instead)")


def _trim_log(log_path, start_epoch, resume):
    """Keep exactly the epochs before ``start_epoch`` in the log, plus the resumed checkpoint's own
    line when a kill came between the checkpoint and its log line."""
    if not os.path.exists(log_path):
        return
    records = read_jsonl(log_path)
    kept = [r for r in records if r.get("epoch", -1) < start_epoch]
    last = (resume or {}).get("log_record")
    if isinstance(last, dict) and not any(r.get("epoch") == last.get("epoch") for r in kept):
        kept.append(last)
    if kept != records or os.path.getsize(log_path) != sum(len(json.dumps(r)) + 1 for r in records):
        write_jsonl(log_path, kept)


def _write_epoch(run_dir, model, arch, optimizer, scheduler, scaler, model_ema, epoch, best, is_best, stats, extra):
    """The one place checkpoints of a training run are written (rank 0, atomically)."""
    extra = dict(extra or {})
    ckpt = {"arch": arch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict(), "epoch": epoch,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "model_ema": model_ema.module.state_dict() if model_ema else None, "best": best, **extra}
    save_atomic(ckpt, os.path.join(run_dir, "checkpoint.pth"))
    if is_best:
        save_atomic({"arch": arch, "model": model.state_dict(), "epoch": epoch, "val": stats, **extra},
                    os.path.join(run_dir, "best.pth"))


def interleaved_throughput(models, device, batch_size, input_size, amp=False, rounds=15):
    """Median images/s of each model, measured in interleaved rounds so that machine noise
    hits all of them alike."""
    rates = [[] for _ in models]
    for _ in range(rounds):
        for i, m in enumerate(models):
            rates[i].append(throughput(m, device, batch_size, input_size, amp=amp, warmup=1, repeats=3))
    return [statistics.median(r) for r in rates]
# ----------------------------------------------------------------------------------------------
# issue 11: search objectives (--search-objective {acc,loss,kl}); standalone functions.
#
#   ref = reference_outputs(dense, holdout_loader, device)            # once per search
#   stats = objective_stats(candidate, holdout_loader, device, ref)   # per candidate policy
#   score = objective_value(stats, "kl")                              # what the search maximises
#
# The hold-out loader must yield the same batches in the same order every pass (a Subset with a
# SequentialSampler or datasets.ShardSampler, no augmentation): the candidate's batch b is compared
# with the dense model's batch b, and a mismatch is an error rather than a silently wrong KL.
# ----------------------------------------------------------------------------------------------

def compare_models(files, rows, device, batch_size, input_size, amp=False):
    """The pipeline's summary: the dense model file ``files[0]`` against the compressed ones
    (``files[1:]``, one per prune+finetune result in ``rows``), images/s measured interleaved
    in one run. Returns {"rows", "device", "throughput_batch", "markdown"}."""
    speeds = interleaved_throughput([load(p, device=device)[0] for p in files], device, batch_size, input_size, amp)
    table = [{"model": "dense", "gmacs": rows[0]["dense_gmacs"], "params": rows[0]["dense_params"],
              "acc1": rows[0]["dense_acc1"], "acc1_before_finetune": None, "images_per_s": speeds[0],
              "speedup": 1.0, "macs_ratio": 1.0, "file": files[0]}]
    table += [{"model": f"-{100 * row['reduction']:.0f}% GMACs", "gmacs": row["gmacs"], "params": row["params"],
               "acc1": row["acc1"], "acc1_before_finetune": row["acc1_before_finetune"], "images_per_s": speed,
               "speedup": speed / speeds[0], "macs_ratio": row["dense_gmacs"] / row["gmacs"], "file": row["file"]}
              for row, speed in zip(rows, speeds[1:])]
    text = markdown_table(table, [("model", "{}"), ("GMACs", "gmacs", "{:.4g}"), ("params (M)", "params", "{:.3f}", 1e-6),
                                  ("val top-1", "acc1", "{:.2f}"), ("top-1 before finetune", "acc1_before_finetune", "{:.2f}"),
                                  ("images/s", "images_per_s", "{:.0f}"), ("speed-up", "speedup", "{:.2f}x"),
                                  ("MACs ratio", "macs_ratio", "{:.2f}x")])
    return {"rows": table, "device": str(device), "throughput_batch": batch_size, "markdown": text}


SEARCH_OBJECTIVES = ("acc", "loss", "kl")


def _logits(out):
    if isinstance(out, (tuple, list)):  # (cls, dist) logits of a distilled model: average them
        out = (out[0] + out[1]) / 2
    return out.float()


def _fingerprint(images):
    """One number per image (its pixel sum in float64): tells a batch from a reshuffled or
    re-augmented one."""
    return images.detach().cpu().double().flatten(1).sum(dim=1)


@torch.no_grad()
def reference_outputs(model, loader, device, amp=False):
    """The dense model's log-probabilities on this rank's hold-out batches, for the KL objective:
    a list of (log_probs [B, classes] float32 CPU, targets [B], image fingerprints [B]) per batch."""
    was_training = model.training
    model.eval()
    ref = []
    for images, targets in loader:
        with autocast(device, amp):
            out = model(images.to(device, non_blocking=True))
        ref.append((F.log_softmax(_logits(out), dim=1).cpu(), targets.cpu(), _fingerprint(images)))
    model.train(was_training)
    return ref


@torch.no_grad()
def objective_stats(model, loader, device, reference=None, amp=False):
    """Top-1 (%), mean cross entropy and, given ``reference`` (reference_outputs of the dense
    model on the same loader), mean KL(dense || candidate) = mean_i sum_k p_ik (log p_ik - log q_ik)
    over the hold-out images. Sums and the image count are all-reduced across ranks before
    dividing, so a sharded hold-out gives the single-process values. Returns
    {"acc1", "loss", "kl" (None without reference), "n"}."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # correct, loss*n, kl*n, n
    batches = 0
    for b, (images, targets) in enumerate(loader):
        with autocast(device, amp):
            out = model(images.to(device, non_blocking=True))
        logits = _logits(out).cpu()
        targets = targets.cpu()
        log_q = F.log_softmax(logits, dim=1)
        sums[0] += (logits.argmax(dim=1) == targets).sum().item()
        sums[1] += F.nll_loss(log_q, targets, reduction="sum").double().item()
        if reference is not None:
            if (b >= len(reference) or not torch.equal(reference[b][1], targets)
                    or not torch.equal(reference[b][2], _fingerprint(images))):
                raise ValueError("the hold-out loader gave other batches than reference_outputs saw; "
                                 "use one fixed, unshuffled loader for both")
            log_p = reference[b][0]
            sums[2] += F.kl_div(log_q, log_p, reduction="sum", log_target=True).double().item()
        sums[3] += targets.numel()
        batches += 1
    if reference is not None and batches != len(reference):
        raise ValueError(f"the hold-out loader gave {batches} batches, reference_outputs saw {len(reference)}")
    model.train(was_training)
    if device.type == "cuda":
        sums = sums.to(device)
    all_reduce_sum(sums)
    sums = sums.cpu()
    n = sums[3].item()
    if n == 0:
        raise ValueError("the hold-out loader gave no images")
    return {"acc1": 100.0 * sums[0].item() / n, "loss": sums[1].item() / n,
            "kl": sums[2].item() / n if reference is not None else None, "n": int(n)}


def objective_value(stats, objective):
    """The number the search maximises: acc -> top-1, loss -> -cross entropy, kl -> -KL."""
    if objective == "acc":
        return stats["acc1"]
    if objective == "loss":
        return -stats["loss"]
    if objective == "kl":
        if stats.get("kl") is None:
            raise ValueError("the kl objective needs objective_stats(..., reference=reference_outputs(dense, ...))")
        return -stats["kl"]
    raise ValueError(f"unknown search objective {objective!r}; expected one of {SEARCH_OBJECTIVES}")


def policy_scorer(dense, rankings, loader, device, objective="acc", round_to=8, fuse=False, rounding="exact",
                  convention="exact", amp=False, extra=None):
    """``evaluate(x) -> (score, record)`` for ``expected_improvement.run_search``: slice ``dense``
    to the policy vector x (pruning.policy_vector's layout) keeping the components ``rankings``
    rank highest, and score it on the fixed, unshuffled hold-out ``loader`` with ``objective``
    (objective_value). The record holds the policy, its counted GMACs and parameters, the budget
    GMACs under ``convention``, top-1, loss and KL, plus ``extra``. The dense model's outputs for
    the KL are computed once, here."""
    dims = pruning.model_dims(dense)
    depth = dims["depth"]
    reference = reference_outputs(dense, loader, device, amp)

    def evaluate(x):
        policy = pruning.policy_from_vector(x, depth)
        model = pruning.slice_model(dense, policy, rankings, round_to, fuse, rounding)
        counted, stats = flops.model_macs(model), objective_stats(model, loader, device, reference, amp)
        return objective_value(stats, objective), dict({
            "policy": policy, "gmacs": counted["macs"] / 1e9, "params": counted["params"], "acc1": stats["acc1"],
            "budget_gmacs": float(flops.policy_gmacs(dims, x, round_to, convention)),
            "loss": stats["loss"], "kl": stats["kl"]}, **(extra or {}))
    return evaluate
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# The method's two compression steps as functions: search a policy, finetune the sliced model.
# main.py composes them with the data, the model files and the run folders.
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """What defines a policy search besides the dense model, its rankings and its hold-out.
    Field names are main.py's flag names, so ``SearchSettings.take(args)`` reads them."""
    search_population: int = 20
    search_epoch: int = 30
    search_mode: str = "ei"
    search_objective: str = "acc"
    search_pool: int = 1000
    search_max_ratio: float = 0.5
    search_tol: float = 0.02
    round_to: int = 8
    fuse: str = "mean"
    flops_convention: str = "exact"
    seed: int = 0
    active: Tuple[bool, bool, bool] = (True, True, True)  # heads, neurons, tokens searched
    search_flops: Optional[float] = None  # the budget in GMACs, or
    search_reduction: Optional[float] = None  # the fraction of the dense model's GMACs removed

    take = classmethod(Recipe.take.__func__)

    def target(self, dense_gmacs):
        """The budget in GMACs for a dense model of ``dense_gmacs``."""
        if self.search_flops is None and self.search_reduction is None:
            raise UserError(f"--search needs a budget: --search_flops GMACS (the dense model has {dense_gmacs:.3f}) "
                            f"or --search-reduction FRACTION")
        return self.search_flops if self.search_flops is not None else dense_gmacs * (1 - self.search_reduction)

    def identity(self, sampler):
        """What defines a search of ``sampler``'s space under these settings (its run.json)."""
        return {"target_gmacs": sampler.target, "seed": self.seed, "mode": self.search_mode,
                "objective": self.search_objective, "active": sampler.active.tolist(), "max_ratio": self.search_max_ratio,
                "tol": self.search_tol, "round_to": self.round_to, "fuse": self.fuse, "convention": self.flops_convention,
                "population": self.search_population, "pool": self.search_pool}

    @property
    def rounding(self):
        return "original" if self.flops_convention == "original" else "exact"

    def space(self, dims, target_gmacs):
        """The feasible policies of ``target_gmacs`` (under ``flops_convention``) for a model of
        ``dims`` (pruning.model_dims): raises ei.InfeasibleTarget when none can meet it."""
        depth = dims["depth"]
        active = np.repeat(self.active, [depth, depth, 1])
        return ei.FeasibleSampler(lambda X: flops.policy_gmacs(dims, X, self.round_to, self.flops_convention),
                                  target_gmacs, dim=2 * depth + 1, upper=self.search_max_ratio, tol=self.search_tol,
                                  active=active)


def _previous_search(out, identity):
    """Rank 0's decision for a search folder: refuse another search's, else (the history to
    replay, the rankings it scored with or None)."""
    check_run_identity(out, identity, "search")
    log_path, path = os.path.join(out, "search_log.jsonl"), os.path.join(out, "rankings.json")
    history = [dict(r, y=r.get("y", r.get("acc1"))) for r in read_jsonl(log_path)]
    write_jsonl(log_path, history)  # without a torn last line
    return history, (json.load(open(path)) if history and os.path.exists(path) else None)


def search_policy(dense, rankings, loader, sampler, settings, device, amp=False, out=None, identity=None,
                  val_loader=None, record=None, distributed=False, rank=0):
    """Search the policy of ``dense`` that scores best on the hold-out ``loader`` among the feasible
    ones of ``sampler`` (``settings.space``): ``search_population`` random policies, then
    ``search_epoch`` EI steps (or random ones), each candidate sliced by ``rankings`` and scored by
    ``settings.search_objective``. ``rankings`` is a dict (dependency_criterion.rank_model) or a
    function computing one, called only when needed.

    With ``out``, the search is a resumable run folder: ``run.json`` (what defines the search:
    ``settings.identity(sampler)`` and the caller's ``identity``, e.g. the dense model, the
    rankings' criterion and the hold-out; another search's folder is refused), ``search_log.jsonl`` (replayed after an
    interruption, so the search continues as the uninterrupted one would), ``rankings.json``, and
    at the end ``best_policy.json`` and ``search.png``. Under torch.distributed every rank calls
    this; rank 0 decides, asks the GP and broadcasts. The best model is evaluated on
    ``val_loader`` when given. Returns ``{"result" (best_policy.json's contents: policy, vector,
    GMACs, scores, settings, the rankings, ``record``), "model" (the best policy's sliced model),
    "history"}``."""
    identity = dict(settings.identity(sampler), **(identity or {}))
    history, found = decide_on_rank0(lambda: _previous_search(out, identity)) if out else ([], None)
    rankings = found or (rankings() if callable(rankings) else rankings)
    log_path = os.path.join(out, "search_log.jsonl") if out else None
    if out and rank == 0:
        write_json_atomic(os.path.join(out, "rankings.json"), rankings)
    total = settings.search_population + settings.search_epoch
    if len(history) > total:
        logger.info(f"search: {out}/search_log.jsonl holds {len(history)} evaluations; a search of {total} takes the "
                    f"first {total}, as an uninterrupted one would (the log keeps all {len(history)})")
    elif history:
        logger.info(f"search: resuming after {len(history)} of {total} evaluations")
    score = policy_scorer(dense, rankings, loader, device, settings.search_objective, settings.round_to,
                          settings.fuse, settings.rounding, settings.flops_convention, amp,
                          extra={"search": identity})
    t_start, done = time.time(), [0]

    def on_record(rec):
        if log_path:
            append_jsonl(log_path, rec)
        done[0] += 1
        eta = (time.time() - t_start) / done[0] * (total - rec["step"] - 1)
        logger.info(f"search [{rec['step'] + 1}/{total}] {rec['phase']} gmacs {rec['gmacs']:.4g} acc {rec['acc1']:.2f} "
                    f"eta {format_seconds(eta)}")
    res = ei.run_search(score, sampler, settings.search_population, settings.search_epoch, seed=settings.seed,
                        mode=settings.search_mode, history=history, on_record=on_record,
                        share=broadcast_object if distributed else None, leader=rank == 0,
                        pool_size=settings.search_pool, refine_per_point=max(20, settings.search_pool // 20))
    best, spent = res["best"], sum(r["seconds"] for r in res["history"])
    model = pruning.slice_model(dense, best["policy"], rankings, settings.round_to, settings.fuse, settings.rounding)
    val = evaluate(val_loader, model, device, amp) if val_loader is not None else None
    result = {"policy": best["policy"], "vector": best["x"], "target_gmacs": sampler.target, "gmacs": best["gmacs"],
              "dense_gmacs": flops.model_macs(dense, convention=settings.flops_convention)["macs"] / 1e9,
              "params": best["params"], "search_acc1": best["acc1"],
              "val_acc1_before_finetune": val and val["acc1"], "step": best["step"],
              "evaluations": len(res["history"]), "objective": settings.search_objective, "search_score": best["y"],
              "mode": settings.search_mode, "flops_convention": settings.flops_convention,
              "budget_gmacs": best["budget_gmacs"], "round_to": settings.round_to, "fuse": settings.fuse,
              "gp_share": sum(r.get("gp_seconds", 0.0) for r in res["history"]) / spent
              if spent > 0 and settings.search_mode == "ei" else None, **(record or {}), "rankings": rankings}
    logger.info(f"search done: best {settings.search_objective} {best['y']:.4g} on the search split at "
                f"{best['budget_gmacs']:.4g} GMACs ({settings.flops_convention}; target {sampler.target:.4g}; exact "
                f"{best['gmacs']:.4g})" + (f"; val top-1 before finetune {val['acc1']:.2f}" if val else ""))
    if out and rank == 0:
        write_json_atomic(os.path.join(out, "best_policy.json"), result)
        if not ei.plot_history(res["history"], os.path.join(out, "search.png"),
                               f"{settings.search_objective} on the search split"):
            logger.info("matplotlib is not installed: no search plot (pip install matplotlib)")
    return {"result": result, "model": model, "history": res["history"]}


def prune_finetune(dense, dense_arch, policy, rankings, data, recipe, device, settings=None, run_dir=None,
                   identity=None, distributed=False, amp=False, rank=0, extra=None, record=None):
    """Slice ``dense`` (its ``dense_arch``) to ``policy``, keeping the components ``rankings``
    rank highest (a dict, or a function computing one, called only when needed), and finetune it
    by ``recipe``, distilling from ``dense`` unless the recipe says none. ``settings``
    (SearchSettings) gives round_to, fuse and the rounding; ``data`` is datasets.build_loaders'
    dict. Accuracy before finetuning is measured once and kept in the checkpoints, so a resumed
    run reports the same.

    With ``run_dir`` the run is resumable: ``run.json`` holds what defines it (the policy, the
    settings' rounding, the recipe less its length, and the caller's ``identity``, e.g. the dense
    file and where the rankings came from; a different run's folder is refused), every epoch writes ``checkpoint.pth``, and at the end rank 0
    writes ``compressed.pth`` (load it with models.load; ``extra`` stored beside) and
    ``result.json`` (``record``, e.g. the policy, then the figures). Returns result.json's contents."""
    settings = settings or SearchSettings()
    identity = {"policy": policy, "round_to": settings.round_to, "fuse": settings.fuse, "rounding": settings.rounding,
                "recipe": {k: v for k, v in recipe.as_dict().items() if k not in ("epochs", "log_every", "max_steps")},
                **(identity or {})}
    ckpt_path, state = run_dir and os.path.join(run_dir, "checkpoint.pth"), None
    if run_dir and decide_on_rank0(lambda: check_run_identity(run_dir, identity, "prune+finetune")
                                   and os.path.exists(ckpt_path)):
        state = load_checkpoint_file(ckpt_path)
        model, arch, _ = load(ckpt_path, ckpt=state)
        logger.info(f"prune+finetune: continuing the compressed model in {ckpt_path}")
    else:
        rankings = rankings() if callable(rankings) else rankings
        model = pruning.slice_model(dense, policy, rankings, settings.round_to, settings.fuse, settings.rounding)
        arch = dict(dense_arch, prune_spec=model.prune_spec)
    model.to(device)
    dense_m, comp_m = flops.model_macs(dense), flops.model_macs(model)
    logger.info(f"{dense_m['macs'] / 1e9:.4g} -> {comp_m['macs'] / 1e9:.4g} GMACs "
                f"({100 * (1 - comp_m['macs'] / dense_m['macs']):.1f}% fewer), params "
                f"{dense_m['params'] / 1e6:.3f}M -> {comp_m['params'] / 1e6:.3f}M")
    before = (state or {}).get("before_finetune") or evaluate(data["val"], model, device, amp)
    dense_stats = evaluate(data["val"], dense, device, amp)
    logger.info(f"val top-1: dense {dense_stats['acc1']:.2f}, pruned before finetune {before['acc1']:.2f}")
    stats = fit(model, data["train"], data["val"], recipe, device, data["num_classes"], run_dir=run_dir, arch=arch,
                teacher=dense if recipe.distillation != "none" else None, resume=state, distributed=distributed,
                amp=amp, rank=rank, tag="finetune",
                extra=dict(extra or {}, recipe=recipe.as_dict(), before_finetune=before))
    result = dict(record or {}, dense_gmacs=dense_m["macs"] / 1e9, gmacs=comp_m["macs"] / 1e9,
                  dense_params=dense_m["params"], params=comp_m["params"], dense_acc1=dense_stats["acc1"],
                  acc1_before_finetune=before["acc1"], acc1=stats["acc1"], acc5=stats["acc5"],
                  finetune_epochs=recipe.epochs)
    if run_dir and rank == 0:
        result["file"] = os.path.join(run_dir, "compressed.pth")
        save_model_file(result["file"], model, arch, extra=dict(extra or {}, val=stats))
        write_json_atomic(os.path.join(run_dir, "result.json"), result)
        logger.info(f"compressed model written to {result['file']} (load it with models.load)")
    logger.info(f"prune+finetune done: val top-1 {stats['acc1']:.2f} (dense {dense_stats['acc1']:.2f}, "
                f"before finetune {before['acc1']:.2f}) at {result['gmacs']:.4g} GMACs")
    return result
