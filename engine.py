"""Training, evaluation and speed, and the method's two run steps built on them; device-agnostic
(CPU, CUDA, mixed precision on CUDA).

- training: train_one_epoch, fit (an explicit Recipe, checkpoints, resume), DistillationLoss;
- evaluation: prediction_sums (the one evaluation loop), evaluate, and the search objectives
  (reference_outputs, objective_stats, objective_value, policy_scorer);
- speed: throughput, interleaved_throughput, speed_report (--throughput's figures), compare_models
  (the dense-vs-compressed table);
- the steps: SearchSettings, search_policy and prune_finetune, resumable in a run folder.
"""
import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import shutil
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

import flops
import latency
import plots
import pruning
from flags import SEARCH_OBJECTIVES
from models import class_logits, load, load_state_strict, save_model_file, set_drop_path
from utils import (Progress, UserError, all_reduce_sum, append_jsonl, broadcast_object, check_run_identity,
                   settings_from, clean_message, decide_on_rank0, format_seconds, load_checkpoint_file,
                   markdown_table, read_jsonl, save_atomic, write_json_atomic, write_jsonl)

logger = logging.getLogger("vitcompress")


class NonFiniteLoss(RuntimeError):
    pass


HALF_DTYPES = ("bfloat16", "float16")  # --amp-dtype's choices; the first is the default


def half_dtype(amp):
    """The half-precision dtype that an ``amp`` setting names: None when mixed precision is off
    (False, None), torch.bfloat16 for True (the default), else the dtype given as a torch dtype or
    by name ("bfloat16", "float16"). Every function of this module that takes ``amp`` reads it so."""
    if not amp:
        return None
    if amp is True:
        return getattr(torch, HALF_DTYPES[0])
    name = str(amp).replace("torch.", "")
    if name not in HALF_DTYPES:
        raise ValueError(f"amp={amp!r}: expected True, False or one of {HALF_DTYPES}")
    return getattr(torch, name)


def autocast(device, enabled, dtype=None):
    """The mixed-precision context of training and evaluation: CUDA autocast in ``dtype`` (by
    default the dtype ``enabled`` names, see half_dtype: bfloat16 for True) when ``enabled`` and
    ``device`` is a CUDA device; a no-op context otherwise."""
    dtype = half_dtype(dtype if dtype is not None else enabled) if enabled else None
    if dtype is not None and torch.device(device).type == "cuda":
        return torch.autocast(device_type="cuda", dtype=dtype)
    return contextlib.nullcontext()


def needs_grad_scaler(amp):
    """Whether training under ``amp`` needs loss scaling: float16 does (its range underflows small
    gradients), bfloat16 (float32's range) and full precision do not."""
    return half_dtype(amp) == torch.float16


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
            t = class_logits(self.teacher(inputs))
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
def prediction_sums(model, loader, device, amp=False, reference=None, progress=None):
    """THE evaluation loop (``evaluate`` and the search's ``objective_stats`` both run it): in eval
    mode, over this rank's batches, a float64 tensor [loss * n, top-1 hits, top-5 hits, KL * n, n]
    (a distilled model scored by its heads' average, class_logits). KL(dense || model) needs
    ``reference`` (reference_outputs on the same fixed loader; a loader giving other batches is a
    ValueError); without it that entry stays 0. Batches whose images were all unreadable are
    skipped. Summing over ranks is the caller's: whether it should depends on the loader."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64)
    batches = 0
    for step, (images, targets) in enumerate(loader):
        if targets.numel() == 0:  # every image of the batch was unreadable (skipped)
            continue
        with autocast(device, amp):
            out = model(images.to(device, non_blocking=True))
        logits = class_logits(out).float()
        targets = targets.to(logits.device)
        log_q = F.log_softmax(logits, dim=1)
        hit = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(targets.view(-1, 1))
        sums[0] += F.nll_loss(log_q, targets, reduction="sum").double().item()
        sums[1] += hit[:, :1].sum().item()
        sums[2] += hit.sum().item()
        if reference is not None:
            if (batches >= len(reference) or not torch.equal(reference[batches][1], targets.cpu())
                    or not torch.equal(reference[batches][2], _fingerprint(images))):
                raise ValueError("the hold-out loader gave other batches than reference_outputs saw; "
                                 "use one fixed, unshuffled loader for both")
            log_p = reference[batches][0].to(log_q.device)
            sums[3] += F.kl_div(log_q, log_p, reduction="sum", log_target=True).double().item()
        sums[4] += targets.numel()
        batches += 1
        if progress:
            progress.update(step)
    if reference is not None and batches != len(reference):
        raise ValueError(f"the hold-out loader gave {batches} batches, reference_outputs saw {len(reference)}")
    model.train(was_training)
    return sums


def _summed_over_ranks(sums, device):
    sums = sums.to(device) if device.type == "cuda" else sums
    all_reduce_sum(sums)
    return sums.cpu()


def evaluate(loader, model, device, amp=False, log_every=0, header="Test"):
    """Top-1, top-5 and mean loss over the loader. A loader sharded over ranks (its sampler has
    num_replicas > 1) has its counts summed over them, so a sharded evaluation (every image once)
    equals a single-process one exactly; an unsharded one (every rank sees every image) is not
    summed. No image at all is an error, not 0%."""
    progress = Progress(len(loader), header, every=log_every) if log_every else None
    sums = prediction_sums(model, loader, device, amp, progress=progress)
    if getattr(getattr(loader, "sampler", None), "num_replicas", 1) > 1:
        sums = _summed_over_ranks(sums, device)
    n = sums[4].item()
    if n == 0:
        raise UserError(f"no image was evaluated: all {len(loader.dataset)} validation images were unreadable "
                        f"(see the warnings above)")
    return {"acc1": 100.0 * sums[1].item() / n, "acc5": 100.0 * sums[2].item() / n,
            "loss": sums[0].item() / n, "n": int(n)}


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile's modes that --compile takes


def compile_model(model, device, fullgraph=False, mode="default"):
    """``torch.compile`` for inference at fixed shapes (inductor) in torch.compile's ``mode``
    (COMPILE_MODES; reduce-overhead replays CUDA graphs, so off CUDA it compiles as default and
    says so). On a CPU inductor builds C++ kernels, so a missing compiler is reported as a one-line
    UserError before compiling. ``fullgraph=True`` makes any graph break an error (the test of the
    token-reducing block)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown torch.compile mode {mode!r}; expected one of {COMPILE_MODES}")
    device = torch.device(device)
    if device.type == "cpu":
        cxx = os.environ.get("CXX", "g++")
        if shutil.which(cxx) is None:
            raise UserError(f"torch.compile on a CPU needs a C++ compiler and '{cxx}' is not on PATH "
                            f"(Debian/Ubuntu: apt-get install g++); or run without --compile")
    if mode == "reduce-overhead" and device.type != "cuda":
        logger.warning(f"--compile reduce-overhead replays CUDA graphs; on {device} it compiles as default")
    return torch.compile(model, dynamic=False, fullgraph=fullgraph, mode=mode)


def runtime_name(compile=False, cuda_graph=False):
    """How inference forwards run, as the reports name it: "eager", "compile:MODE" (``compile`` is
    True for the default mode, or a COMPILE_MODES name) or "cuda-graph". Both at once is a UserError."""
    if compile and cuda_graph:
        raise UserError("--cuda-graph captures the eager forward; for a compiled forward replayed in CUDA graphs "
                        "use --compile reduce-overhead, not both")
    if cuda_graph:
        return "cuda-graph"
    if compile:
        mode = "default" if compile is True else compile
        if mode not in COMPILE_MODES:
            raise ValueError(f"unknown torch.compile mode {mode!r}; expected one of {COMPILE_MODES}")
        return f"compile:{mode}"
    return "eager"


def check_cuda_graph(device):
    """--cuda-graph's precondition, checked before any work: a CUDA device (one-line UserError otherwise)."""
    if torch.device(device).type != "cuda":
        raise UserError(f"--cuda-graph captures and replays CUDA graphs: it needs a CUDA device, not {device} "
                        f"(run without --cuda-graph, or with --device cuda)")


def inference_dtype(device, amp):
    """The dtype in which inference speed is measured: on CUDA the half dtype ``amp`` names (see
    half_dtype; the model's weights and input in it, no autocast) or float32 when amp is off; on
    every other device float32."""
    if torch.device(device).type == "cuda":
        return half_dtype(amp) or torch.float32
    return torch.float32


def inference_copy(model, device, dtype):
    """``model`` in eval mode on ``device`` with its floating-point weights and buffers in ``dtype``:
    the model itself when it already is so, else a converted copy (the caller's model keeps its
    device and dtype)."""
    device = torch.device(device)

    def fits(t):
        return (t.device.type == device.type and device.index in (None, t.device.index)
                and (not t.is_floating_point() or t.dtype == dtype))
    if not all(fits(t) for t in list(model.parameters()) + list(model.buffers())):
        model = copy.deepcopy(model).to(device=device, dtype=dtype)
    return model.eval()


def cuda_graph_call(model, x):
    """Capture ``model(x)`` in a CUDA graph over a static copy of the batch ``x`` (after warm-up
    forwards on a side stream, as capture needs); returns a call that replays the graph and returns
    its output. A forward that cannot be captured (e.g. one that waits on the host) is a one-line
    UserError."""
    static = x.clone()
    side, main = torch.cuda.Stream(device=x.device), torch.cuda.current_stream(x.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        for _ in range(3):
            model(static)
    main.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = model(static)
    except RuntimeError as e:
        raise UserError(f"this model's forward cannot be captured in a CUDA graph ({clean_message(e, 160)}); "
                        f"run without --cuda-graph") from e

    def replay():
        graph.replay()
        return out
    return replay


@torch.no_grad()
def throughput(model, device, batch_size=64, input_size=224, amp=False, warmup=3, repeats=10, compile=False,
               cuda_graph=False, reps=None):
    """Inference speed of one model: interleaved_throughput([model], ...)[0], with ``repeats``
    timed rounds after ``warmup`` untimed ones. Returns {"images_per_s" (at ``batch_size``),
    "batch_ms", "batch1_ms", "batch", "dtype", "runtime", "device"}."""
    return interleaved_throughput([model], device, batch_size, input_size, amp=amp, rounds=repeats, warmup=warmup,
                                  reps=reps, compile=compile, cuda_graph=cuda_graph)[0]


@torch.no_grad()
def interleaved_throughput(models, device, batch_size, input_size, amp=False, rounds=15, warmup=2, reps=None,
                           compile=False, cuda_graph=False):
    """Inference speed of each of ``models``, measured in one run: every model at ``batch_size``
    and at batch 1, in ``inference_dtype(device, amp)`` (a converted copy where needed: bf16/fp16
    weights on CUDA, float32 elsewhere), run eagerly, ``compile``d (True or a COMPILE_MODES name)
    or replayed from a CUDA graph (``cuda_graph``; CUDA only, refused elsewhere before any work).
    Each forward is built (compiled, captured) and run once untimed, then latency.time_calls times
    them all interleaved: ``warmup`` untimed rounds, then the median over ``rounds`` rounds of
    ``reps`` back-to-back forwards (CUDA events on CUDA; by default 3 there, 1 elsewhere, where the
    host clock times each forward on its own). Returns one dict per model:
    {"images_per_s" (at ``batch_size``), "batch_ms", "batch1_ms" (ms per forward), "batch",
    "dtype", "runtime" (runtime_name), "device"}. A batch that does not fit is a UserError."""
    device = torch.device(device)
    runtime = runtime_name(compile, cuda_graph)
    if cuda_graph:
        check_cuda_graph(device)
    dtype = inference_dtype(device, amp)
    reps = reps or (3 if device.type == "cuda" else 1)
    try:
        prepared = [inference_copy(m, device, dtype) for m in models]
        with torch.inference_mode():
            times = _timed_batches(prepared, device, batch_size, input_size, dtype, compile, cuda_graph,
                                   warmup, rounds, reps, runtime)
    except RuntimeError as e:  # torch.OutOfMemoryError, or the CPU allocator's "can't allocate memory"
        if "memory" not in str(e) and "alloc" not in str(e):
            raise
        raise UserError(f"a batch of {batch_size} does not fit in memory on {device}; use a smaller "
                        f"--throughput-batch") from e
    name = str(dtype).replace("torch.", "")
    return [{"images_per_s": batch_size * 1e3 / ms, "batch_ms": ms, "batch1_ms": ms1, "batch": batch_size,
             "dtype": name, "runtime": runtime, "device": str(device)} for ms, ms1 in times]


def speed_report(model, device, batch_size, input_size, *, baseline=None, amp=False, compile=False, cuda_graph=False):
    """--throughput's figures of ``model``: GMACs, params, images/s at ``batch_size`` and batch-1 ms
    (interleaved_throughput, 10 rounds). With a ``baseline`` model, both are measured interleaved in
    the same run and the speed-ups over it are given beside the GMACs ratio."""
    measured = [model] + ([baseline] if baseline is not None else [])
    macs = [flops.model_macs(m) for m in measured]
    speeds = interleaved_throughput(measured, device, batch_size, input_size, amp=amp, rounds=10, warmup=3,
                                    compile=compile, cuda_graph=cuda_graph)
    report = {"gmacs": macs[0]["macs"] / 1e9, "params": macs[0]["params"], "images_per_s": speeds[0]["images_per_s"],
              "batch1_ms": speeds[0]["batch1_ms"], "batch": batch_size, "device": str(device),
              "dtype": speeds[0]["dtype"], "runtime": speeds[0]["runtime"], "amp": bool(amp),
              "compiled": bool(compile)}
    logger.info(f"{report['gmacs']:.4g} GMACs, {report['params'] / 1e6:.2f} M params, {report['images_per_s']:.1f} "
                f"images/s at batch {batch_size}, {report['batch1_ms']:.3g} ms at batch 1 on {device} "
                f"({report['dtype']}, {report['runtime']})")
    if baseline is not None:
        base = speeds[1]
        report.update(baseline={"gmacs": macs[1]["macs"] / 1e9, "params": macs[1]["params"],
                                "images_per_s": base["images_per_s"], "batch1_ms": base["batch1_ms"]},
                      speedup=base["batch_ms"] / speeds[0]["batch_ms"],
                      speedup_batch1=base["batch1_ms"] / speeds[0]["batch1_ms"],
                      macs_ratio=macs[1]["macs"] / macs[0]["macs"])
        logger.info(f"speed-up over the baseline ({report['baseline']['gmacs']:.4g} GMACs), measured in this run: "
                    f"{report['speedup']:.2f}x at batch {batch_size}, {report['speedup_batch1']:.2f}x at batch 1; "
                    f"GMACs ratio {report['macs_ratio']:.2f}x")
    return report


def _timed_batches(models, device, batch_size, input_size, dtype, compile, cuda_graph, warmup, rounds, reps,
                   runtime):
    """[(ms per forward at ``batch_size``, ms per forward at batch 1)] of each prepared model
    (inference_copy), timed together by latency.time_calls after one untimed build-and-run of
    every forward (one forward per model when ``batch_size`` is 1). Call under torch.inference_mode."""
    calls, t0 = [], time.perf_counter()
    batches = (batch_size, 1) if batch_size != 1 else (1,)
    for model in models:
        if compile:
            model = compile_model(model, device, mode="default" if compile is True else compile)
        for batch in batches:
            x = torch.randn(batch, 3, input_size, input_size, device=device, dtype=dtype)
            calls.append(cuda_graph_call(model, x) if cuda_graph else (lambda m=model, x=x: m(x)))
    for call in calls:  # compiles, first-use allocations: not timed
        call()
    latency.synchronize(device)
    if compile or cuda_graph:
        logger.info(f"{runtime}: building and first running {len(calls)} forwards took "
                    f"{time.perf_counter() - t0:.1f} s")
    ms = latency.time_calls(calls, device, rounds=max(int(rounds), 1), reps=max(int(reps), 1),
                            warmup=max(int(warmup), 1))
    step = len(batches)
    return list(zip(ms[0::step], ms[step - 1::step]))


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
    cooldown_epochs: int = 0  # epochs at min_lr after the schedule's ``epochs`` (timm's train.py), added to them
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
    drop_path: float = 0.0  # stochastic depth prune_finetune gives the model it slices (pretraining builds with it)
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

    take = classmethod(settings_from)  # Recipe.take(cfg, **overrides)


def training_parts(model, recipe, steps_per_epoch, num_classes, teacher, amp):
    opt_kwargs = dict(eps=recipe.opt_eps, momentum=recipe.momentum)
    if recipe.opt_betas:
        opt_kwargs["betas"] = tuple(recipe.opt_betas)
    optimizer = create_optimizer_v2(model, opt=recipe.opt, lr=recipe.lr, weight_decay=recipe.weight_decay,
                                    **opt_kwargs)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=recipe.sched, num_epochs=max(recipe.epochs, 1), decay_epochs=recipe.decay_epochs,
        decay_rate=recipe.decay_rate, min_lr=recipe.min_lr, warmup_lr=recipe.warmup_lr,
        warmup_epochs=min(recipe.warmup_epochs, max(recipe.epochs - 1, 0)), cooldown_epochs=recipe.cooldown_epochs,
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
    scaler = torch.amp.GradScaler("cuda") if needs_grad_scaler(amp) else None
    return optimizer, scheduler, mixup_fn, criterion, scaler


def fit(model, train_loader, val_loader, *, recipe, num_classes, arch=None, teacher=None, resume=None, identity=None,
        extra=None, tag="train", run_dir=None, device, amp=False, distributed=False, rank=0):
    """Train ``model`` by ``recipe`` for its epochs plus its cool-down epochs (at the minimum
    learning rate), evaluating after every epoch; returns the final val stats.

    With ``run_dir``, every epoch atomically writes ``checkpoint.pth`` (arch, weights, optimizer,
    scheduler, scaler, EMA, epoch, best, ``extra`` primitives), ``best.pth`` and one line of
    ``log.jsonl``. ``resume`` is a loaded training checkpoint of this tool (its contents): the run
    continues after its epoch, and the log holds exactly the epochs up to that one. Given an
    ``identity`` too (the caller's part, e.g. the data set), ``run_dir/run.json`` records what
    defines the run with the model's and recipe's part: a resumed run in a folder of another
    training run is refused in one line; a fresh one (no ``resume``) records itself over it.
    """
    if run_dir and identity is not None:
        identity = {"step": tag, "model": arch["model"], "input_size": arch["input_size"],
                    "num_classes": arch["num_classes"], "prune_spec": bool(arch.get("prune_spec")),
                    "seed": recipe.seed, "distillation": recipe.distillation, **identity}
        decide_on_rank0(lambda: check_run_identity(run_dir, identity, "training", fresh=resume is None))
    model.to(device)
    inner = model
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    steps = len(train_loader) if recipe.max_steps is None else min(len(train_loader), recipe.max_steps)
    optimizer, scheduler, mixup_fn, criterion, scaler = training_parts(
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
    total = recipe.epochs + recipe.cooldown_epochs
    if start_epoch >= total:
        stats = evaluate(val_loader, inner, device, amp)
        logger.info(f"{tag}: nothing left to train (epoch {start_epoch} of {total}); "
                    f"val top-1 {stats['acc1']:.2f}")
        return stats
    t0, stats = time.time(), None
    for epoch in range(start_epoch, total):
        for part in (train_loader.sampler, train_loader.dataset):  # a data set may redraw per epoch
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)
        # seed the augmentation per (seed, rank, epoch): a resumed epoch replays the same draws
        torch.manual_seed(recipe.seed * 1000 + rank * 100003 + epoch)
        train_stats = train_one_epoch(
            model, criterion, train_loader, optimizer, device, epoch, scaler=scaler, amp=amp,
            clip_grad=recipe.clip_grad, model_ema=model_ema, mixup_fn=mixup_fn, total_epochs=total,
            log_every=recipe.log_every, max_steps=recipe.max_steps, lr_scheduler=scheduler)
        stats = evaluate(val_loader, inner, device, amp)
        ema_stats = evaluate(val_loader, model_ema.module, device, amp) if model_ema else None
        is_best = stats["acc1"] > best["acc1"]
        if is_best:
            best = {"acc1": stats["acc1"], "epoch": epoch}
        elapsed = time.time() - t0
        eta = elapsed / (epoch + 1 - start_epoch) * (total - epoch - 1)
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
    if run_dir and rank == 0:  # loss and val top-1 per epoch, beside log.jsonl
        plots.plot_training(log_path, os.path.join(run_dir, "training.png"))
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


# ----------------------------------------------------------------------------------------------
# search objectives (--search-objective {acc,loss,kl}); standalone functions.
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
    (``files[1:]``, one per prune+finetune result in ``rows``), their speed measured interleaved in
    one run by interleaved_throughput (``amp``'s half-precision weights on CUDA, float32 elsewhere):
    images/s at ``batch_size`` and ms at batch 1, each speed-up over the dense model beside its MACs
    ratio. Returns {"rows", "device", "throughput_batch", "dtype", "runtime", "markdown"}."""
    speeds = interleaved_throughput([load(p, device=device)[0] for p in files], device, batch_size, input_size, amp)
    base = speeds[0]

    def timing(s):
        return {"images_per_s": s["images_per_s"], "batch1_ms": s["batch1_ms"],
                "speedup": base["batch_ms"] / s["batch_ms"], "speedup_batch1": base["batch1_ms"] / s["batch1_ms"]}
    timed = next((r for r in rows if r.get("predicted_ms") is not None), None)  # a row with a latency table
    table = [{"model": "dense", "gmacs": rows[0]["dense_gmacs"], "params": rows[0]["dense_params"],
              "acc1": rows[0]["dense_acc1"], "acc1_before_finetune": None, **timing(base),
              "macs_ratio": 1.0, "file": files[0], "predicted_ms": timed and timed["dense_predicted_ms"],
              "measured_ms": timed and timed["dense_measured_ms"]}]
    table += [{"model": row.get("label") or f"-{100 * row['reduction']:.0f}% GMACs", "gmacs": row["gmacs"],
               "params": row["params"], "acc1": row["acc1"], "acc1_before_finetune": row["acc1_before_finetune"],
               **timing(speed), "macs_ratio": row["dense_gmacs"] / row["gmacs"], "file": row["file"],
               "predicted_ms": row.get("predicted_ms"), "measured_ms": row.get("measured_ms")}
              for row, speed in zip(rows, speeds[1:])]
    columns = [("model", "{}"), ("GMACs", "gmacs", "{:.4g}"), ("params (M)", "params", "{:.3f}", 1e-6),
               ("val top-1", "acc1", "{:.2f}"), ("top-1 before finetune", "acc1_before_finetune", "{:.2f}"),
               ("images/s", "images_per_s", "{:.0f}"), ("speed-up", "speedup", "{:.2f}x"),
               ("batch-1 ms", "batch1_ms", "{:.3g}"), ("batch-1 speed-up", "speedup_batch1", "{:.2f}x"),
               ("MACs ratio", "macs_ratio", "{:.2f}x")]
    if timed:  # the latency table's batch, measured when the model was finetuned
        batch = timed["latency_table"]["measured_on"]["batch"]
        columns += [(f"predicted ms (batch {batch})", "predicted_ms", "{:.4g}"),
                    (f"measured ms (batch {batch})", "measured_ms", "{:.4g}")]
    text = markdown_table(table, columns)
    return {"rows": table, "device": str(device), "throughput_batch": batch_size, "dtype": base["dtype"],
            "runtime": base["runtime"], "markdown": text}


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
        if targets.numel() == 0:  # skipped by prediction_sums as well
            continue
        with autocast(device, amp):
            out = model(images.to(device, non_blocking=True))
        ref.append((F.log_softmax(class_logits(out).float(), dim=1).cpu(), targets.cpu(), _fingerprint(images)))
    model.train(was_training)
    return ref


def objective_stats(model, loader, device, reference=None, amp=False):
    """Top-1 (%), mean cross entropy and, given ``reference`` (reference_outputs of the dense
    model on the same loader), mean KL(dense || candidate) = mean_i sum_k p_ik (log p_ik - log q_ik)
    over the hold-out images. Sums and the image count are all-reduced across ranks before
    dividing (the hold-out is sharded), so a sharded hold-out gives the single-process values.
    Returns {"acc1", "loss", "kl" (None without reference), "n"}."""
    sums = _summed_over_ranks(prediction_sums(model, loader, device, amp, reference=reference), device)
    n = sums[4].item()
    if n == 0:
        raise ValueError("the hold-out loader gave no images")
    return {"acc1": 100.0 * sums[1].item() / n, "loss": sums[0].item() / n,
            "kl": sums[3].item() / n if reference is not None else None, "n": int(n)}


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


def policy_scorer(dense, loader, *, rankings, settings, latency_table=None, extra=None, device, amp=False):
    """``evaluate(x) -> (score, record)`` for ``expected_improvement.run_search``: slice ``dense``
    to the policy vector x (pruning.policy_vector's layout) keeping the components ``rankings``
    rank highest (with ``settings``' round_to, fuse and rounding), and score it on the fixed,
    unshuffled hold-out ``loader`` with ``settings.search_objective`` (objective_value). The record
    holds the policy, its counted GMACs and parameters, the budget GMACs under
    ``settings.flops_convention``, top-1, loss and KL, the ms per batch ``latency_table`` predicts
    (None without one), plus ``extra``. The dense model's outputs for the KL are computed once, here."""
    objective, round_to, fuse, rounding = (settings.search_objective, settings.round_to, settings.fuse,
                                           settings.rounding)
    convention = settings.flops_convention
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
            "loss": stats["loss"], "kl": stats["kl"],
            "predicted_ms": None if latency_table is None else latency.predict_ms(latency_table, dims, x, round_to,
                                                                                  rounding)}, **(extra or {}))
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
    search_reduction: Optional[float] = None  # the fraction of the dense model's GMACs removed, or
    search_speedup: Optional[float] = None  # a speed-up over the dense model predicted by a latency table, or
    search_latency_ms: Optional[float] = None  # milliseconds per batch predicted by a latency table

    take = classmethod(settings_from)

    @property
    def latency_budget(self):
        """True when the budget is a latency (a speed-up or ms on a latency table's device), not MACs."""
        return self.search_speedup is not None or self.search_latency_ms is not None

    def target(self, dense_gmacs, dense_ms=None):
        """The budget: GMACs for a dense model of ``dense_gmacs``, or with a latency budget the
        milliseconds per batch for a dense model predicted at ``dense_ms``."""
        given = [v is not None for v in (self.search_flops, self.search_reduction, self.search_speedup,
                                         self.search_latency_ms)]
        if sum(given) > 1:
            raise UserError("give one budget: --search_flops, --search-reduction, --search-speedup or "
                            "--search-latency-ms")
        if not any(given):
            raise UserError(f"--search needs a budget: --search_flops GMACS (the dense model has {dense_gmacs:.3f}), "
                            f"--search-reduction FRACTION, --search-speedup X or --search-latency-ms MS")
        if self.latency_budget:
            if dense_ms is None:
                raise ValueError("a latency budget needs the dense model's predicted ms (a latency table)")
            return self.search_latency_ms if self.search_latency_ms is not None else dense_ms / self.search_speedup
        return self.search_flops if self.search_flops is not None else dense_gmacs * (1 - self.search_reduction)

    def identity(self, sampler, table=None):
        """What defines a search of ``sampler``'s space under these settings (its run.json); a latency
        budget adds the latency table's hash and what it was measured on."""
        budget = ({"target_ms": sampler.target, "latency_table": latency.table_identity(table)} if table is not None
                  else {"target_gmacs": sampler.target})
        return {**budget, "seed": self.seed, "mode": self.search_mode,
                "objective": self.search_objective, "active": sampler.active.tolist(),
                "max_ratio": self.search_max_ratio, "tol": self.search_tol, "round_to": self.round_to,
                "fuse": self.fuse, "convention": self.flops_convention,
                "population": self.search_population, "pool": self.search_pool}

    @property
    def rounding(self):
        return "original" if self.flops_convention == "original" else "exact"

    def cost(self, dims, table=None):
        """The budget's vectorised cost of policies for a model of ``dims``: GMACs under
        ``flops_convention``, or with ``table`` the predicted ms per batch."""
        if table is not None:
            latency.check_table(table, dims)
            return lambda X: latency.predict_ms(table, dims, X, self.round_to, self.rounding)
        return lambda X: flops.policy_gmacs(dims, X, self.round_to, self.flops_convention)

    def space(self, dims, target, table=None):
        """The feasible policies of ``target`` (GMACs under ``flops_convention``, or with ``table``
        predicted ms) for a model of ``dims`` (pruning.model_dims): raises ei.InfeasibleTarget when
        none can meet it, saying what is reachable."""
        # here, not at the top: scikit-learn takes 2 s to import, only a search needs it
        import expected_improvement as ei
        depth = dims["depth"]
        active = np.repeat(self.active, [depth, depth, 1])
        try:
            return ei.FeasibleSampler(self.cost(dims, table), target, dim=2 * depth + 1, upper=self.search_max_ratio,
                                      tol=self.search_tol, active=active, unit="ms" if table is not None else "GMACs")
        except ei.InfeasibleTarget as e:
            if table is None:
                raise
            cost = self.cost(dims, table)
            fastest = float(cost(np.where(active, self.search_max_ratio, 0.0)[None, :])[0])
            dense_ms = float(cost(np.zeros((1, 2 * depth + 1)))[0])
            asked = (f"a speed-up of {self.search_speedup:g}x" if self.search_speedup is not None
                     else f"a latency of {target:.4g} ms")
            raise ei.InfeasibleTarget(
                f"{asked} is not reachable on {latency.describe(table)}: policies up to --search-max-ratio "
                f"{self.search_max_ratio:g} reach at most {dense_ms / fastest:.2f}x ({fastest:.4g} ms of the dense "
                f"{dense_ms:.4g} ms, predicted); ask for less or raise --search-max-ratio") from e


def _previous_search(out, identity, total):
    """Rank 0's decision for a search folder: refuse another search's, else (the history to
    replay, the rankings it scored with or None, best_policy.json's contents when this search of
    ``total`` evaluations has finished there, else None)."""
    check_run_identity(out, identity, "search")
    log_path, path = os.path.join(out, "search_log.jsonl"), os.path.join(out, "rankings.json")
    best_path = os.path.join(out, "best_policy.json")
    history = [dict(r, y=r.get("y", r.get("acc1"))) for r in read_jsonl(log_path)]
    finished = json.load(open(best_path)) if os.path.exists(best_path) and os.path.exists(path) else None
    if finished is not None and finished.get("evaluations") == total and len(history) >= total:
        return history[:total], finished["rankings"], finished  # touches no file
    write_jsonl(log_path, history)  # without a torn last line
    return history, (json.load(open(path)) if history and os.path.exists(path) else None), None


def search_policy(dense, loader, *, rankings, sampler, settings, val_loader=None, identity=None, latency_table=None,
                  run_dir=None, device, amp=False, distributed=False, rank=0):
    """Search the policy of ``dense`` that scores best on the hold-out ``loader`` among the feasible
    ones of ``sampler`` (``settings.space``): ``search_population`` random policies, then
    ``search_epoch`` EI steps (or random ones), each candidate sliced by ``rankings`` and scored by
    ``settings.search_objective``. ``rankings`` is a dict (dependency_criterion.rank_model) or a
    function computing one, called only when needed.

    With ``run_dir``, the search is a resumable run folder: ``run.json`` (what defines the search:
    ``settings.identity(sampler)`` and the caller's ``identity``, e.g. the dense model, the
    rankings' criterion and the hold-out; another search's folder is refused), ``search_log.jsonl`` (replayed after an
    interruption, so the search continues as the uninterrupted one would), ``rankings.json``, and
    at the end ``best_policy.json`` and ``search.png``; a finished search is returned as it was,
    touching no file. Under torch.distributed every rank calls
    this; rank 0 decides, asks the GP and broadcasts. The best model is evaluated on
    ``val_loader`` when given. With a latency budget ``latency_table`` is the table the sampler
    predicts with (``settings.space(..., table)``): it joins the identity, every record carries its
    predicted ms, and the best model's ms are measured against the dense model's at the end (on the
    table's device type). Returns ``{"result" (best_policy.json's contents: policy, vector, GMACs,
    predicted and measured ms, scores, settings, the rankings, the caller's ``identity``), "model"
    (the best policy's sliced model), "history"}``."""
    given = dict(identity or {})
    identity = dict(settings.identity(sampler, latency_table), **given)
    total = settings.search_population + settings.search_epoch
    history, found, finished = (decide_on_rank0(lambda: _previous_search(run_dir, identity, total)) if run_dir
                                else ([], None, None))
    if finished is not None:
        logger.info(f"search: using the finished search in {run_dir}/best_policy.json")
        model = pruning.slice_model(dense, finished["policy"], finished["rankings"], settings.round_to, settings.fuse,
                                    settings.rounding)
        return {"result": finished, "model": model, "history": history}
    rankings = found or (rankings() if callable(rankings) else rankings)
    log_path = os.path.join(run_dir, "search_log.jsonl") if run_dir else None
    if run_dir and rank == 0:
        write_json_atomic(os.path.join(run_dir, "rankings.json"), rankings)
    if len(history) > total:
        logger.info(f"search: {run_dir}/search_log.jsonl holds {len(history)} evaluations; a search of {total} "
                    f"takes the first {total}, as an uninterrupted one would (the log keeps all {len(history)})")
    elif history:
        logger.info(f"search: resuming after {len(history)} of {total} evaluations")
    score = policy_scorer(dense, loader, rankings=rankings, settings=settings, latency_table=latency_table,
                          extra={"search": identity}, device=device, amp=amp)
    t_start, done = time.time(), [0]

    def on_record(rec):
        if log_path:
            append_jsonl(log_path, rec)
        done[0] += 1
        eta = (time.time() - t_start) / done[0] * (total - rec["step"] - 1)
        ms = f"predicted {rec['predicted_ms']:.4g} ms " if rec.get("predicted_ms") is not None else ""
        logger.info(f"search [{rec['step'] + 1}/{total}] {rec['phase']} gmacs {rec['gmacs']:.4g} {ms}"
                    f"acc {rec['acc1']:.2f} eta {format_seconds(eta)}")
    import expected_improvement as ei
    res = ei.run_search(score, sampler, settings.search_population, settings.search_epoch, seed=settings.seed,
                        mode=settings.search_mode, history=history, on_record=on_record,
                        share=broadcast_object if distributed else None, leader=rank == 0,
                        pool_size=settings.search_pool, refine_per_point=max(20, settings.search_pool // 20))
    best, spent = res["best"], sum(r["seconds"] for r in res["history"])
    model = pruning.slice_model(dense, best["policy"], rankings, settings.round_to, settings.fuse, settings.rounding)
    val = evaluate(val_loader, model, device, amp) if val_loader is not None else None
    speed = {}
    if latency_table is not None:
        speed = latency.speed_record(latency_table, pruning.model_dims(dense), dense, model, np.asarray(best["x"]),
                                     device, settings.round_to, settings.rounding)
        speed.update(target_ms=sampler.target, latency_table=latency.table_identity(latency_table),
                     latency_table_file=latency_table.get("file"))
    result = {"policy": best["policy"], "vector": best["x"], "input_size": pruning.model_dims(dense)["img_size"],
              "target_gmacs": None if speed else sampler.target,
              "gmacs": best["gmacs"], **speed,
              "dense_gmacs": flops.model_macs(dense, convention=settings.flops_convention)["macs"] / 1e9,
              "params": best["params"], "search_acc1": best["acc1"],
              "val_acc1_before_finetune": val and val["acc1"], "step": best["step"],
              "evaluations": len(res["history"]), "objective": settings.search_objective, "search_score": best["y"],
              "mode": settings.search_mode, "flops_convention": settings.flops_convention,
              "budget_gmacs": best["budget_gmacs"], "round_to": settings.round_to, "fuse": settings.fuse,
              "gp_share": sum(r.get("gp_seconds", 0.0) for r in res["history"]) / spent
              if spent > 0 and settings.search_mode == "ei" else None, **given, "rankings": rankings}
    if speed:
        budget = (f"predicted {speed['predicted_ms']:.4g} ms ({speed['predicted_speedup']:.2f}x; target "
                  f"{sampler.target:.4g} ms)" + (f", measured {speed['measured_ms']:.4g} ms "
                                                  f"({speed['measured_speedup']:.2f}x "
                                                  f"the dense model's {speed['dense_measured_ms']:.4g} ms)"
                                                  if speed["measured_ms"] else "") + f", {best['gmacs']:.4g} GMACs")
    else:
        budget = (f"{best['budget_gmacs']:.4g} GMACs ({settings.flops_convention}; target {sampler.target:.4g}; exact "
                  f"{best['gmacs']:.4g})")
    logger.info(f"search done: best {settings.search_objective} {best['y']:.4g} on the search split at {budget}"
                + (f"; val top-1 before finetune {val['acc1']:.2f}" if val else ""))
    if run_dir and rank == 0:
        write_json_atomic(os.path.join(run_dir, "best_policy.json"), result)
        plots.plot_history(res["history"], os.path.join(run_dir, "search.png"),
                           f"{settings.search_objective} on the search split")
    return {"result": result, "model": model, "history": res["history"]}


def _previous_finetune(run_dir, identity, recipe):
    """Rank 0's decision for a prune+finetune folder: refuse another run's, else result.json's
    contents when this run has finished there (all of ``recipe``'s epochs), True when it holds a
    checkpoint to continue, False for a new run."""
    if not check_run_identity(run_dir, identity, "prune+finetune"):
        return False
    path = os.path.join(run_dir, "result.json")
    done = json.load(open(path)) if os.path.exists(path) else {}
    if (done.get("finetune_epochs"), done.get("cooldown_epochs", 0)) == (recipe.epochs, recipe.cooldown_epochs) \
            and os.path.exists(os.path.join(run_dir, "compressed.pth")):
        return done
    return os.path.exists(os.path.join(run_dir, "checkpoint.pth"))


def prune_finetune(dense, data, *, dense_arch, policy, rankings, recipe, settings=None, identity=None, extra=None,
                   latency_table=None, run_dir=None, device, amp=False, distributed=False, rank=0):
    """Slice ``dense`` (its ``dense_arch``) to ``policy``, keeping the components ``rankings``
    rank highest (a dict, or a function computing one, called only when needed), and finetune it
    by ``recipe`` (its drop_path given to the sliced model's blocks as timm schedules it), distilling
    from ``dense`` unless the recipe says none. ``settings`` (SearchSettings) gives round_to, fuse
    and the rounding; ``data`` is datasets.build_loaders' dict. Accuracy before finetuning is
    measured once and kept in the checkpoints, so a resumed run reports the same.

    With ``run_dir`` the run is resumable: ``run.json`` holds what defines it (the policy, the
    settings' rounding, the recipe less its length, and the caller's ``identity``, e.g. the dense
    file and where the rankings came from; a different run's folder is refused), every epoch writes
    ``checkpoint.pth``, and at the end rank 0 writes ``compressed.pth`` (load it with models.load;
    ``extra`` stored beside) and ``result.json`` (the policy, the caller's ``identity``, then the
    figures); a run that has finished all of ``recipe``'s epochs is returned as it was, touching no
    file. With a ``latency_table`` (the one a latency budget was searched with) the table joins the
    identity and result.json gains the predicted and measured ms and speed-ups of the finetuned
    model against the dense one.
    Returns result.json's contents."""
    settings, given = settings or SearchSettings(), dict(identity or {})
    identity = {"policy": policy, "round_to": settings.round_to, "fuse": settings.fuse, "rounding": settings.rounding,
                "recipe": {k: v for k, v in recipe.as_dict().items()
                           if k not in ("epochs", "cooldown_epochs", "log_every", "max_steps")},
                **({"latency_table": latency.table_identity(latency_table)} if latency_table is not None else {}),
                **(identity or {})}
    ckpt_path, state = run_dir and os.path.join(run_dir, "checkpoint.pth"), None
    found = decide_on_rank0(lambda: _previous_finetune(run_dir, identity, recipe)) if run_dir else None
    if isinstance(found, dict):
        logger.info(f"prune+finetune: using the finished prune+finetune in {run_dir}/result.json")
        return found
    if found:
        state = load_checkpoint_file(ckpt_path)
        trained, asked = int(state["epoch"]) + 1, recipe.epochs + recipe.cooldown_epochs
        if trained > asked:  # its result would claim fewer epochs than the model has had
            raise UserError(f"{run_dir} has finetuned {trained} epochs, more than the {asked} asked for; ask for "
                            f"{trained} or more (--finetune-epochs), or delete {run_dir} to finetune anew")
        model, arch, _ = load(ckpt_path, ckpt=state)
        logger.info(f"prune+finetune: continuing the compressed model in {ckpt_path}")
    else:
        rankings = rankings() if callable(rankings) else rankings
        model = pruning.slice_model(dense, policy, rankings, settings.round_to, settings.fuse, settings.rounding)
        arch = dict(dense_arch, prune_spec=model.prune_spec)
    if recipe.drop_path > 0:  # sliced or reloaded, the model has no stochastic depth of its own
        set_drop_path(model, recipe.drop_path)
    model.to(device)
    dense_m, comp_m = flops.model_macs(dense), flops.model_macs(model)
    logger.info(f"{dense_m['macs'] / 1e9:.4g} -> {comp_m['macs'] / 1e9:.4g} GMACs "
                f"({100 * (1 - comp_m['macs'] / dense_m['macs']):.1f}% fewer), params "
                f"{dense_m['params'] / 1e6:.3f}M -> {comp_m['params'] / 1e6:.3f}M")
    before = (state or {}).get("before_finetune") or evaluate(data["val"], model, device, amp)
    dense_stats = evaluate(data["val"], dense, device, amp)
    logger.info(f"val top-1: dense {dense_stats['acc1']:.2f}, pruned before finetune {before['acc1']:.2f}")
    stats = fit(model, data["train"], data["val"], recipe=recipe, num_classes=data["num_classes"], arch=arch,
                teacher=dense if recipe.distillation != "none" else None, resume=state,
                extra=dict(extra or {}, recipe=recipe.as_dict(), before_finetune=before), tag="finetune",
                run_dir=run_dir, device=device, amp=amp, distributed=distributed, rank=rank)
    result = dict(given, policy=policy, dense_gmacs=dense_m["macs"] / 1e9, gmacs=comp_m["macs"] / 1e9,
                  dense_params=dense_m["params"], params=comp_m["params"], dense_acc1=dense_stats["acc1"],
                  acc1_before_finetune=before["acc1"], acc1=stats["acc1"], acc5=stats["acc5"],
                  finetune_epochs=recipe.epochs, cooldown_epochs=recipe.cooldown_epochs)
    if latency_table is not None:
        result.update(latency.speed_record(latency_table, pruning.model_dims(dense), dense, model,
                                           pruning.policy_to_vector(policy), device, settings.round_to,
                                           settings.rounding),
                      latency_table=latency.table_identity(latency_table))
    if run_dir and rank == 0:
        result["file"] = os.path.join(run_dir, "compressed.pth")
        save_model_file(result["file"], model, arch, extra=dict(extra or {}, val=stats))
        write_json_atomic(os.path.join(run_dir, "result.json"), result)
        logger.info(f"compressed model written to {result['file']} (load it with models.load)")
    logger.info(f"prune+finetune done: val top-1 {stats['acc1']:.2f} (dense {dense_stats['acc1']:.2f}, "
                f"before finetune {before['acc1']:.2f}) at {result['gmacs']:.4g} GMACs"
                + (f", measured {result['measured_speedup']:.2f}x the dense model's speed"
                   if result.get("measured_speedup") else ""))
    return result
