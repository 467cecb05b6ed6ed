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
  scored by the class token's attention probability in that block, averaged over heads; in a
  model WITHOUT a class token (SigLIP's attention-pool head, average pooling) by the attention it
  receives, averaged over all queries and heads (``token_score_kind``: "received");
* if ``k`` (the kept count) is smaller than the number of such tokens ``n``, the ``k`` highest scored
  are kept (in their previous order) and the other ``n - k`` are fused into ONE token appended at
  the end: their mean (``fuse="mean"``) or their average weighted by the class-token attention
  (``fuse="weighted"``). The block's MLP then runs on ``prefix + k + 1`` tokens. Otherwise
  (``k >= n``) the block is an ordinary block: nothing is computed or changed.

The class-token attention row is computed from the class token's query only,
``softmax(q_cls K^T * scale)``, so the main attention keeps using the fused
``scaled_dot_product_attention`` kernel and no N x N matrix is materialised. The "received"
score needs every row, so such a block computes its attention matrix explicitly, once, and takes
both its output and the score from it (no extra MACs; ``attention_with_received_attention``).
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
from timm.layers import AttentionRope, GluMlp, Mlp, RotaryEmbeddingCat, SwiGLU
from timm.models.eva import Eva, EvaAttention, EvaBlock
from timm.layers.attention_pool import AttentionPoolLatent
from timm.models.vision_transformer import Attention, Block

from flags import FUSE_MODES

SPEC_VERSION = 1
ROUNDINGS = ("exact", "original")
# a third, a half-plus and five-sixths of the depth, as twelfths (blocks 4, 7, 10 of 12, 1-based)
_SCHEDULE_TWELFTHS = (4, 7, 10)


class SpecError(ValueError):
    """A prune spec or policy that does not fit the model (one-line message)."""


# --------------------------------------------------------------------------------------------
# model shapes
# --------------------------------------------------------------------------------------------

def vit_blocks(model):
    if isinstance(model, Eva):
        return eva_blocks(model)
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


def mlp_width(mlp):
    """Hidden neurons of a block's MLP: the input width of its fc2 (timm Mlp, GluMlp and SwiGLU alike;
    a GluMlp's fc1 has two rows per neuron)."""
    return int(mlp.fc2.in_features)


def mlp_in_projections(mlp):
    """Input projections feeding one hidden neuron: 2 for a gated MLP (SwiGLU's fc1_g and fc1_x,
    GluMlp's two halves of fc1), else 1."""
    return 2 if isinstance(mlp, (SwiGLU, GluMlp)) else 1


def qkv_has_bias(attn):
    """Whether the q / k / v projections carry a bias (timm Attention's qkv.bias; EvaAttention's
    q_bias / v_bias or q_proj.bias)."""
    if getattr(attn, "q_bias", None) is not None:
        return True
    lin = attn.qkv if getattr(attn, "qkv", None) is not None else attn.q_proj
    return lin.bias is not None


def model_dims(model):
    """Shapes of a (dense or compressed) timm ViT, read from its live modules.

    Returns a plain dict: depth, embed_dim, head_dim, num_heads [per block], mlp_hidden [per
    block], mlp_in_proj (input projections of a hidden neuron: 1, or 2 for a gated SwiGLU / GLU
    MLP), num_prefix_tokens, num_patches, num_classes, qkv_bias, in_chans, patch_size [h, w],
    img_size [h, w], num_classifier_heads (1, or 2 for distilled DeiT), global_pool, attn_gate,
    has_class_token, token_reduction (the live schedule: [[block, kept], ...], or None) and
    attn_pool (``attn_pool_dims``: an attention-pool head's shapes, or None).
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
        "embed_dim": int(attn0.proj.out_features),
        "head_dim": int(attn0.head_dim),
        "num_heads": [int(b.attn.num_heads) for b in blocks],
        "mlp_hidden": [mlp_width(b.mlp) for b in blocks],
        "mlp_in_proj": mlp_in_projections(blocks[0].mlp),
        "num_prefix_tokens": int(getattr(model, "num_prefix_tokens", 1)),
        "num_patches": int(pe.num_patches) if grid is None else int(grid[0] * grid[1]),
        "num_classes": int(getattr(model, "num_classes", 0)),
        "qkv_bias": qkv_has_bias(attn0),
        "in_chans": int(in_chans),
        "patch_size": [int(p) for p in patch_size],
        "img_size": None if img_size is None else [int(s) for s in img_size],
        "num_classifier_heads": len(classifier_heads(model)),
        "global_pool": getattr(model, "global_pool", "token"),
        "attn_gate": getattr(attn0, "gate", None) is not None,
        "has_class_token": getattr(model, "cls_token", None) is not None,
        "token_reduction": reducing or None,
        "attn_pool": attn_pool_dims(model),
    }


def attn_pool_dims(model):
    """Shapes of ``model``'s attention-pool head (timm ``global_pool='map'``: SigLIP's
    AttentionPoolLatent, a latent query attending over the final tokens), or None without one.

    A dict of primitives: latent_len (queries), q [in, out] (the latent's projection; None when the
    latent is the query itself), kv [in, out], attn_dim (channels of q . k and attn @ v), proj and
    the MLP's fc1 / fc2 as [in, out] (None in timm's pre-logits mode), include_prefix (the pool also
    sees the prefix tokens) and vectors (pooled vectors per image the classifier gets). The pool is
    never pruned. Another pool (timm's global_pool='prr') is refused: SpecError naming its class.
    """
    pool = getattr(model, "attn_pool", None)
    if pool is None:
        return None
    if type(pool) is not AttentionPoolLatent:
        raise SpecError(f"attention pool {type(pool).__name__} "
                        f"(timm global_pool={getattr(model, 'global_pool', None)!r}) "
                        f"is not supported: only AttentionPoolLatent (global_pool='map') is counted and compressed")
    mlp = pool.mlp
    if mlp is not None and not (type(mlp) is Mlp and isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.fc2, nn.Linear)):
        raise SpecError(f"attention pool MLP {type(mlp).__name__} is not supported (only timm Mlp)")

    def shape(lin):
        return [int(lin.in_features), int(lin.out_features)] if isinstance(lin, nn.Linear) else None
    return {"latent_len": int(pool.latent_len), "q": shape(pool.q), "kv": shape(pool.kv),
            "attn_dim": int(pool.num_heads * pool.head_dim), "proj": shape(pool.proj),
            "fc1": None if mlp is None else shape(mlp.fc1), "fc2": None if mlp is None else shape(mlp.fc2),
            "include_prefix": bool(getattr(model, "pool_include_prefix", False)),
            "vectors": 1 if pool.pool in ("token", "avg") else int(pool.latent_len)}


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
        if (isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer, np.floating))
                or not 0.0 < rate <= 1.0):
            raise SpecError(f"token keep rate {rate!r} is outside (0, 1]")
    fuse = tokens.get("fuse", "mean")
    if fuse not in FUSE_MODES:
        raise SpecError(f"token fuse must be one of {FUSE_MODES}, got {fuse!r}")


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


def _head_channels(heads, head_dim, device):
    """The channels of ``heads`` in a [heads * head_dim] layout (head-major), as a long tensor."""
    return (torch.as_tensor(heads, dtype=torch.long, device=device)[:, None] * head_dim
            + torch.arange(head_dim, device=device)[None, :]).reshape(-1)


def _keep_heads(attn, heads, block):
    """Keep only ``heads`` (ascending indices) of a timm Attention: qkv rows of the q, k and v parts,
    gate rows, proj columns, and num_heads / attn_dim, all at once."""
    n_heads, hd = attn.num_heads, attn.head_dim
    if list(heads) == list(range(n_heads)):
        return
    if not isinstance(attn.norm, nn.Identity):
        raise SpecError(f"block {block}: pruning heads of an attention with scale_norm is not supported")
    chan = _head_channels(heads, hd, attn.qkv.weight.device)              # kept channels of one part
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
        if isinstance(blk, EvaBlock):
            eva_keep_components(blk, list(range(int(heads))), list(range(int(neurons))))
            return blk
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
        if isinstance(blk, EvaBlock):  # its inner norms are sliced with its heads / neurons (eva_blocks checked them)
            continue
        if spec["heads"][b] != list(range(dims["num_heads"][b])) and not isinstance(blk.attn.norm, nn.Identity):
            raise SpecError(f"block {b}: pruning heads of an attention with scale_norm is not supported")
        if spec["neurons"][b] != list(range(dims["mlp_hidden"][b])) and not isinstance(blk.mlp.norm, nn.Identity):
            raise SpecError(f"block {b}: pruning neurons of an MLP with a hidden norm is not supported")
    if spec["tokens"] is not None:
        if spec["tokens"]["blocks"] and token_reduction_refusal(model):
            raise SpecError(token_reduction_refusal(model))
        for b in spec["tokens"]["blocks"]:
            if type(blocks[b]) not in (Block, TokenReducingBlock):
                raise SpecError(f"token reduction supports timm Block exactly, not {type(blocks[b]).__name__}")
    for blk in blocks:  # drop an earlier token schedule
        if isinstance(blk, TokenReducingBlock):
            restore_block(blk)
    with torch.no_grad():
        for b, blk in enumerate(blocks):
            if isinstance(blk, EvaBlock):
                eva_keep_components(blk, spec["heads"][b], spec["neurons"][b])
                continue
            _keep_heads(blk.attn, spec["heads"][b], b)
            _keep_neurons(blk.mlp, spec["neurons"][b], b)
    tokens = spec["tokens"]
    if tokens is not None:
        for b, rate in zip(tokens["blocks"], tokens["keep_rates"]):
            make_reducing(blocks[b], kept_tokens(dims["num_patches"], rate), dims["num_prefix_tokens"],
                           tokens["fuse"], token_score_kind(dims))
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


TOKEN_SCORES = ("class", "received")


def token_score_kind(dims):
    """The token score of a reducing block in a model of ``dims`` (``model_dims``): "class", the
    class token's attention (EViT); "received" for a model without a class token."""
    return "class" if dims.get("has_class_token", True) else "received"


def attention_with_received_attention(attn, x, num_prefix):
    """Run timm ``Attention`` ``attn`` on ``x`` [B, N, C] and also return the attention each
    non-prefix token receives, averaged over all N queries and over heads: [B, N - num_prefix].

    The token score of a model without a class token: its classifier reads a pool over all tokens
    (SigLIP's latent query, an average), so a token matters by how much every token draws from it.
    The score needs every row of the attention, so the matrix is computed explicitly, once, and
    the output comes from the same matrix (no MACs beyond the block's own attention).
    """
    bsz, n_tok, _ = x.shape
    heads, hd = attn.num_heads, attn.head_dim
    qkv = attn.qkv(x).reshape(bsz, n_tok, 3, heads, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)                                   # [B, H, N, hd] each
    q, k = attn.q_norm(q), attn.k_norm(k)
    weights = torch.softmax((q * attn.scale) @ k.transpose(-2, -1), dim=-1)   # [B, H, N, N]
    received = weights[..., num_prefix:].mean(dim=(1, 2))
    out = attn.norm((attn.attn_drop(weights) @ v).transpose(1, 2).reshape(bsz, n_tok, heads * hd))
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * torch.sigmoid(gate(x))
    return attn.proj_drop(attn.proj(out)), received


def attention_with_token_score(attn, x, num_prefix, score="class"):
    """``attention_with_class_row`` (score "class") or ``attention_with_received_attention``
    ("received"): the attention branch's output and the score of every non-prefix token."""
    if score == "received":
        return attention_with_received_attention(attn, x, num_prefix)
    return attention_with_class_row(attn, x, num_prefix)


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

    Instances are made by swapping the class of an existing Block (``make_reducing``); the extra
    attributes are ``token_keep`` (kept non-prefix tokens), ``token_prefix``, ``token_fuse`` and
    ``token_score`` (``TOKEN_SCORES``: "class", or "received" in a model without a class token).
    """

    def forward(self, x, attn_mask=None, is_causal=False):
        if attn_mask is not None or is_causal:
            raise RuntimeError("token-reducing blocks do not support attention masks")
        n_rest = x.shape[1] - self.token_prefix
        if self.token_keep >= n_rest:
            return super().forward(x)
        y, score = attention_with_token_score(self.attn, self.norm1(x), self.token_prefix, self.token_score)
        x = x + self.drop_path1(self.ls1(y))
        x = reduce_tokens(x, score, self.token_prefix, self.token_keep, self.token_fuse)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def extra_repr(self):
        return f"token_keep={self.token_keep}, token_fuse={self.token_fuse}, token_score={self.token_score}"


def make_reducing(blk, keep, num_prefix, fuse, score="class"):
    if type(blk) is not Block and type(blk) is not TokenReducingBlock:
        raise SpecError(f"token reduction supports timm Block exactly, not {type(blk).__name__}")
    blk.__class__ = TokenReducingBlock
    blk.token_keep = int(keep)
    blk.token_prefix = int(num_prefix)
    blk.token_fuse = fuse
    blk.token_score = score


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


def restore_block(blk):
    blk.__class__ = Block
    for name in ("token_keep", "token_prefix", "token_fuse", "token_score"):
        if name in blk.__dict__:
            delattr(blk, name)


# --------------------------------------------------------------------------------------------
# EVA-02 (timm.models.eva.Eva): its blocks, head / neuron slicing, and why tokens stay
# --------------------------------------------------------------------------------------------
# An EvaBlock computes x + gamma_1 * attn(norm1(x), rope), then x + gamma_2 * mlp(norm2(x)). Its
# attention rotates the queries and keys of the patch tokens by a rotary position embedding (rope)
# that the model computes once per forward for the patch grid; it acts on head_dim and is the same
# for every head, so heads drop cleanly. timm's EvaAttention reshapes its output to the block width,
# so a block that keeps fewer heads runs timm's AttentionRope instead: the same computation (rope
# on the non-prefix tokens, q / k norms, the inner norm of scale_attn_inner, gate, proj) reshaped by
# attn_dim. A fused qkv with q_bias / v_bias (EVA-02 Ti / S) becomes q_proj, k_proj (no bias, as
# in EvaAttention) and v_proj; a fused qkv without biases stays fused. SwiGLU keeps the fc1_g and
# fc1_x rows of a neuron together, GluMlp both halves of fc1. An inner LayerNorm (attn.norm of
# scale_attn_inner, mlp.norm of scale_mlp, EVA-02 B / L) keeps the channels it normalises: it then
# normalises over the kept ones, which is the sliced model's definition (not a zeroed channel).

EVA_TOKEN_REFUSAL = ("EVA models cannot reduce tokens: their attention rotates each patch's query and key by its "
                     "rotary position embedding, which dropping or fusing tokens would have to gather alongside; "
                     "compress heads and neurons only (--head_pruning --neuron_pruning, token rate 0)")


def token_reduction_refusal(model):
    """Why ``model`` cannot reduce tokens (one line), or None when it can."""
    return EVA_TOKEN_REFUSAL if isinstance(model, Eva) else None


def eva_blocks(model):
    """The blocks of a timm Eva, checked to be what this tool compresses: EvaBlock (pre-norm) with
    EvaAttention or AttentionRope (as many key / value heads as query heads), a SwiGLU, GluMlp or Mlp
    of nn.Linear layers, inner norms that are LayerNorm or none, and a rope shared by all heads
    (EVA-02's RotaryEmbeddingCat) or none. SpecError (one line) naming what is not."""
    rope = getattr(model, "rope", None)
    if rope is not None and not isinstance(rope, RotaryEmbeddingCat):
        raise SpecError(f"{type(model).__name__} uses a {type(rope).__name__} rotary embedding; only EVA-02's "
                        f"RotaryEmbeddingCat (one rope for every head) is supported")
    out = list(model.blocks)
    if not out:
        raise SpecError("model has no transformer blocks")
    for i, blk in enumerate(out):
        if not isinstance(blk, EvaBlock):
            raise SpecError(f"block {i} is a {type(blk).__name__}, only timm eva.EvaBlock (pre-norm) is supported")
        attn, mlp = blk.attn, blk.mlp
        if not isinstance(attn, (EvaAttention, AttentionRope)):
            raise SpecError(f"block {i} attention is a {type(attn).__name__}, only EvaAttention / AttentionRope "
                            f"is supported")
        if getattr(attn, "num_kv_heads", attn.num_heads) != attn.num_heads:
            raise SpecError(f"block {i} has grouped-query attention ({attn.num_kv_heads} key/value heads for "
                            f"{attn.num_heads} heads), which is not supported")
        linears = [mlp.fc1_g, mlp.fc1_x] if isinstance(mlp, SwiGLU) else [getattr(mlp, "fc1", None)]
        if not isinstance(mlp, (SwiGLU, GluMlp, Mlp)) or not all(isinstance(m, nn.Linear)
                                                                for m in linears + [mlp.fc2]):
            raise SpecError(f"block {i} MLP is a {type(mlp).__name__}, only SwiGLU, GluMlp or Mlp of nn.Linear "
                            f"layers is supported")
        for where, norm in (("attention", attn.norm), ("MLP", mlp.norm)):
            if not isinstance(norm, (nn.Identity, nn.LayerNorm)):
                raise SpecError(f"block {i}'s {where} inner norm is a {type(norm).__name__}; only LayerNorm can "
                                f"be sliced")
    return out


def eva_keep_components(blk, heads, neurons):
    """Keep only ``heads`` and ``neurons`` (ascending indices) of an EvaBlock: weights, inner norms
    and num_heads / attn_dim together (see the section's comment). Keeping every head leaves the
    attention as it was."""
    attn = blk.attn
    if list(heads) != list(range(attn.num_heads)):
        if isinstance(attn, EvaAttention):
            attn = blk.attn = _as_attention_rope(attn)
        _keep_rope_heads(attn, heads)
    _keep_eva_neurons(blk.mlp, neurons)


def _linear_from(weight, bias, like):
    """An nn.Linear holding ``weight`` [out, in] and ``bias`` (or None), trainable as ``like``'s weight."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = _new_param(like.weight, weight)
    if bias is not None:
        lin.bias = _new_param(bias, bias.detach())
    return lin


def _as_attention_rope(attn):
    """timm AttentionRope computing what EvaAttention ``attn`` computes, holding its modules and weights."""
    fused = attn.qkv is not None
    heads, hd = attn.num_heads, attn.head_dim
    dim = (attn.qkv if fused else attn.q_proj).in_features
    split = fused and attn.q_bias is not None
    with torch.device("meta"):  # a shell: every module and weight is replaced below
        new = AttentionRope(dim, num_heads=heads, qkv_bias=False, qkv_fused=fused and not split,
                            num_prefix_tokens=attn.num_prefix_tokens, attn_head_dim=hd,
                            rotate_half=getattr(attn, "rotate_half", False))
    if split:  # EvaAttention's qkv bias is cat(q_bias, zeros, v_bias): k gets no bias
        w, width = attn.qkv.weight.detach(), heads * hd
        new.q_proj, new.k_proj, new.v_proj = (_linear_from(w[p * width:(p + 1) * width], bias, attn.qkv)
                                              for p, bias in enumerate((attn.q_bias, None, attn.v_bias)))
    elif fused:
        new.qkv = attn.qkv
    else:
        new.q_proj, new.k_proj, new.v_proj = attn.q_proj, attn.k_proj, attn.v_proj
    for name in ("q_norm", "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop"):
        setattr(new, name, getattr(attn, name))
    new.fused_attn = attn.fused_attn
    return new.train(attn.training)


def _slice_norm(norm, idx):
    """Keep channels ``idx`` of an inner LayerNorm (it then normalises over them); an Identity stays."""
    if isinstance(norm, nn.Identity):
        return
    for name in ("weight", "bias"):
        p = getattr(norm, name)
        if p is not None:
            setattr(norm, name, _new_param(p, p.detach().index_select(0, idx)))
    norm.normalized_shape = (int(idx.numel()),)


def _keep_rope_heads(attn, heads):
    """Keep only ``heads`` of a timm AttentionRope: q / k / v rows (fused or not), gate rows, inner-norm
    channels, proj columns, and num_heads / attn_dim (its output reshape) with the key / value counts."""
    hd, width = attn.head_dim, attn.num_heads * attn.head_dim
    chan = _head_channels(heads, hd, attn.proj.weight.device)
    if attn.qkv is not None:
        _slice_linear_out(attn.qkv, torch.cat([chan + part * width for part in range(3)]))
    else:
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            _slice_linear_out(lin, chan)
    if attn.gate is not None:
        _slice_linear_out(attn.gate, chan)
    _slice_norm(attn.norm, chan)
    _slice_linear_in(attn.proj, chan)
    attn.num_heads = attn.num_kv_heads = len(heads)
    attn.attn_dim = attn.kv_dim = len(heads) * hd


def _keep_eva_neurons(mlp, neurons):
    """Keep only ``neurons`` of an EvaBlock's MLP: SwiGLU's fc1_g and fc1_x rows, GluMlp's rows of both
    halves of fc1 (what chunk(2) splits), or Mlp's fc1 rows; the inner norm's channels; fc2 columns."""
    width = mlp_width(mlp)
    if list(neurons) == list(range(width)):
        return
    idx = torch.as_tensor(neurons, dtype=torch.long, device=mlp.fc2.weight.device)
    if isinstance(mlp, SwiGLU):
        _slice_linear_out(mlp.fc1_g, idx)
        _slice_linear_out(mlp.fc1_x, idx)
    elif isinstance(mlp, GluMlp):
        _slice_linear_out(mlp.fc1, torch.cat([idx, idx + width]))
    else:
        _slice_linear_out(mlp.fc1, idx)
    _slice_norm(mlp.norm, idx)
    _slice_linear_in(mlp.fc2, idx)
