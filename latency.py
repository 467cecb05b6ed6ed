"""Measured latency: timing forwards on a device, and latency tables that predict a policy's milliseconds.

Timing (``time_calls``): zero-argument callables timed in interleaved rounds (every call once per
round, so machine noise hits all of them alike), each round running a call ``reps`` times back to
back; on CUDA between two CUDA events, on other devices with ``time.perf_counter``; the result is
the median over rounds of the milliseconds per call.

A table is a JSON-serialisable dict, measured for one dense model (its ``arch``) and one setting
(its ``key``: device and its name, torch version, dtype, batch, runtime, CPU threads)::

    {"version": 1, "key": {...}, "arch": {...}, "fuse": "mean",
     "tokens": [token counts n of the grid],                        # prefix included
     "attn":   {"heads": [h grid], "ms": [[ms at (h, n)]]},          # x + ls1(attn(norm1(x)))
     "reduce": {"heads": [h grid], "ms": [[...]]},                   # the same branch of a token-reducing
                                                                     # block: class row, top-k, fusing
     "mlp":    {"widths": [w grid], "ms": [[ms at (w, n)]]},         # x + ls2(mlp(norm2(x)))
     "stem_ms": ms,                                                  # patch embedding, position embedding
     "head":   {"tokens": [...], "ms": [...]},                       # final norm, pooling, classifier(s)
     "calibration": {"scale", "offset", "points": [...], "error_before", "error_after"},
     "sha256": hash of everything else}

Every unit is measured at batch ``key.batch`` on the device, made monotone (never cheaper with more
heads, neurons or tokens) and interpolated bilinearly between grid points; a policy's prediction
is the sum of its units (each block costs its attention or reducing branch plus its MLP), mapped by
the calibration ``scale * sum + offset`` fitted on whole models measured end to end.

    python latency.py --model deit_small_patch16_224 --batch-size 32 --threads 2 --out table.json
    python latency.py --resume dense.pth --batch-size 64 --device cuda --out table.json
"""
import copy
import hashlib
import json
import logging
import os
import platform
import statistics
import time

import numpy as np
import torch
from timm.models.eva import Eva

import pruning
from utils import Progress, UserError, read_json_object, write_json_atomic

def synchronize(device):
    """Wait for the device's queued work (a no-op off CUDA)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(calls, device, rounds=5, reps=3, warmup=1):
    """Median milliseconds per call of each zero-argument callable in ``calls``.

    ``warmup`` untimed rounds first; then ``rounds`` interleaved rounds in which every call runs
    ``reps`` times back to back (one number for all, or one per call; CUDA: timed by CUDA events
    around the back-to-back calls, one synchronisation per group; elsewhere by ``time.perf_counter``)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    reps = [int(reps)] * len(calls) if np.ndim(reps) == 0 else [int(r) for r in reps]
    for _ in range(int(warmup)):
        for fn in calls:
            fn()
    synchronize(device)
    samples = [[] for _ in calls]
    for _ in range(int(rounds)):
        for i, fn in enumerate(calls):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(reps[i]):
                    fn()
                end.record()
                end.synchronize()
                samples[i].append(start.elapsed_time(end) / reps[i])
            else:
                t0 = time.perf_counter()
                for _ in range(reps[i]):
                    fn()
                samples[i].append((time.perf_counter() - t0) * 1e3 / reps[i])
    return [statistics.median(s) for s in samples]


# ----------------------------------------------------------------------------------------------
# latency tables
# ----------------------------------------------------------------------------------------------

logger = logging.getLogger("vitcompress")

TABLE_VERSION = 1
RUNTIMES = ("eager",)
ARCH_KEYS = ("depth", "embed_dim", "head_dim", "num_heads", "mlp_hidden", "num_prefix_tokens", "num_patches",
             "num_classes", "num_classifier_heads", "global_pool", "attn_gate")


class TableError(UserError):
    """A latency table that does not fit the model or cannot be read (one-line message)."""


def check_measurable(model):
    """Raise TableError (one line) for a dense model whose units a table does not measure: an EVA
    model (its blocks' attention takes the model's rotary position embedding, which the units here
    do not feed, and it cannot reduce tokens). Its MACs budget and measured whole-model speed work."""
    if isinstance(model, Eva):
        raise TableError("latency tables are not measured for EVA models (their attention units need the model's "
                         "rotary position embedding); budget them in MACs: --search_flops or --search-reduction")


def device_name(device):
    """What a device is, in words: the GPU's name, or the CPU's model."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return name


def table_key(device, dtype, batch_size, runtime="eager"):
    """What a table is measured on: the lookup key of the cache and part of a search's identity."""
    device = torch.device(device)
    key = {"device": device.type, "device_name": device_name(device), "torch": torch.__version__,
           "dtype": str(dtype).replace("torch.", ""), "batch": int(batch_size), "runtime": runtime}
    if device.type == "cpu":
        key["threads"] = torch.get_num_threads()
    return key


def key_slug(key):
    """A file name for a table measured on ``key``: latency-cpu-float32-b64-eager-2t.json."""
    threads = f"-{key['threads']}t" if "threads" in key else ""
    return f"latency-{key['device']}-{key['dtype']}-b{key['batch']}-{key['runtime']}{threads}.json"


def _arch(dims):
    return {k: copy.deepcopy(dims.get(k)) for k in ARCH_KEYS}


def _token_grid(dims, points):
    """Token counts from the smallest a reducing schedule can leave (prefix + 1 kept + 1 fused) to the dense count."""
    prefix, n_max = int(dims["num_prefix_tokens"]), int(dims["num_prefix_tokens"]) + int(dims["num_patches"])
    n_min = min(prefix + 2, n_max)
    return sorted({int(round(v)) for v in np.linspace(n_min, n_max, max(int(points), 2))})


def _width_grid(max_width, round_to, points):
    """MLP widths at multiples of ``round_to`` (and the dense width) spread over (0, max_width]."""
    step = max(1, min(int(round_to), int(max_width)))
    grid = {int(max_width)} | {int(max(step, round(v / step) * step))
                               for v in np.linspace(step, max_width, max(int(points), 2))}
    return sorted(w for w in grid if w <= max_width)


def _monotone(values):
    """Running maxima along every axis: more heads, neurons or tokens never cost less."""
    out = np.asarray(values, dtype=np.float64)
    for axis in range(out.ndim):
        out = np.maximum.accumulate(out, axis=axis)
    return out


def default_timer(device, rounds=3, target_ms=20.0):
    """``timer(items) -> ms per item``: each item is (description, callable); the callables are
    timed in interleaved rounds (``time_calls``), each repeated back to back so that one timed
    group lasts about ``target_ms``."""
    def timer(items):
        calls = [fn for _, fn in items]
        probe = time_calls(calls, device, rounds=1, reps=1, warmup=1)
        reps = [max(1, min(50, int(np.ceil(target_ms / max(t, 1e-3))))) for t in probe]
        return time_calls(calls, device, rounds=rounds, reps=reps, warmup=0)
    return timer


@torch.no_grad()
def _unit_items(dense, dims, batch_size, device, dtype, tokens, heads, widths, fuse):
    """(description, callable) for every unit of the grid, on ``device`` in ``dtype``."""
    blocks = pruning.vit_blocks(dense)
    ref = blocks[int(np.argmax(dims["mlp_hidden"]))]
    prefix, chans = int(dims["num_prefix_tokens"]), int(dims["embed_dim"])
    score = pruning.token_score_kind(dims)  # the reducing branch ranks tokens as the model's blocks will
    gen = torch.Generator().manual_seed(0)
    inputs = {n: torch.randn(batch_size, n, chans, generator=gen).to(device, dtype) for n in tokens}
    items = []

    def unit(blk):
        return blk.to(device, dtype).eval()

    for h in heads:
        blk = unit(pruning.slice_block(ref, h, ref.mlp.fc1.out_features))
        for n in tokens:
            x = inputs[n]
            items.append(({"unit": "attn", "heads": h, "tokens": n},
                          lambda blk=blk, x=x: x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))))
            keep = max(1, int(round(0.75 * (n - prefix))) - 1)
            items.append(({"unit": "reduce", "heads": h, "tokens": n, "keep": keep},
                          lambda blk=blk, x=x, keep=keep: _reducing_branch(blk, x, prefix, keep, fuse, score)))
    for w in widths:
        blk = unit(pruning.slice_block(ref, 1, w))
        for n in tokens:
            x = inputs[n]
            items.append(({"unit": "mlp", "neurons": w, "tokens": n},
                          lambda blk=blk, x=x: x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))))
    stem = copy.deepcopy(dense)
    stem.blocks, stem.norm = torch.nn.Sequential(), torch.nn.Identity()
    stem = stem.to(device, dtype).eval()
    size = dims["img_size"] or [int(dims["patch_size"][0]) * 14] * 2
    images = torch.randn(batch_size, int(dims["in_chans"]), *size, generator=gen).to(device, dtype)
    items.append(({"unit": "stem"}, lambda: stem.forward_features(images)))
    head = copy.deepcopy(dense)
    head.blocks = torch.nn.Sequential()
    head = head.to(device, dtype).eval()
    for n in tokens:
        items.append(({"unit": "head", "tokens": n}, lambda x=inputs[n]: head.forward_head(head.norm(x))))
    return items


def _reducing_branch(blk, x, prefix, keep, fuse, score="class"):
    if keep >= x.shape[1] - prefix:
        return x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))
    y, token_score = pruning.attention_with_token_score(blk.attn, blk.norm1(x), prefix, score)
    return pruning.reduce_tokens(x + blk.drop_path1(blk.ls1(y)), token_score, prefix, keep, fuse)


def _interp1(grid, values, q):
    return np.interp(np.asarray(q, np.float64), np.asarray(grid, np.float64), np.asarray(values, np.float64))


def interp2(grid_a, grid_b, values, a, b):
    """Bilinear interpolation of ``values`` [len(grid_a), len(grid_b)] at (a, b), clipped to the grid."""
    ga, gb, v = (np.asarray(g, np.float64) for g in (grid_a, grid_b, values))
    a = np.clip(np.asarray(a, np.float64), ga[0], ga[-1])
    b = np.clip(np.asarray(b, np.float64), gb[0], gb[-1])

    def locate(g, q):
        if g.size == 1:
            return np.zeros(q.shape, int), np.zeros(q.shape)
        i = np.clip(np.searchsorted(g, q, side="right") - 1, 0, g.size - 2)
        return i, (q - g[i]) / (g[i + 1] - g[i])
    i, ta = locate(ga, a)
    j, tb = locate(gb, b)
    i1, j1 = np.minimum(i + 1, ga.size - 1), np.minimum(j + 1, gb.size - 1)
    return ((1 - ta) * (1 - tb) * v[i, j] + ta * (1 - tb) * v[i1, j] + (1 - ta) * tb * v[i, j1]
            + ta * tb * v[i1, j1])


def raw_predict(table, shapes):
    """The table's uncalibrated sum of units (ms) for ``pruning.policy_shapes`` output."""
    attn = interp2(table["attn"]["heads"], table["tokens"], table["attn"]["ms"], shapes["heads"], shapes["tokens"])
    red = interp2(table["reduce"]["heads"], table["tokens"], table["reduce"]["ms"], shapes["heads"],
                   shapes["tokens"])
    mlp = interp2(table["mlp"]["widths"], table["tokens"], table["mlp"]["ms"], shapes["neurons"],
                   shapes["mlp_tokens"])
    blocks = (np.where(shapes["reduces"], red, attn) + mlp).sum(axis=1)
    return table["stem_ms"] + blocks + _interp1(table["head"]["tokens"], table["head"]["ms"], shapes["out_tokens"])


def check_table(table, dims, where="latency table"):
    """Raise TableError unless ``table`` was measured for a model of ``dims``."""
    if not isinstance(table, dict) or table.get("version") != TABLE_VERSION:
        raise TableError(f"{where} is not a latency table of version {TABLE_VERSION}")
    arch = _arch(dims)
    for k in ARCH_KEYS:
        if table["arch"].get(k) != arch[k]:
            raise TableError(f"{where} was measured for another model: {k} {table['arch'].get(k)} vs this "
                             f"model's {arch[k]}")


def predict_ms(table, dims, X, round_to=1, rounding="exact"):
    """Predicted milliseconds per batch of the models that policies ``X`` ([n, 2L+1] or [2L+1])
    would give, on the device the table was measured on: vectorised like ``flops.policy_gmacs``
    (the feasible sampler and EI use it unchanged), non-increasing in every ratio but the token
    rate's first steps (a reduction that keeps all but one token only adds its own ops)."""
    X = np.asarray(X, dtype=np.float64)
    single = X.ndim == 1
    raw = raw_predict(table, pruning.policy_shapes(dims, X, round_to, rounding))
    cal = table["calibration"]
    out = cal["scale"] * raw + cal["offset"]
    return float(out[0]) if single else out


def _relative_errors(pred, measured):
    err = np.abs(np.asarray(pred) - np.asarray(measured)) / np.asarray(measured)
    return {"median": float(np.median(err)), "max": float(np.max(err))}


def _fit_calibration(raw, measured):
    """scale, offset minimising the relative squared error of scale * raw + offset against measured."""
    raw, measured = np.asarray(raw, np.float64), np.asarray(measured, np.float64)
    if raw.size < 2 or np.ptp(raw) <= 0:
        return float(np.sum(measured) / np.sum(raw)), 0.0
    A = np.stack([raw / measured, 1.0 / measured], axis=1)
    (scale, offset), *_ = np.linalg.lstsq(A, np.ones_like(measured), rcond=None)
    if scale <= 0:  # never let the calibration reverse the ordering
        return float(np.sum(measured) / np.sum(raw)), 0.0
    return float(scale), float(offset)


def random_policies(dims, n, seed=0, max_ratio=0.5, active=(True, True, True)):
    """``n`` policy vectors drawn uniformly from [0, max_ratio] in the active dimensions."""
    depth = int(dims["depth"])
    rng = np.random.default_rng(seed)
    X = rng.uniform(0.0, max_ratio, size=(int(n), 2 * depth + 1))
    X[:, ~np.repeat(np.asarray(active, bool), [depth, depth, 1])] = 0.0
    return X


def model_items(dense, policies, device, dtype, batch_size, round_to=1, fuse="mean", rounding="exact", seed=0):
    """(description, callable) running one whole batch of ``dense`` compressed by each policy vector
    (components chosen at random: speed does not depend on which)."""
    dims = pruning.model_dims(dense)
    rng = np.random.default_rng(seed)
    rankings = {"heads": [rng.permutation(h).tolist() for h in dims["num_heads"]],
                "neurons": [rng.permutation(m).tolist() for m in dims["mlp_hidden"]]}
    size = dims["img_size"] or [int(dims["patch_size"][0]) * 14] * 2
    images = torch.randn(batch_size, int(dims["in_chans"]), *size, generator=torch.Generator().manual_seed(seed))
    images = images.to(device, dtype)
    items = []
    for x in np.atleast_2d(policies):
        policy = pruning.policy_from_vector(x, dims["depth"])
        model = pruning.slice_model(dense, policy, rankings, round_to, fuse, rounding).to(device, dtype).eval()
        items.append(({"unit": "model", "policy": [float(v) for v in x]}, lambda m=model: m(images)))
    return items


@torch.no_grad()
def measure_models(models, device, batch_size, dtype=torch.float32, rounds=5):
    """Milliseconds per batch of each model (all of one input shape), measured interleaved in one run."""
    dims = pruning.model_dims(models[0])
    size = dims["img_size"] or [int(dims["patch_size"][0]) * 14] * 2
    images = torch.randn(int(batch_size), int(dims["in_chans"]), *size, generator=torch.Generator().manual_seed(0))
    images = images.to(device, dtype)
    runs = [copy.deepcopy(m).to(device, dtype).eval() for m in models]
    with torch.inference_mode():
        return default_timer(device, rounds=rounds)([({"unit": "model"}, lambda m=m: m(images)) for m in runs])


def speed_record(table, dims, dense, model, policy_x, device, round_to=1, rounding="exact", rounds=5):
    """Predicted and measured ms per batch of ``model`` (``dense`` compressed by policy vector
    ``policy_x``) beside the dense model's, and both speed-ups; measured only on the table's device
    type (else None), at the table's batch and dtype."""
    zero = np.zeros(2 * int(dims["depth"]) + 1)
    rec = {"predicted_ms": predict_ms(table, dims, policy_x, round_to, rounding),
           "dense_predicted_ms": predict_ms(table, dims, zero, round_to, rounding)}
    rec["predicted_speedup"] = rec["dense_predicted_ms"] / rec["predicted_ms"]
    rec.update(measured_ms=None, dense_measured_ms=None, measured_speedup=None)
    if torch.device(device).type == table["key"]["device"]:
        d_ms, m_ms = measure_models([dense, model], device, table["key"]["batch"],
                                    getattr(torch, table["key"]["dtype"]), rounds)
        rec.update(measured_ms=m_ms, dense_measured_ms=d_ms, measured_speedup=d_ms / m_ms)
    return rec


@torch.no_grad()
def measure_table(dense, device, batch_size, dtype=torch.float32, round_to=8, fuse="mean", token_points=10,
                  width_points=12, calibration_models=8, max_ratio=0.5, seed=0, timer=None, runtime="eager"):
    """Measure the latency table of ``dense`` (a dense timm ViT) on ``device`` at ``batch_size`` in
    ``dtype`` (module docstring). ``timer(items) -> [ms]`` defaults to ``default_timer(device)``;
    tests pass a deterministic one. Calibration: the dense model and ``calibration_models`` random
    policies (ratios up to ``max_ratio``) measured end to end."""
    if runtime not in RUNTIMES:
        raise TableError(f"latency tables are measured in the {' or '.join(RUNTIMES)} runtime, not {runtime!r}")
    check_measurable(dense)
    device = torch.device(device)
    unit_timer, model_timer = ((timer, timer) if timer
                               else (default_timer(device, rounds=3), default_timer(device, rounds=5)))
    dense = dense.eval()
    dims = pruning.model_dims(dense)
    if getattr(dense, "prune_spec", None) is not None:
        raise TableError("a latency table is measured on the dense model, this one is compressed")
    tokens = _token_grid(dims, token_points)
    heads = list(range(1, max(dims["num_heads"]) + 1))
    widths = _width_grid(max(dims["mlp_hidden"]), round_to, width_points)
    with torch.inference_mode():
        items = _unit_items(dense, dims, batch_size, device, dtype, tokens, heads, widths, fuse)
        ms = _timed(unit_timer, items, "latency table: units")
        unit = {(d["unit"], d.get("heads", d.get("neurons")), d.get("tokens")): t for (d, _), t in zip(items, ms)}
        del items
        table = {"version": TABLE_VERSION, "key": table_key(device, dtype, batch_size, runtime), "arch": _arch(dims),
                 "fuse": fuse, "tokens": tokens,
                 "attn": {"heads": heads,
                          "ms": _monotone([[unit["attn", h, n] for n in tokens] for h in heads]).tolist()},
                 "reduce": {"heads": heads,
                            "ms": _monotone([[unit["reduce", h, n] for n in tokens] for h in heads]).tolist()},
                 "mlp": {"widths": widths,
                         "ms": _monotone([[unit["mlp", w, n] for n in tokens] for w in widths]).tolist()},
                 "stem_ms": float(unit["stem", None, None]),
                 "head": {"tokens": tokens, "ms": _monotone([unit["head", None, n] for n in tokens]).tolist()},
                 "calibration": {"scale": 1.0, "offset": 0.0}}
        X = np.concatenate([np.zeros((1, 2 * dims["depth"] + 1)),
                            random_policies(dims, calibration_models, seed, max_ratio)])
        items = model_items(dense, X, device, dtype, batch_size, round_to, fuse, seed=seed)
        measured = _timed(model_timer, items, "latency table: calibration models")
        del items
    raw = raw_predict(table, pruning.policy_shapes(dims, X, round_to))
    scale, offset = _fit_calibration(raw, measured)
    table["calibration"] = {"scale": scale, "offset": offset, "round_to": int(round_to),
                            "points": [{"policy": [float(v) for v in x], "raw_ms": float(r), "measured_ms": float(m)}
                                       for x, r, m in zip(X, raw, measured)],
                            "error_before": _relative_errors(raw, measured),
                            "error_after": _relative_errors(scale * raw + offset, measured)}
    table["sha256"] = table_hash(table)
    return table


def _timed(timer, items, header):
    """The timer over ``items`` in chunks, with progress and an ETA in the log."""
    chunk = max(1, len(items) // 10)
    progress, out = Progress(len(items), header, every=chunk), []
    for start in range(0, len(items), chunk):
        out += list(timer(items[start:start + chunk]))
        progress.update(min(start + chunk, len(items)) - 1)
    return out


def table_hash(table):
    """sha256 of the table's canonical JSON, its own hash and its file (``load_table`` and
    ``obtain_table`` note where it lies) left out."""
    body = {k: v for k, v in table.items() if k not in ("sha256", "file")}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def table_identity(table):
    """What a search or finetuning records of the table it used: its hash and what it was measured on."""
    return {"sha256": table["sha256"], "measured_on": table["key"]}


def describe(table):
    key = table["key"]
    threads = f", {key['threads']} threads" if "threads" in key else ""
    return (f"{key['device_name']} ({key['device']}{threads}), {key['dtype']}, batch {key['batch']}, {key['runtime']}, "
            f"torch {key['torch']}")


def save_table(table, path):
    write_json_atomic(str(path), {k: v for k, v in table.items() if k != "file"})


def load_table(path):
    """A table from ``path``, its hash checked (TableError in one line otherwise)."""
    table = read_json_object(path, TableError)
    if table.get("version") != TABLE_VERSION or "sha256" not in table:
        raise TableError(f"{path} is not a latency table of this tool (version {TABLE_VERSION})")
    if table_hash(table) != table["sha256"]:
        raise TableError(f"latency table {path} was edited after it was measured (its sha256 does not match)")
    return dict(table, file=str(path))


def obtain_table(dense, path, device, batch_size, dtype=torch.float32, round_to=8, fuse="mean", expect_key=None, **kw):
    """The latency table at ``path`` when it exists and fits ``dense`` (and, given ``expect_key``, was
    measured on that setting: a cache); else measured now and written there. Returns (table, how:
    "loaded" or "measured")."""
    check_measurable(dense)
    dims = pruning.model_dims(dense)
    if path and os.path.exists(path):
        table = load_table(path)
        check_table(table, dims, path)
        if expect_key is None or table["key"] == expect_key:
            return table, "loaded"
        logger.info(f"{path} was measured on {describe(table)}: measuring anew for this setting")
    logger.info(f"measuring a latency table on {device} at batch {batch_size} ({str(dtype).replace('torch.', '')})")
    table = measure_table(dense, device, batch_size, dtype, round_to, fuse, **kw)
    if path:
        save_table(table, path)
        table["file"] = str(path)
    err = table["calibration"]["error_after"]
    dense_ms = predict_ms(table, dims, np.zeros(2 * dims["depth"] + 1), round_to)
    logger.info(f"latency table measured on {describe(table)}: dense {dense_ms:.4g} ms per batch; calibration error "
                f"median {100 * err['median']:.1f}%, worst {100 * err['max']:.1f}%"
                + (f"; written to {path}" if path else ""))
    return table, "measured"


# ----------------------------------------------------------------------------------------------
# command line: measure a table, and check its predictions on models it has not seen
# ----------------------------------------------------------------------------------------------

def validate(table, dense, policies, device, dtype, round_to=8, fuse="mean", rounds=7, rounding="exact"):
    """Predicted against measured ms of the dense model and each policy, measured interleaved.
    Returns {"rows": [{"policy", "predicted_ms", "measured_ms", "error"}], "median", "max"} (errors
    relative to the measurement, over the policies)."""
    dims = pruning.model_dims(dense)
    X = np.concatenate([np.zeros((1, 2 * dims["depth"] + 1)), np.atleast_2d(policies)])
    with torch.inference_mode():
        items = model_items(dense, X, device, dtype, table["key"]["batch"], round_to, fuse, rounding, seed=1)
        measured = default_timer(device, rounds=rounds)(items)
    predicted = predict_ms(table, dims, X, round_to, rounding)
    rows = [{"policy": [round(float(v), 4) for v in x], "predicted_ms": float(p), "measured_ms": float(m),
             "error": float((p - m) / m), "predicted_speedup": float(predicted[0] / p),
             "measured_speedup": float(measured[0] / m)} for x, p, m in zip(X, predicted, measured)]
    err = _relative_errors(predicted[1:], measured[1:])
    speedup = _relative_errors(predicted[0] / predicted[1:], measured[0] / np.asarray(measured[1:]))
    return {"rows": rows, **err, "speedup_error": speedup}


def _main(argv=None):
    import argparse
    import sys

    import expected_improvement as ei
    import models
    p = argparse.ArgumentParser(description="Measure the latency table of a dense ViT on this machine's device "
                                "(units of heads x tokens, widths x tokens, calibrated on whole models) and check it")
    p.add_argument("--model", default="deit_small_patch16_224", help="timm ViT name or preset of models.py")
    p.add_argument("--resume", default="", help="the dense model file (instead of --model)")
    p.add_argument("--input-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on CUDA, float32 elsewhere")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--fuse", default="mean", choices=pruning.FUSE_MODES)
    p.add_argument("--calibration-models", type=int, default=8)
    p.add_argument("--out", default="", help="write the table here (JSON); an existing file is loaded, not remeasured")
    p.add_argument("--validate", type=int, default=10, help="random policies on a speed-up budget to predict and "
                   "measure (0: none)")
    p.add_argument("--validate-speedup", type=float, default=1.6, help="their predicted speed-up (+-5%%)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    try:
        if args.resume:
            dense = models.load(args.resume, input_size=args.input_size)[0]
        else:
            dense = models.build_model(args.model, img_size=args.input_size)
        table, how = obtain_table(dense, args.out, device, args.batch_size, dtype, args.round_to, args.fuse,
                                  calibration_models=args.calibration_models, seed=args.seed)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dims = pruning.model_dims(dense)
    cal = table["calibration"]
    print(f"table {how}: {describe(table)}; calibration on {len(cal['points'])} models: error median "
          f"{100 * cal['error_before']['median']:.1f}% / worst {100 * cal['error_before']['max']:.1f}% before, "
          f"{100 * cal['error_after']['median']:.1f}% / {100 * cal['error_after']['max']:.1f}% after "
          f"(scale {cal['scale']:.3f}, offset {cal['offset']:.3g} ms)")
    if args.validate:
        dense_ms = predict_ms(table, dims, np.zeros(2 * dims["depth"] + 1), args.round_to)
        sampler = ei.FeasibleSampler(lambda X: predict_ms(table, dims, X, args.round_to),
                                     dense_ms / args.validate_speedup,
                                     2 * dims["depth"] + 1, upper=0.5, tol=0.05, unit="ms")
        X = sampler.sample(args.validate, np.random.default_rng(args.seed + 1))
        res = validate(table, dense, X, device, dtype, args.round_to, args.fuse)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"{'model':>9} {'predicted ms':>13} {'measured ms':>12} {'error':>7} {'speed-up: predicted':>20} "
              f"{'measured':>9}")
        for i, row in enumerate(res["rows"]):
            print(f"{'dense' if i == 0 else f'policy {i}':>9} {row['predicted_ms']:13.3f} {row['measured_ms']:12.3f} "
                  f"{100 * row['error']:+6.1f}% {row['predicted_speedup']:19.2f}x {row['measured_speedup']:8.2f}x")
        sp = res["speedup_error"]
        print(f"prediction error over {len(X)} policies: ms median {100 * res['median']:.1f}%, worst "
              f"{100 * res['max']:.1f}%; speed-up over dense (measured in the same run) median "
              f"{100 * sp['median']:.1f}%, worst {100 * sp['max']:.1f}% ({torch.get_num_threads()} threads, "
              f"1-min load average {load:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
