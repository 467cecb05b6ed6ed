"""One training epoch, evaluation and throughput: device-agnostic (CPU, CUDA, AMP on CUDA)."""
import contextlib
import logging
import math
import os
import shutil
import statistics
import time

import torch
import torch.nn.functional as F

from utils import Progress, UserError, all_reduce_sum

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
    """Top-1, top-5 and mean loss over the loader; counts are summed over ranks, so a
    sharded evaluation (every image once) equals a single-process one exactly."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss*n, correct1, correct5, n
    progress = Progress(len(loader), header, every=log_every) if log_every else None
    for step, (images, targets) in enumerate(loader):
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
    if device.type == "cuda":
        sums = sums.to(device)
    all_reduce_sum(sums)
    sums = sums.cpu()
    n = max(sums[3].item(), 1)
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
