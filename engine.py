"""One training epoch, evaluation and throughput: device-agnostic (CPU, CUDA, AMP on CUDA)."""
import contextlib
import logging
import math
import statistics
import time

import torch
import torch.nn.functional as F

from utils import Progress, all_reduce_sum

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


@torch.no_grad()
def throughput(model, device, batch_size=64, input_size=224, amp=False, warmup=3, repeats=10):
    """Images per second: warm-up, then ``repeats`` timed batches; returns the median rate."""
    model.eval()
    x = torch.randn(batch_size, 3, input_size, input_size, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode(), autocast(device, amp):
        for _ in range(warmup):
            model(x)
        sync()
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            sync()
            rates.append(batch_size / (time.perf_counter() - t0))
    return statistics.median(rates)


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
    import utils
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
    utils.all_reduce_sum(sums)
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
# ----------------------------------------------------------------------------------------------
