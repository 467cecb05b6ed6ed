"""Prune specs, policies, physical slicing of heads / MLP neurons, and token reduction.

Vocabulary
----------
policy
    ``{"head": [L floats], "neuron": [L floats], "token": r}``: the FRACTION REMOVED of the heads
    and of the MLP hidden neurons of every block, and one token-removal rate ``r``. As a vector
    (what the search works on) it is ``[head_0..head_{L-1}, neuron_0..neuron_{L-1}, r]``.
rankings
    ``{"heads": [[...] per block], "neurons": [[...] per block]}``: every block's component indices,
    LEAST important first (the dependency criterion produces them).
spec
    The JSON-serialisable description of a compressed model; indices refer to the DENSE model::

        {"version": 1, "depth": L,
         "heads":   [[kept head indices, ascending] per block],
         "neurons": [[kept MLP neuron indices, ascending] per block],
         "tokens":  {"blocks": [0-based block indices], "keep_rates": [...], "fuse": "mean"} or None,
         "arch":    {...dense shapes the spec was made for...}}        # optional, checked if present

    An empty index list drops that branch (only its output bias is left); ``policy_to_spec`` never
    makes one, since every ratio lies in [0, 1) and at least one component is always kept.

Rounding (shared by ``policy_to_spec`` and ``flops.policy_gmacs`` so the two agree exactly)
--------------------------------------------------------------------------------------------
``kept_count(total, ratio, round_to)``::

    removed = floor(ratio * total + 0.5)                 # round half up
    kept    = total - removed
    kept    = floor((kept + round_to // 2) / round_to) * round_to   # nearest multiple of round_to
    kept    = clip(kept, max(1, min(round_to, total)), total)

``round_to`` applies to MLP neurons only (``--round-to``); heads always use 1.

``rounding="original"`` follows the original implementation (Hou & Kung 2022) instead:
``kept = floor(total * (1 - ratio))`` (so any ratio > 0 removes at least one head), then the same
``round_to`` and clipping; its token counts are ``original_kept_tokens``. A model made this way
has the head, neuron and token counts the original's model had for the same policy.

Token reduction (EViT-style)
----------------------------
The spec names reducing blocks (``token_schedule(depth)``: about 1/3, 7/12 and 5/6 of the depth;
[3, 6, 9] for 12 blocks) with keep rates ``(1-r), (1-r)^2, (1-r)^3`` relative to the dense number of
patch tokens ``Np``. The kept count at a block is ``kept_tokens(Np, rate) = clip(floor(rate*Np +
0.5), 1, Np)``. Inside a reducing block, after the attention branch ``x = x + ls1(attn(norm1(x)))``:

* the prefix tokens (class, distillation, registers) are always kept, in place;
* every other token present (patch tokens, and the fused token of an earlier reduction) is
  scored by the class token's attention probability in that block, averaged over heads;
* if ``k`` (the kept count) is smaller than the number of such tokens ``n``, the ``k`` highest scored
  are kept (in their previous order) and the other ``n - k`` are fused into ONE token appended at
  the end: their mean (``fuse="mean"``) or their average weighted by the class-token attention
  (``fuse="weighted"``). The block's MLP then runs on ``prefix + k + 1`` tokens. Otherwise
  (``k >= n``) the block is an ordinary block: nothing is computed or changed.

The class-token attention row is computed from the class token's query only,
``softmax(q_cls K^T * scale)``, so the main attention keeps using the fused
``scaled_dot_product_attention`` kernel and no N x N matrix is materialised.
"""
import copy
import inspect
import json
import os
import types

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Attention, Block

SPEC_VERSION = 1
FUSE_MODES = ("mean", "weighted")
ROUNDINGS = ("exact", "original")
# a third, a half-plus and five-sixths of the depth, as twelfths (blocks 4, 7, 10 of 12, 1-based)
_SCHEDULE_TWELFTHS = (4, 7, 10)


class SpecError(ValueError):
    """A prune spec or policy that does not fit the model (one-line message)."""


# --------------------------------------------------------------------------------------------
# model shapes
# --------------------------------------------------------------------------------------------

def vit_blocks(model):
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise SpecError(f"{type(model).__name__} has no .blocks: not a timm VisionTransformer")
    out = list(blocks)
    for i, blk in enumerate(out):
        if not isinstance(blk, Block):
            raise SpecError(f"block {i} is a {type(blk).__name__}, only timm vision_transformer.Block is supported")
        if not isinstance(blk.attn, Attention):
            raise SpecError(f"block {i} attention is a {type(blk.attn).__name__}, only timm Attention is supported")
        if not isinstance(blk.mlp, Mlp):
            raise SpecError(f"block {i} MLP is a {type(blk.mlp).__name__}, only timm layers.Mlp is supported")
        if not isinstance(blk.mlp.fc1, nn.Linear):
            raise SpecError(f"block {i} MLP uses convolutions, only nn.Linear MLPs are supported")
    if not out:
        raise SpecError("model has no transformer blocks")
    return out


def classifier_heads(model):
    heads = [getattr(model, "head", None), getattr(model, "head_dist", None)]
    return [h for h in heads if isinstance(h, nn.Linear)]


def model_dims(model):
    """Shapes of a (dense or compressed) timm ViT, read from its live modules.

    Returns a plain dict: depth, embed_dim, head_dim, num_heads [per block], mlp_hidden [per
    block], num_prefix_tokens, num_patches, num_classes, qkv_bias, in_chans, patch_size [h, w],
    img_size [h, w], num_classifier_heads (1, or 2 for distilled DeiT), global_pool, attn_gate,
    has_class_token, and token_reduction (the live schedule: [[block, kept], ...], or None).
    """
    blocks = vit_blocks(model)
    attn0 = blocks[0].attn
    pe = model.patch_embed
    proj = pe.proj
    patch_size = list(proj.kernel_size) if isinstance(proj, nn.Conv2d) else list(pe.patch_size)
    in_chans = proj.in_channels if isinstance(proj, nn.Conv2d) else 3
    grid = getattr(pe, "grid_size", None)
    img_size = getattr(pe, "img_size", None)
    reducing = [[i, int(b.token_keep)] for i, b in enumerate(blocks) if isinstance(b, TokenReducingBlock)]
    return {
        "depth": len(blocks),
        "embed_dim": int(attn0.qkv.in_features),
        "head_dim": int(attn0.head_dim),
        "num_heads": [int(b.attn.num_heads) for b in blocks],
        "mlp_hidden": [int(b.mlp.fc1.out_features) for b in blocks],
        "num_prefix_tokens": int(getattr(model, "num_prefix_tokens", 1)),
        "num_patches": int(pe.num_patches) if grid is None else int(grid[0] * grid[1]),
        "num_classes": int(getattr(model, "num_classes", 0)),
        "qkv_bias": attn0.qkv.bias is not None,
        "in_chans": int(in_chans),
        "patch_size": [int(p) for p in patch_size],
        "img_size": None if img_size is None else [int(s) for s in img_size],
        "num_classifier_heads": len(classifier_heads(model)),
        "global_pool": getattr(model, "global_pool", "token"),
        "attn_gate": getattr(attn0, "gate", None) is not None,
        "has_class_token": getattr(model, "cls_token", None) is not None,
        "token_reduction": reducing or None,
    }


def misaligned_widths(model, multiple=8):
    """(block, width) for every block whose MLP hidden width is not a multiple of ``multiple``
    (GPU matrix units run such shapes slower); an empty list when all are aligned."""
    return [(i, w) for i, w in enumerate(model_dims(model)["mlp_hidden"]) if w % int(multiple)]


# --------------------------------------------------------------------------------------------
# rounding rules and the token schedule
# --------------------------------------------------------------------------------------------

def token_schedule(depth):
    """0-based indices of the token-reducing blocks: [3, 6, 9] for depth 12.

    1-based block b_j = round_half_up(depth * t_j / 12) for t = 4, 7, 10 (a third, a half-plus,
    five-sixths), clipped to [1, depth]; duplicates (tiny depths) are dropped.
    """
    depth = int(depth)
    if depth < 1:
        raise SpecError(f"depth must be >= 1, got {depth}")
    out = []
    for t in _SCHEDULE_TWELFTHS:
        b = min(max((depth * t + 6) // 12, 1), depth) - 1
        if b not in out:
            out.append(b)
    return out


def check_ratio(ratio, what="removal ratio"):
    r = np.asarray(ratio, dtype=np.float64)
    bad = ~((r >= 0.0) & (r < 1.0))
    if bad.any():
        raise SpecError(f"{what} {r[bad].flat[0]!r} is outside [0, 1)")
    return r


def _check_rounding(rounding):
    if rounding not in ROUNDINGS:
        raise SpecError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")


def kept_count(total, remove_ratio, round_to=1, rounding="exact"):
    """Number of units kept when a fraction ``remove_ratio`` of ``total`` is removed.

    rounding="exact": removed = floor(ratio*total + 0.5); kept = total - removed.
    rounding="original": kept = floor(total * (1 - ratio)) (the original's int(H * (1 - ratio))).
    Then kept is rounded to the nearest multiple of ``round_to`` (halves up) and clipped to
    [max(1, min(round_to, total)), total].
    Works elementwise on numpy arrays (returns an int64 array) and on scalars (returns int).
    """
    round_to = int(round_to)
    if round_to < 1:
        raise SpecError(f"round_to must be >= 1, got {round_to}")
    _check_rounding(rounding)
    scalar = np.ndim(total) == 0 and np.ndim(remove_ratio) == 0
    r = check_ratio(remove_ratio)
    tot = np.asarray(total, dtype=np.int64)
    if rounding == "original":
        kept = np.floor(tot * (1.0 - r)).astype(np.int64)
    else:
        kept = tot - np.floor(r * tot + 0.5).astype(np.int64)
    if round_to > 1:
        kept = (kept + round_to // 2) // round_to * round_to
    low = np.maximum(1, np.minimum(round_to, tot))
    kept = np.minimum(np.maximum(kept, low), tot)
    return int(kept) if scalar else kept


def token_keep_rates(r, n_blocks=3):
    """Keep rates (1-r), (1-r)^2, ... relative to the dense patch count, by repeated products
    (identical in Python floats and numpy float64). Scalar r -> list of floats; array -> list of arrays."""
    base = 1.0 - np.asarray(r, dtype=np.float64)
    rates, cur = [], None
    for _ in range(n_blocks):
        cur = base if cur is None else cur * base
        rates.append(cur)
    if np.ndim(r) == 0:
        return [float(x) for x in rates]
    return rates


def kept_tokens(num_patches, keep_rate):
    """Kept patch tokens at a reducing block: clip(floor(keep_rate*num_patches + 0.5), 1, num_patches).
    Elementwise on arrays (int64) or scalars (int)."""
    rate = np.asarray(keep_rate, dtype=np.float64)
    n = np.asarray(num_patches, dtype=np.int64)
    k = np.minimum(np.maximum(np.floor(rate * n + 0.5).astype(np.int64), 1), n)
    return int(k) if k.ndim == 0 else k


def original_kept_tokens(num_patches, num_prefix, rate, n_blocks=3):
    """Kept non-prefix tokens at each of ``n_blocks`` reducing blocks as the original's model
    counted them: a block that receives n tokens (prefix and any fused token included) keeps
    K = floor(n * (1 - rate)) of them, the prefix first, and appends one fused token, so the next
    block receives K + 1. Returned as non-prefix counts k = K - prefix, clipped to [1, n - prefix]
    (k = n - prefix: that block reduces nothing). Scalar rate -> list of ints; array -> list of
    int64 arrays."""
    r = check_ratio(rate, "token rate")
    prefix = int(num_prefix)
    n = np.full(r.shape, prefix + int(num_patches), dtype=np.int64)
    out = []
    for _ in range(int(n_blocks)):
        k = np.clip(np.floor(n * (1.0 - r)).astype(np.int64) - prefix, 1, n - prefix)
        out.append(k)
        n = np.where(k < n - prefix, prefix + k + 1, n)
    if np.ndim(rate) == 0:
        return [int(k) for k in out]
    return out


def tokens_after_reduction(n_tokens, num_prefix, keep):
    """Token count after a reducing block that sees ``n_tokens`` (prefix included) and keeps
    ``keep`` non-prefix tokens: prefix + keep + 1 fused if keep < n_tokens - prefix, else unchanged.
    Returns (count, active). Elementwise on arrays."""
    rest = np.asarray(n_tokens) - num_prefix
    active = np.asarray(keep) < rest
    out = np.where(active, num_prefix + np.asarray(keep) + 1, np.asarray(n_tokens))
    if out.ndim == 0:
        return int(out), bool(active)
    return out, active


def policy_shapes(dims, X, round_to=1, rounding="exact"):
    """Per-block shapes of the models that policies ``X`` ([n, 2L+1]) would give, without building them.

    ``dims`` are the dense model's ``model_dims``; counts are rounded as ``policy_to_spec`` rounds
    them. Returns int64 arrays: ``heads`` and ``neurons`` [n, L] (kept per block), ``tokens`` [n, L]
    (tokens each block receives, prefix included), ``reduces`` [n, L] (bool: the block drops tokens),
    ``mlp_tokens`` [n, L] (tokens its MLP runs on) and ``out_tokens`` [n] (tokens after the last block).
    """
    _check_rounding(rounding)
    X = np.atleast_2d(np.asarray(X, dtype=np.float64))
    depth = int(dims["depth"])
    if X.ndim != 2 or X.shape[1] != 2 * depth + 1:
        raise SpecError(f"policy vectors must have 2*{depth}+1 = {2 * depth + 1} entries, got shape {X.shape}")
    heads = kept_count(np.asarray(dims["num_heads"], np.int64)[None, :], X[:, :depth], rounding=rounding)
    neurons = kept_count(np.asarray(dims["mlp_hidden"], np.int64)[None, :], X[:, depth:2 * depth], round_to, rounding)
    rate = check_ratio(X[:, 2 * depth], "token rate")
    num_prefix, num_patches = int(dims["num_prefix_tokens"]), int(dims["num_patches"])
    schedule = token_schedule(depth)
    if rounding == "original":
        kept = original_kept_tokens(num_patches, num_prefix, rate, len(schedule))
    else:
        kept = [kept_tokens(num_patches, kr) for kr in token_keep_rates(rate, len(schedule))]
    keep = dict(zip(schedule, kept))
    tokens, mlp_tokens = np.zeros(heads.shape, np.int64), np.zeros(heads.shape, np.int64)
    reduces = np.zeros(heads.shape, bool)
    n_tok = np.full(X.shape[0], num_prefix + num_patches, dtype=np.int64)
    for b in range(depth):
        tokens[:, b] = n_tok
        if b in keep:
            n_out, active = tokens_after_reduction(n_tok, num_prefix, keep[b])
            n_tok, reduces[:, b] = np.asarray(n_out, np.int64), active
        mlp_tokens[:, b] = n_tok
    return {"heads": np.asarray(heads, np.int64), "neurons": np.asarray(neurons, np.int64), "tokens": tokens,
            "reduces": reduces, "mlp_tokens": mlp_tokens, "out_tokens": n_tok}


# --------------------------------------------------------------------------------------------
# policies
# --------------------------------------------------------------------------------------------

def uniform_policy(depth, head=0.0, neuron=0.0, token=0.0):
    policy = {"head": [float(head)] * int(depth), "neuron": [float(neuron)] * int(depth), "token": float(token)}
    validate_policy(policy, depth)
    return policy


def validate_policy(policy, depth):
    """Raise SpecError unless ``policy`` is a well-formed policy for a ``depth``-block model."""
    if not isinstance(policy, dict):
        raise SpecError(f"policy must be a dict, got {type(policy).__name__}")
    missing = [k for k in ("head", "neuron", "token") if k not in policy]
    if missing:
        raise SpecError(f"policy is missing keys: {', '.join(missing)}")
    for key in ("head", "neuron"):
        vals = policy[key]
        if np.ndim(vals) != 1 or len(vals) != depth:
            raise SpecError(f"policy '{key}' has {np.size(vals)} entries, the model has {depth} blocks")
        for i, v in enumerate(vals):
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise SpecError(f"policy '{key}' ratio {v!r} in block {i} is not a number")
            if not (0.0 <= float(v) < 1.0):
                raise SpecError(f"policy '{key}' ratio {float(v)!r} in block {i} is outside [0, 1)")
    tok = policy["token"]
    if isinstance(tok, bool) or not isinstance(tok, (int, float, np.integer, np.floating)) or not 0.0 <= tok < 1.0:
        raise SpecError(f"policy token rate {policy['token']!r} is outside [0, 1)")


def policy_to_vector(policy):
    """[head_0..head_{L-1}, neuron_0..neuron_{L-1}, r] as a float64 array."""
    depth = len(policy["head"])
    validate_policy(policy, depth)
    return np.concatenate([np.asarray(policy["head"], np.float64), np.asarray(policy["neuron"], np.float64),
                           np.asarray([policy["token"]], np.float64)])


def policy_from_vector(x, depth):
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    depth = int(depth)
    if x.size != 2 * depth + 1:
        raise SpecError(f"policy vector has {x.size} entries, expected 2*{depth}+1 = {2 * depth + 1}")
    policy = {"head": [float(v) for v in x[:depth]], "neuron": [float(v) for v in x[depth:2 * depth]],
              "token": float(x[2 * depth])}
    validate_policy(policy, depth)
    return policy


def policy_from_original_vector(x, depth):
    """A policy from the original implementation's vector order [neuron_0..neuron_{L-1},
    head_0..head_{L-1}, r] (its search slices ratio[:L] for neurons, ratio[L:2L] for heads)."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    depth = int(depth)
    if x.size != 2 * depth + 1:
        raise SpecError(f"policy vector has {x.size} entries, expected 2*{depth}+1 = {2 * depth + 1}")
    return policy_from_vector(np.concatenate([x[depth:2 * depth], x[:depth], x[2 * depth:]]), depth)


def policy_to_original_vector(policy):
    """The original implementation's vector order [neuron..., head..., r] as a float64 array."""
    x = policy_to_vector(policy)
    depth = len(policy["head"])
    return np.concatenate([x[depth:2 * depth], x[:depth], x[2 * depth:]])


# --------------------------------------------------------------------------------------------
# published policies and the paper's finetuning recipe
# --------------------------------------------------------------------------------------------

POLICY_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "policies")


def _published():
    """{name: entry} from every policies/*.json (each file: {"source", "policies": {name: entry}})."""
    out = {}
    for fname in sorted(os.listdir(POLICY_DIR)) if os.path.isdir(POLICY_DIR) else []:
        if not fname.endswith(".json"):
            continue
        with open(os.path.join(POLICY_DIR, fname)) as f:
            data = json.load(f)
        for name, entry in data.get("policies", {}).items():
            out[name] = dict(entry, source=data.get("source", fname), file=fname)
    return out


def published_policy_names():
    """Short names of the policies shipped in policies/ (e.g. hou2022-deit-s, hou2022-deit-b)."""
    return sorted(_published())


def published_policy_info(name):
    """Everything recorded about a published policy: model, label, rounding and flops_convention
    it was searched under, search_acc1, source, file, and policy. Unknown name: SpecError naming
    the known ones."""
    table = _published()
    if name not in table:
        raise SpecError(f"unknown published policy {name!r}; known: {', '.join(sorted(table)) or 'none'}")
    entry = copy.deepcopy(table[name])
    validate_policy(entry["policy"], len(entry["policy"]["head"]))
    return entry


def published_policy(name):
    """The published policy ``name`` as a policy dict {"head", "neuron", "token"} (a new copy).
    It was made for ``published_policy_info(name)["model"]`` under the original's rounding:
    build it with ``policy_to_spec(..., rounding="original")`` to get the original's model."""
    return published_policy_info(name)["policy"]


def load_policy(source):
    """(policy, description) from a published policy name or a JSON file holding a policy, or a
    dict with a "policy" entry (as search/best_policy.json). SpecError (one line) otherwise."""
    source = str(source)
    if os.path.isfile(source):
        try:
            with open(source) as f:
                loaded = json.load(f)
        except (OSError, ValueError) as exc:
            raise SpecError(f"cannot read policy {source}: {exc}") from exc
        policy = loaded.get("policy", loaded) if isinstance(loaded, dict) else loaded
        if not isinstance(policy, dict) or "head" not in policy:
            raise SpecError(f"{source} holds no policy (expected keys head, neuron, token)")
        validate_policy(policy, len(policy["head"]))
        return policy, source
    names = published_policy_names()
    if source in names:
        return published_policy(source), source
    raise SpecError(f"no policy file or published policy named {source!r}; published: {', '.join(names)}")


def resolve_policy(depth, sparsities=(None, None, None), policy="", default_path="", active=(True, True, True)):
    """(policy, source, rankings or None) for prune+finetune: uniform ratios when any of the
    (head, neuron, token) ``sparsities`` is given and no ``policy``; else the policy file
    ``policy`` or ``default_path`` (a search's best_policy.json, whose rankings come along); else
    a published policy named ``policy``. Dimensions whose ``active`` flag is off are zeroed.
    SpecError (one line) when there is none or it does not fit a model of ``depth`` blocks."""
    path = policy or default_path
    rankings = None
    if any(v is not None for v in sparsities) and not policy:
        found, source = uniform_policy(depth, *(v or 0.0 for v in sparsities)), "uniform ratios"
    elif path and os.path.exists(path):
        (found, rankings, _), source = read_policy_file(path), path
    elif policy:  # a published policy by name (or a one-line error listing the names)
        found, source = load_policy(policy)
    else:
        raise SpecError(f"no pruning policy{f' ({path} does not exist)' if path else ''}: run --search first, pass "
                        f"--policy FILE, or give --head_sparsity/--neuron_sparsity/--token_sparsity")
    try:
        validate_policy(found, depth)
    except SpecError as e:
        raise SpecError(f"policy from {source}: {e}") from e
    dropped = [name for name, on, values in zip(("head", "neuron", "token"), active,
                                                 (found["head"], found["neuron"], [found["token"]]))
               if not on and any(float(v) for v in values)]
    if dropped:  # e.g. --head_pruning alone with a policy searched over all three dimensions
        source += f" without its {' and '.join(dropped)} ratios (only the dimensions of the --*_pruning flags given)"
    return ({"head": [float(v) * active[0] for v in found["head"]],
             "neuron": [float(v) * active[1] for v in found["neuron"]], "token": float(found["token"]) * active[2]},
            source, rankings)

def paper_finetune_recipe():
    """The original implementation's prune + finetune settings (a new dict each call), keyed by
    main.py's argument names. Its prune_finetune step simply continued with its training defaults
    (DeiT's recipe): 300 epochs, AdamW, base lr 5e-4 scaled by global batch / 512 (8 GPUs x 128 =
    1e-3), cosine schedule stepped per epoch with 5 warm-up epochs from 1e-6 down to 1e-5, weight
    decay 0.05, RandAugment, random erasing, mixup / cutmix, label smoothing, repeated
    augmentation, drop-path 0.1, model EMA (kept, never evaluated), mixed precision, NO
    distillation (its distillation-for-finetuning code is commented out), training mode on.
    Its cooldown_epochs of 10 only lengthen the scheduler's nominal length; the loop ran 300
    epochs. It evaluated on ImageNet val after every epoch and printed the best so far."""
    return {
        "finetune_epochs": 300, "finetune_lr": 5e-4, "unscale_lr": False, "opt": "adamw", "opt_eps": 1e-8,
        "opt_betas": None, "weight_decay": 0.05, "clip_grad": None, "sched": "cosine", "warmup_epochs": 5,
        "warmup_lr": 1e-6, "min_lr": 1e-5, "cooldown_epochs": 10, "smoothing": 0.1, "mixup": 0.8,
        "cutmix": 1.0, "cutmix_minmax": None, "mixup_prob": 1.0, "mixup_switch_prob": 0.5,
        "mixup_mode": "batch", "aa": "rand-m9-mstd0.5-inc1", "color_jitter": 0.4,
        "train_interpolation": "bicubic", "reprob": 0.25, "remode": "pixel", "recount": 1,
        "repeated_aug": True, "drop": 0.0, "drop_path": 0.1, "model_ema": True, "model_ema_decay": 0.99996,
        "distillation_type": "none", "amp": True,
    }


# --------------------------------------------------------------------------------------------
# specs
# --------------------------------------------------------------------------------------------

def _arch(dims):
    return {k: copy.deepcopy(dims[k]) for k in
            ("embed_dim", "head_dim", "num_heads", "mlp_hidden", "num_prefix_tokens", "num_patches")}


def full_spec(model):
    """A spec that keeps every head and neuron of ``model`` and reduces no tokens."""
    dims = model_dims(model)
    return {"version": SPEC_VERSION, "depth": dims["depth"],
            "heads": [list(range(h)) for h in dims["num_heads"]],
            "neurons": [list(range(m)) for m in dims["mlp_hidden"]],
            "tokens": None, "arch": _arch(dims)}


def _check_ranking(rank, total, what, block):
    rank = [int(i) for i in rank]
    if sorted(rank) != list(range(total)):
        raise SpecError(f"{what} ranking of block {block} is not a permutation of 0..{total - 1}")
    return rank


def policy_to_spec(policy, rankings, dims, round_to=1, fuse="mean", rounding="exact"):
    """Spec of the policy: in each block remove the first-ranked (least important) heads / neurons.

    ``dims`` are the DENSE model's ``model_dims``; ``round_to`` applies to neuron counts.
    A token rate of 0 gives ``tokens: None``. ``rounding`` (see ``kept_count``): "exact" rounds
    counts to the nearest; "original" gives the original's model for the policy (its head and
    neuron counts, and its token counts ``original_kept_tokens``, stored as keep rates k / Np).
    """
    depth = int(dims["depth"])
    validate_policy(policy, depth)
    _check_rounding(rounding)
    if fuse not in FUSE_MODES:
        raise SpecError(f"fuse must be one of {FUSE_MODES}, got {fuse!r}")
    for key in ("heads", "neurons"):
        if key not in rankings:
            raise SpecError(f"rankings are missing key '{key}'")
        if len(rankings[key]) != depth:
            raise SpecError(f"rankings '{key}' cover {len(rankings[key])} blocks, the model has {depth}")
    heads, neurons = [], []
    for b in range(depth):
        h_tot, m_tot = int(dims["num_heads"][b]), int(dims["mlp_hidden"][b])
        h_rank = _check_ranking(rankings["heads"][b], h_tot, "head", b)
        m_rank = _check_ranking(rankings["neurons"][b], m_tot, "neuron", b)
        h_keep = kept_count(h_tot, policy["head"][b], rounding=rounding)
        m_keep = kept_count(m_tot, policy["neuron"][b], round_to, rounding)
        heads.append(sorted(h_rank[h_tot - h_keep:]))
        neurons.append(sorted(m_rank[m_tot - m_keep:]))
    r = float(policy["token"])
    tokens = None
    if r > 0.0:
        blocks = token_schedule(depth)
        if rounding == "original":
            n_p = int(dims["num_patches"])
            rates = [k / n_p for k in original_kept_tokens(n_p, dims["num_prefix_tokens"], r, len(blocks))]
        else:
            rates = token_keep_rates(r, len(blocks))
        tokens = {"blocks": blocks, "keep_rates": rates, "fuse": fuse}
    spec = {"version": SPEC_VERSION, "depth": depth, "heads": heads, "neurons": neurons, "tokens": tokens,
            "arch": _arch(dims), "policy": {"head": [float(v) for v in policy["head"]],
                                            "neuron": [float(v) for v in policy["neuron"]],
                                            "token": r, "round_to": int(round_to), "rounding": rounding}}
    return spec


def slice_model(dense, policy, rankings, round_to=1, fuse="mean", rounding="exact"):
    """A physically compressed COPY of the dense model: ``policy`` applied with ``rankings``
    (least important first). The dense model is left as it was; the copy's ``prune_spec`` holds
    the spec (see ``policy_to_spec``)."""
    spec = policy_to_spec(policy, rankings, model_dims(dense), round_to=round_to, fuse=fuse, rounding=rounding)
    return apply_spec(copy.deepcopy(dense), spec)


def read_policy_file(path):
    """(policy, rankings or None, contents) from a policy JSON: a search's ``best_policy.json``
    (which carries the rankings its policies were scored with) or a bare policy dict."""
    try:
        with open(path) as f:
            loaded = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SpecError(f"cannot read policy {path}: {e}") from e
    if not isinstance(loaded, dict):
        raise SpecError(f"policy {path} must hold a JSON object, found {type(loaded).__name__}")
    policy = loaded.get("policy", loaded)
    rankings = loaded.get("rankings")
    if rankings is not None and not (isinstance(rankings, dict) and "heads" in rankings and "neurons" in rankings):
        raise SpecError(f"policy {path} has a malformed 'rankings' entry")
    return policy, rankings, loaded


def _check_indices(idx, total, what, block):
    if not isinstance(idx, (list, tuple)):
        raise SpecError(f"{what} indices of block {block} must be a list, got {type(idx).__name__}")
    for i in idx:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise SpecError(f"{what} index {i!r} in block {block} is not an integer")
        if not 0 <= i < total:
            raise SpecError(f"{what} index {int(i)} out of range in block {block} (the model has {total})")
    if len(set(int(i) for i in idx)) != len(idx):
        raise SpecError(f"duplicate {what} indices in block {block}")


def validate_spec(spec, dims):
    """Raise SpecError unless ``spec`` fits the dense model described by ``dims``."""
    if not isinstance(spec, dict):
        raise SpecError(f"spec must be a dict, got {type(spec).__name__}")
    missing = [k for k in ("version", "depth", "heads", "neurons") if k not in spec]
    if missing:
        raise SpecError(f"spec is missing keys: {', '.join(missing)}")
    if spec["version"] != SPEC_VERSION:
        raise SpecError(f"spec version {spec['version']!r} is not supported (expected {SPEC_VERSION})")
    depth = int(dims["depth"])
    if spec["depth"] != depth:
        raise SpecError(f"spec is for a {spec['depth']}-block model, this model has {depth} blocks")
    arch = spec.get("arch")
    if arch is not None:
        for key, val in arch.items():
            if key in dims and dims[key] != val:
                raise SpecError(f"spec is for another architecture: {key} {val} vs this model's {dims[key]}")
    for key, what, totals in (("heads", "head", dims["num_heads"]), ("neurons", "neuron", dims["mlp_hidden"])):
        lists = spec[key]
        if not isinstance(lists, (list, tuple)) or len(lists) != depth:
            n = len(lists) if isinstance(lists, (list, tuple)) else type(lists).__name__
            raise SpecError(f"spec '{key}' has {n} blocks, this model has {depth} blocks")
        for b, idx in enumerate(lists):
            _check_indices(idx, int(totals[b]), what, b)
    tokens = spec.get("tokens")
    if tokens is None:
        return
    if not isinstance(tokens, dict):
        raise SpecError(f"spec 'tokens' must be a dict or null, got {type(tokens).__name__}")
    missing = [k for k in ("blocks", "keep_rates") if k not in tokens]
    if missing:
        raise SpecError(f"spec 'tokens' is missing keys: {', '.join(missing)}")
    blocks, rates = tokens["blocks"], tokens["keep_rates"]
    if not isinstance(blocks, (list, tuple)) or not isinstance(rates, (list, tuple)):
        raise SpecError("spec tokens 'blocks' and 'keep_rates' must be lists")
    if len(blocks) != len(rates):
        raise SpecError(f"spec tokens has {len(blocks)} blocks but {len(rates)} keep rates")
    for b in blocks:
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 0 <= b < depth:
            raise SpecError(f"token-reducing block {b!r} out of range (the model has {depth} blocks)")
    if list(blocks) != sorted(set(blocks)):
        raise SpecError(f"token-reducing blocks {list(blocks)} must be distinct and increasing")
    for rate in rates:
        if isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer, np.floating)) or not 0.0 < rate <= 1.0:
            raise SpecError(f"token keep rate {rate!r} is outside (0, 1]")
    fuse = tokens.get("fuse", "mean")
    if fuse not in FUSE_MODES:
        raise SpecError(f"token fuse must be one of {FUSE_MODES}, got {fuse!r}")
    if blocks and not dims.get("has_class_token", True):
        raise SpecError("token reduction needs a class token, this model has none")


# --------------------------------------------------------------------------------------------
# physical slicing
# --------------------------------------------------------------------------------------------

def _new_param(old, data):
    return nn.Parameter(data.contiguous().clone(), requires_grad=old.requires_grad)


def _slice_linear_out(lin, rows):
    lin.weight = _new_param(lin.weight, lin.weight.detach().index_select(0, rows))
    if lin.bias is not None:
        lin.bias = _new_param(lin.bias, lin.bias.detach().index_select(0, rows))
    lin.out_features = int(rows.numel())


def _slice_linear_in(lin, cols):
    lin.weight = _new_param(lin.weight, lin.weight.detach().index_select(1, cols))
    lin.in_features = int(cols.numel())


def _keep_heads(attn, heads, block):
    """Keep only ``heads`` (ascending indices) of a timm Attention: qkv rows of the q, k and v parts,
    gate rows, proj columns, and num_heads / attn_dim, all at once."""
    n_heads, hd = attn.num_heads, attn.head_dim
    if list(heads) == list(range(n_heads)):
        return
    if not isinstance(attn.norm, nn.Identity):
        raise SpecError(f"block {block}: pruning heads of an attention with scale_norm is not supported")
    dev = attn.qkv.weight.device
    chan = (torch.as_tensor(heads, dtype=torch.long, device=dev)[:, None] * hd
            + torch.arange(hd, device=dev)[None, :]).reshape(-1)          # kept channels of one part
    attn_dim = n_heads * hd
    rows = torch.cat([chan + part * attn_dim for part in range(3)])          # q, k, v parts
    _slice_linear_out(attn.qkv, rows)
    if getattr(attn, "gate", None) is not None:
        _slice_linear_out(attn.gate, chan)
    _slice_linear_in(attn.proj, chan)
    attn.num_heads = len(heads)
    attn.attn_dim = len(heads) * hd


def _keep_neurons(mlp, neurons, block):
    """Keep only ``neurons`` of a timm Mlp: fc1 rows and fc2 columns."""
    if list(neurons) == list(range(mlp.fc1.out_features)):
        return
    if not isinstance(mlp.norm, nn.Identity):
        raise SpecError(f"block {block}: pruning neurons of an MLP with a hidden norm is not supported")
    idx = torch.as_tensor(neurons, dtype=torch.long, device=mlp.fc1.weight.device)
    _slice_linear_out(mlp.fc1, idx)
    _slice_linear_in(mlp.fc2, idx)


def slice_block(blk, heads, neurons):
    """A sliced COPY of one dense block keeping its first ``heads`` heads and ``neurons`` MLP neurons
    (counts; which ones does not matter for its shapes): a unit whose cost the latency table measures."""
    blk = copy.deepcopy(blk)
    with torch.no_grad():
        _keep_heads(blk.attn, list(range(int(heads))), 0)
        _keep_neurons(blk.mlp, list(range(int(neurons))), 0)
    return blk


def _canonical(spec):
    out = copy.deepcopy(spec)
    out["heads"] = [sorted(int(i) for i in h) for h in spec["heads"]]
    out["neurons"] = [sorted(int(i) for i in n) for n in spec["neurons"]]
    tokens = spec.get("tokens")
    if tokens is not None:
        out["tokens"] = dict(tokens, blocks=[int(b) for b in tokens["blocks"]],
                             keep_rates=[float(r) for r in tokens["keep_rates"]],
                             fuse=tokens.get("fuse", "mean"))
    else:
        out["tokens"] = None
    return out


def apply_spec(model, spec):
    """Compress ``model`` (a DENSE timm ViT) in place to ``spec`` and return it.

    Heads and neurons are sliced physically (smaller Linear layers); reducing blocks are switched
    to ``TokenReducingBlock`` (a subclass of timm's Block, by a per-instance class swap) whose kept
    token counts are fixed here from the model's patch count (``kept_tokens``); such a model's
    ``forward_intermediates`` gives tokens (output_fmt="NLC") and refuses NCHW maps
    (``_guard_intermediates``). Every check runs
    before the first change, so a refused spec leaves the model untouched. The canonical spec
    (sorted indices) is stored as ``model.prune_spec``; the state dict keys stay those of timm.
    """
    blocks = vit_blocks(model)
    dims = model_dims(model)
    validate_spec(spec, dims)
    spec = _canonical(spec)
    # every check before the first change, so a refused spec leaves the model as it was
    for b, blk in enumerate(blocks):
        if spec["heads"][b] != list(range(dims["num_heads"][b])) and not isinstance(blk.attn.norm, nn.Identity):
            raise SpecError(f"block {b}: pruning heads of an attention with scale_norm is not supported")
        if spec["neurons"][b] != list(range(dims["mlp_hidden"][b])) and not isinstance(blk.mlp.norm, nn.Identity):
            raise SpecError(f"block {b}: pruning neurons of an MLP with a hidden norm is not supported")
    if spec["tokens"] is not None:
        for b in spec["tokens"]["blocks"]:
            if type(blocks[b]) not in (Block, TokenReducingBlock):
                raise SpecError(f"token reduction supports timm Block exactly, not {type(blocks[b]).__name__}")
    for blk in blocks:  # drop an earlier token schedule
        if isinstance(blk, TokenReducingBlock):
            _restore_block(blk)
    with torch.no_grad():
        for b, blk in enumerate(blocks):
            _keep_heads(blk.attn, spec["heads"][b], b)
            _keep_neurons(blk.mlp, spec["neurons"][b], b)
    tokens = spec["tokens"]
    if tokens is not None:
        for b, rate in zip(tokens["blocks"], tokens["keep_rates"]):
            _make_reducing(blocks[b], kept_tokens(dims["num_patches"], rate), dims["num_prefix_tokens"],
                           tokens["fuse"])
    _guard_intermediates(model, tokens is not None)
    model.prune_spec = spec
    return model


# --------------------------------------------------------------------------------------------
# token reduction
# --------------------------------------------------------------------------------------------

def attention_with_class_row(attn, x, num_prefix):
    """Run timm ``Attention`` ``attn`` on ``x`` [B, N, C] and also return the class token's
    attention over the non-prefix tokens, averaged over heads: [B, N - num_prefix].

    The class row is softmax(q_0 K^T * scale) from the class token's query alone, so the main
    attention can stay on ``F.scaled_dot_product_attention``.
    """
    bsz, n_tok, _ = x.shape
    heads, hd = attn.num_heads, attn.head_dim
    qkv = attn.qkv(x).reshape(bsz, n_tok, 3, heads, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)                                   # [B, H, N, hd] each
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.fused_attn:
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0, scale=attn.scale)
    else:
        weights = torch.softmax((q * attn.scale) @ k.transpose(-2, -1), dim=-1)
        out = attn.attn_drop(weights) @ v
    q_cls = (q[:, :, 0] * attn.scale).unsqueeze(-1)                        # [B, H, hd, 1]
    cls_row = torch.softmax((k @ q_cls).squeeze(-1), dim=-1)[:, :, num_prefix:].mean(dim=1)
    out = attn.norm(out.transpose(1, 2).reshape(bsz, n_tok, heads * hd))
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * torch.sigmoid(gate(x))
    return attn.proj_drop(attn.proj(out)), cls_row


def reduce_tokens(x, score, num_prefix, keep, fuse="mean"):
    """Keep the prefix tokens and the ``keep`` best-scored other tokens of ``x`` [B, N, C]
    (``score`` [B, N - num_prefix]); fuse the rest into one token appended last.

    Needs 1 <= keep < N - num_prefix. Only the kept tokens are gathered: with n = N - num_prefix
    the mean-fused token is (n * mean of all - keep * mean of the kept) / (n - keep), the means
    taken in at least float32; the weighted one is the score-weighted mean of all with the kept
    tokens' scores zeroed.
    """
    prefix, rest = x[:, :num_prefix], x[:, num_prefix:]
    n = rest.shape[1]
    keep_idx = score.topk(keep, dim=1, sorted=False).indices.sort(dim=1).values   # kept, in their order
    kept = rest.gather(1, keep_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    if fuse == "weighted":
        w = score.scatter(1, keep_idx, 0.0).unsqueeze(-1)                       # the dropped tokens' scores
        fused = (rest * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True)
    else:
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        # lerp(a, b, w) = a + w (b - a): with w = -keep / (n - keep) that is (n a - keep b) / (n - keep)
        fused = torch.lerp(rest.mean(dim=1, keepdim=True, dtype=acc), kept.mean(dim=1, keepdim=True, dtype=acc),
                           -keep / (n - keep))
    return torch.cat([prefix, kept, fused if fused.dtype == x.dtype else fused.to(x.dtype)], dim=1)


class TokenReducingBlock(Block):
    """A timm ``Block`` that reduces tokens between its attention and MLP branches.

    Instances are made by swapping the class of an existing Block (``_make_reducing``); the extra
    attributes are ``token_keep`` (kept non-prefix tokens), ``token_prefix`` and ``token_fuse``.
    """

    def forward(self, x, attn_mask=None, is_causal=False):
        if attn_mask is not None or is_causal:
            raise RuntimeError("token-reducing blocks do not support attention masks")
        n_rest = x.shape[1] - self.token_prefix
        if self.token_keep >= n_rest:
            return super().forward(x)
        y, cls_row = attention_with_class_row(self.attn, self.norm1(x), self.token_prefix)
        x = x + self.drop_path1(self.ls1(y))
        x = reduce_tokens(x, cls_row, self.token_prefix, self.token_keep, self.token_fuse)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def extra_repr(self):
        return f"token_keep={self.token_keep}, token_fuse={self.token_fuse}"


def _make_reducing(blk, keep, num_prefix, fuse):
    if type(blk) is not Block and type(blk) is not TokenReducingBlock:
        raise SpecError(f"token reduction supports timm Block exactly, not {type(blk).__name__}")
    blk.__class__ = TokenReducingBlock
    blk.token_keep = int(keep)
    blk.token_prefix = int(num_prefix)
    blk.token_fuse = fuse


def _guard_intermediates(model, reduced):
    """On a token-reduced ``model`` (``reduced``), a per-instance ``forward_intermediates`` that
    refuses timm's default output_fmt="NCHW": fewer tokens than patches (plus the fused one) do
    not form the patch grid it reshapes to. output_fmt="NLC" is timm's own method, unchanged.
    It also gets a per-instance ``set_input_size`` that refuses a new patch count (the kept token
    counts were fixed for this one). ``reduced=False`` removes both (the class's methods again)."""
    model.__dict__.pop("forward_intermediates", None)
    model.__dict__.pop("set_input_size", None)
    if reduced:
        model.forward_intermediates = types.MethodType(_forward_intermediates_tokens, model)
        model.set_input_size = types.MethodType(_set_input_size_tokens, model)


def _forward_intermediates_tokens(self, x, *args, **kwargs):
    method = type(self).forward_intermediates
    call = inspect.signature(method).bind(self, x, *args, **kwargs)
    call.apply_defaults()
    if call.arguments.get("output_fmt") == "NCHW":
        where = [i for i, b in enumerate(self.blocks) if isinstance(b, TokenReducingBlock)]
        raise SpecError(f"forward_intermediates(output_fmt='NCHW') needs one token per patch, but this model "
                        f"reduces tokens at blocks {where}, so its feature maps are not a patch grid; "
                        f"pass output_fmt='NLC' for the tokens")
    return method(self, x, *args, **kwargs)


def _set_input_size_tokens(self, img_size=None, patch_size=None):
    """timm's set_input_size, refused (before any change) where it would change the patch count:
    the reducing blocks' kept token counts were fixed from the patch count by ``apply_spec``, so
    at another count they would silently keep another fraction of the tokens."""
    probe = copy.deepcopy(self.patch_embed)
    probe.set_input_size(img_size=img_size, patch_size=patch_size)
    before, after = int(self.patch_embed.num_patches), int(probe.num_patches)
    if after != before:
        where = [i for i, b in enumerate(self.blocks) if isinstance(b, TokenReducingBlock)]
        raise SpecError(f"set_input_size would change the patch count from {before} to {after}, but this model "
                        f"reduces tokens at blocks {where} with kept counts fixed for {before} patches; "
                        f"rebuild it at the new size (apply_spec on a dense model of that size)")
    return type(self).set_input_size(self, img_size=img_size, patch_size=patch_size)


def _restore_block(blk):
    blk.__class__ = Block
    for name in ("token_keep", "token_prefix", "token_fuse"):
        if name in blk.__dict__:
            delattr(blk, name)
