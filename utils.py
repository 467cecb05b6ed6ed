"""Distributed set-up, rank-0 logging, progress with ETA, atomic checkpoints, seeding.

Nothing here reads argparse: functions take plain values (or an object with the
attributes they name) so that library code and tests can call them directly.
"""
import argparse
import dataclasses
import datetime
import json
import logging
import os
import pickle
import random
import re
import socket
import time
from collections import defaultdict, deque

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger("vitcompress")


class UserError(Exception):
    """A bad input from the user: main() prints its message as one line and exits."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, not ours, or for another architecture."""


# --------------------------------------------------------------------------- distributed

def first_slurm_host(nodelist):
    """First host name of a SLURM node list such as 'gpu[01-04,07],cpu3'."""
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not match:
        return nodelist
    prefix, ranges = match.group(1), match.group(3)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def distributed_env(environ=None):
    """Read rank / world size / local rank from the launcher's environment.

    Understands torchrun and ``torch.distributed.launch --use_env`` (RANK, WORLD_SIZE,
    LOCAL_RANK) and SLURM's srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID). Returns
    None for a plain single-process run.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return {
            "rank": int(env["RANK"]),
            "world_size": int(env["WORLD_SIZE"]),
            "local_rank": int(env.get("LOCAL_RANK", 0)),
            "source": "torchrun",
        }
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return {
            "rank": int(env["SLURM_PROCID"]),
            "world_size": int(env["SLURM_NTASKS"]),
            "local_rank": int(env.get("SLURM_LOCALID", 0)),
            "source": "slurm",
        }
    return None


def init_distributed(device_name, dist_url="env://", local_rank_arg=None, timeout_min=30):
    """Initialise torch.distributed when launched by torchrun / launch / srun.

    Returns a dict {distributed, rank, world_size, local_rank, device}. NCCL on CUDA,
    gloo on CPU. ``local_rank_arg`` is the ``--local-rank`` a legacy launcher may pass.
    """
    info = distributed_env()
    want_cuda = device_name.startswith("cuda")
    if info is None:
        device = torch.device(device_name)
        return {"distributed": False, "rank": 0, "world_size": 1, "local_rank": 0, "device": device}

    local_rank = info["local_rank"]
    if local_rank_arg is not None and local_rank_arg >= 0 and info["source"] != "slurm":
        local_rank = local_rank_arg
    if info["source"] == "slurm":
        os.environ.setdefault("MASTER_ADDR", first_slurm_host(os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        os.environ.setdefault("MASTER_PORT", str(29500 + int(os.environ.get("SLURM_JOB_ID", "0")) % 1000))
        os.environ["RANK"] = str(info["rank"])
        os.environ["WORLD_SIZE"] = str(info["world_size"])
        os.environ["LOCAL_RANK"] = str(local_rank)

    if want_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device(device_name)
        backend = "gloo"
    dist.init_process_group(backend=backend, init_method=dist_url, world_size=info["world_size"],
                            rank=info["rank"], timeout=datetime.timedelta(minutes=timeout_min))
    dist.barrier()
    return {"distributed": True, "rank": info["rank"], "world_size": info["world_size"],
            "local_rank": local_rank, "device": device}


def is_dist():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_dist() else 0


def get_world_size():
    return dist.get_world_size() if is_dist() else 1


def is_main_process():
    return get_rank() == 0


def barrier():
    if is_dist():
        dist.barrier()


def all_reduce_sum(tensor):
    """Sum a tensor over ranks in place (no-op on one process); returns it."""
    if is_dist():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj, src=0):
    """Send a picklable object from ``src`` to every rank (identity on one process)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup_distributed():
    if is_dist():
        dist.destroy_process_group()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- seeding

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- logging

class _RankFilter(logging.Filter):
    def filter(self, record):
        return is_main_process()


def setup_logging(output_dir=None, level=logging.INFO):
    """Rank-0 logging to stderr and, when given, ``output_dir/log.txt``."""
    logger.handlers.clear()
    logger.setLevel(level)
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
    handlers = [logging.StreamHandler()]
    if output_dir and is_main_process():
        os.makedirs(output_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(output_dir, "log.txt")))
    for h in handlers:
        h.setFormatter(fmt)
        h.addFilter(_RankFilter())
        logger.addHandler(h)
    return logger


def append_jsonl(path, record):
    """Append one JSON line (rank 0 only)."""
    if not is_main_process():
        return
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def read_jsonl(path):
    """Records of a JSON-lines file; a torn last line (killed mid-write) is dropped."""
    records = []
    if not os.path.exists(path):
        return records
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


def primitives(d):
    """Only primitives survive into checkpoints (weights_only=True loads them)."""
    ok = (bool, int, float, str)
    return {k: v if v is None or isinstance(v, ok) else list(v) if isinstance(v, (list, tuple)) and
            all(isinstance(x, ok) for x in v) else str(v) for k, v in d.items()}


def markdown_table(rows, columns):
    """A Markdown table of dict rows. Each column is (title, key, format[, scale]) or (key, format)
    with the key as title; a missing or None value is left empty."""
    cols = [(c[0], c[0], c[1], 1) if len(c) == 2 else (c[0], c[1], c[2], c[3] if len(c) > 3 else 1) for c in columns]
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = ["" if r.get(key) is None else fmt.format(r[key] * scale if scale != 1 else r[key])
                 for _, key, fmt, scale in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_jsonl(path, records):
    """Rewrite a JSON-lines file with ``records`` (rank 0 only), atomically."""
    if not is_main_process():
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(tmp, path)


def read_json_object(path, error=UserError):
    """The JSON object (a dict) in ``path``; ``error`` (a UserError class) in one line otherwise."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise error(f"{path} is not a readable JSON file: {clean_message(e)}") from e
    if not isinstance(obj, dict):
        raise error(f"{path} does not hold a JSON object")
    return obj


def write_json_atomic(path, obj):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def format_seconds(seconds):
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class SmoothedValue:
    """Running window and global average of a scalar."""

    def __init__(self, window=20):
        self.values = deque(maxlen=window)
        self.total = 0.0
        self.count = 0

    def update(self, value, n=1):
        self.values.append(value)
        self.total += value * n
        self.count += n

    @property
    def median(self):
        return float(np.median(self.values)) if self.values else float("nan")

    @property
    def global_avg(self):
        return self.total / max(self.count, 1)


class Progress:
    """Log every ``every`` steps with the running means and an ETA for the loop."""

    def __init__(self, total, header, every=10):
        self.total = total
        self.header = header
        self.every = max(1, every)
        self.meters = defaultdict(SmoothedValue)
        self.start = time.time()

    def update(self, step, **values):
        for k, v in values.items():
            self.meters[k].update(float(v))
        done = step + 1
        if done % self.every == 0 or done == self.total:
            elapsed = time.time() - self.start
            eta = elapsed / done * (self.total - done)
            parts = " ".join(f"{k} {m.median:.4g}" for k, m in self.meters.items())
            logger.info(f"{self.header} [{done}/{self.total}] {parts} eta {format_seconds(eta)}")

    def averages(self):
        return {k: m.global_avg for k, m in self.meters.items()}


# --------------------------------------------------------------------------- checkpoints

def save_atomic(obj, path):
    """torch.save to a temp file in the same folder, then rename over ``path`` (rank 0 only).

    A run killed while writing leaves the previous file intact.
    """
    if not is_main_process():
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def clean_message(exc, limit=300):
    """An exception's text as one readable line: terminal colour codes removed, whitespace
    collapsed, cut at a word boundary with an ellipsis when longer than ``limit``."""
    text = _ANSI.sub("", str(exc)).strip() or type(exc).__name__
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " ..."
    return text


def _torch_load(path):
    """weights_only load that also accepts the ``argparse.Namespace`` that DeiT's and timm's
    training scripts store under ``args`` (allow-listed; nothing else is unpickled)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


_TORCH_ADVICE = re.compile(r"weights[_ ]only|unpickl|trusted source|file an issue|torch\.load", re.I)


def _unreadable(path, exc):
    """The CheckpointError for a file ``torch.load(weights_only=True)`` refused or could not parse.

    It says what the file is not and why, in one line; it never passes on PyTorch's advice to
    load the file again without ``weights_only`` (that runs the file's code: unsafe for a file of
    unknown origin)."""
    text = str(exc)
    if "Unsupported global" in text or "GLOBAL " in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        what = f" (it stores a {found.group(1)} object)" if found else ""
        return CheckpointError(f"{path} is not a checkpoint or state dict this tool can read safely: it holds "
                               f"pickled Python objects{what}, which are not loaded for safety; save its "
                               f"state_dict instead")
    reason = re.search(r"WeightsUnpickler error:(.*?)(?:Check the documentation|$)", text, re.S)
    detail = clean_message(reason.group(1) if reason else exc, limit=160)
    if _TORCH_ADVICE.search(detail):
        detail = ""
    elif isinstance(exc, (KeyError, EOFError)) and detail != type(exc).__name__:  # a bare '101' says nothing
        detail = f"{type(exc).__name__}: {detail}"
    return CheckpointError(f"{path} is not a checkpoint or state dict this tool can read safely: it is corrupt "
                           f"or not a PyTorch checkpoint" + (f" ({detail})" if detail else ""))


def load_checkpoint_file(path):
    """Load a checkpoint of primitives with ``weights_only=True``; one-line errors otherwise.

    A stored ``argparse.Namespace`` (DeiT's ``main.py``, timm's ``train.py``) comes back as a
    plain dict under the same key. A file that is corrupt, not a PyTorch file, or pickles other
    objects is refused (``_unreadable``); nothing in it is unpickled."""
    if path.startswith("http://") or path.startswith("https://"):
        try:
            obj = torch.hub.load_state_dict_from_url(path, map_location="cpu", check_hash=False,
                                                     weights_only=True)
        except pickle.UnpicklingError as e:  # fetched, but refused by the weights-only reader
            raise _unreadable(path, e) from e
        except Exception as e:  # network and format errors alike: name them in one line
            if _TORCH_ADVICE.search(str(e)):
                raise _unreadable(path, e) from e
            raise CheckpointError(f"could not fetch checkpoint {path}: {type(e).__name__}: {clean_message(e)}") from e
    else:
        if not os.path.exists(path):
            raise CheckpointError(f"checkpoint not found: {path}")
        if os.path.isdir(path):
            raise CheckpointError(f"checkpoint path is a folder, not a file: {path}")
        if path.endswith(".safetensors"):
            try:
                from safetensors.torch import load_file
                return load_file(path)
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{path} is not a readable safetensors file: {clean_message(e)}") from e
        try:
            obj = _torch_load(path)
        except Exception as e:  # torch.load raises many types for bad files: name them in one line
            raise _unreadable(path, e) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a state dict or checkpoint dict (found {type(obj).__name__})")
    return {k: (vars(v) if isinstance(v, argparse.Namespace) else v) for k, v in obj.items()}


def state_dict_of(obj):
    """The model state dict inside a checkpoint dict (ours, DeiT's, timm's) or the dict itself."""
    for key in ("model", "state_dict", "model_ema"):
        if key in obj and isinstance(obj[key], dict):
            return obj[key]
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise CheckpointError("checkpoint holds no model weights (no 'model' or 'state_dict' entry)")


# --------------------------------------------------------------------------- decisions and run identity

def decide_on_rank0(fn):
    """Run ``fn()`` on rank 0 only and give every rank its result, or raise its UserError on
    every rank: a control-flow decision (skip, resume, refuse) taken once, identically."""
    result, error = None, None
    if is_main_process():
        try:
            result = fn()
        except UserError as e:
            error = (type(e).__name__, str(e))
    result, error = broadcast_object((result, error))
    if error is not None:
        raise UserError(error[1])
    return result


def _differences(old, new, prefix=""):
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {a!r} -> {b!r}" if len(repr(a)) + len(repr(b)) < 80 else f"{prefix}{key}")
    return out


def settings_from(cls, obj, **overrides):
    """The one way a settings dataclass (datasets.DataConfig, engine.Recipe, engine.SearchSettings)
    is built from flags: the attributes of ``obj`` (e.g. the CLI's settled configuration) that
    ``cls`` names as fields, then ``overrides``; lists become tuples (frozen, hashable settings)."""
    values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(cls) if hasattr(obj, f.name)}
    values.update(overrides)
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def check_run_identity(run_dir, identity, step, fresh=False):
    """One rule for every resumable step: ``run_dir/run.json`` records what defines the run
    (primitives). A new run writes it; a rerun with the same identity continues; a different
    one is refused with a one-line error naming the differences; ``fresh=True`` (a run that
    starts over rather than continues) records its identity over the old one. Call from rank 0
    (see ``decide_on_rank0``). Returns True when ``run_dir`` already held this run."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "run.json")
    identity = json.loads(json.dumps(identity))  # primitives, as stored
    if os.path.exists(path) and not fresh:
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{path} is unreadable ({clean_message(e)}); delete it to start this {step} afresh") from e
        diff = _differences(old, identity)
        if diff:
            raise UserError(f"{run_dir} holds another {step} run ({'; '.join(diff[:4])}); "
                            f"use another --output_dir or delete {run_dir}")
        return True
    write_json_atomic(path, identity)
    return False
