"""Exact multiply-accumulates (MACs) and parameter counts of dense and compressed timm ViTs.

Convention (the paper's and the DeiT model cards'): "FLOPs" are multiply-accumulates of the
patch-embedding convolution, every block's qkv projection, q @ k^T, attn @ v, output projection,
MLP fc1 and fc2, the class-token attention row of a token-reducing block (q_cls @ K^T), an
attention-pool head (SigLIP's ``global_pool='map'``: the latent's q projection, kv of the tokens it
pools, q . k and attn @ v, proj and its MLP; ``attn_pool_macs``), and the classifier head(s).
Norms, softmax, GELU, residual adds, biases, token gathering and fusing are not counted (nor the
token score of a model without a class token: it is read off the block's own attention matrix).
DeiT-Ti / S / B at 224 px: 1.26 / 4.61 / 17.58 GMACs.

Token counts follow ``pruning.tokens_after_reduction``: a reducing block runs its attention on the
tokens it receives and its MLP on ``prefix + kept + 1`` tokens when it drops any.

EVA-02 blocks (timm EvaBlock) count every nn.Linear of their attention and MLP on every token: q, k, v
(fused or not) and proj, SwiGLU's two input projections fc1_g and fc1_x (or GluMlp's double-width
fc1) and fc2, plus q @ k^T and attn @ v. Their rotary position embedding rotates q and k
elementwise, which is not counted, like norms and activations (``_eva_block_macs``).

Two conventions (``convention=``):
  * "exact" (default): every MAC listed above;
  * "original": what the original implementation's compute_flops counted (Hou & Kung 2022), so that
    budgets mean what they meant in the paper: the blocks only (no patch embedding, no classifier,
    no class-token attention row, no attention gate), qkv + proj + q @ k^T + attn @ v + MLP, with
    the fused token left out of the token count. For a policy (``policy_gmacs``) it is the
    original's formula itself: kept heads floor(H (1 - h)), kept neurons floor(M (1 - n)) and
    floor(N (1 - r)^k) tokens (N = prefix + patches, class token included; k = reductions so far;
    a reducing block's attention sees the count before it). DeiT-S dense: 4.5407 GMACs.
    A model made with ``pruning.policy_to_spec(..., rounding="original")`` has the original's
    head and neuron counts exactly; its token counts (``pruning.original_kept_tokens``, what the
    original's model ran) can differ from the formula's by one at a later reduction, so
    ``model_macs(model, convention="original")`` and ``policy_gmacs`` then differ slightly.

    python flops.py --model deit_small_patch16_224 [--input-size 224] [--num-classes 1000] [--json]
    python flops.py --resume compressed_model_file [--json] [--flops-convention original]
    python flops.py --model deit_small_patch16_224 --policy hou2022-deit-s
"""
import argparse
import json
import os
import sys

import numpy as np
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.eva import EvaBlock

import pruning
from flags import CONVENTIONS
from utils import UserError

DEFAULT_MODEL = "deit_small_patch16_224"



def _check_convention(convention):
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown FLOPs convention {convention!r}; expected one of {CONVENTIONS}")


def _input_hw(input_size, patch_embed):
    if input_size is None:
        size = getattr(patch_embed, "img_size", None)
        if size is None:
            raise ValueError("the model has no fixed image size: pass input_size")
        return int(size[0]), int(size[1])
    if isinstance(input_size, int):
        return input_size, input_size
    size = tuple(int(s) for s in input_size)
    return size[-2], size[-1]          # (H, W) or (C, H, W)


def _conv_out(size, conv, axis):
    k, s, p = conv.kernel_size[axis], conv.stride[axis], conv.padding[axis]
    return (size + 2 * p - k) // s + 1


def _eva_block_macs(blk, n_tok, gate=True):
    """MACs of an EvaBlock on ``n_tok`` tokens: every nn.Linear of its attention and MLP on every
    token (q, k, v or the fused qkv, the gate unless ``gate=False``, proj; SwiGLU's fc1_g and fc1_x
    or GluMlp's / Mlp's fc1, then fc2), plus q @ k^T and attn @ v. The rotary embedding's rotation
    of q and k is elementwise work and, like norms, SiLU and the gating product, not counted."""
    attn = blk.attn
    linears = [m for part in (attn, blk.mlp) for m in part.modules() if isinstance(m, nn.Linear)
               and (gate or m is not getattr(attn, "gate", None))]
    return (n_tok * sum(m.in_features * m.out_features for m in linears)
            + 2 * n_tok * n_tok * attn.num_heads * attn.head_dim)


def _block_macs(blk, n_in, num_prefix):
    """MACs of one block receiving ``n_in`` tokens, and the token count it hands on."""
    if isinstance(blk, EvaBlock):  # EVA-02 never reduces tokens (pruning.token_reduction_refusal)
        return _eva_block_macs(blk, n_in), n_in
    attn, mlp = blk.attn, blk.mlp
    width = attn.qkv.in_features
    attn_dim = attn.num_heads * attn.head_dim
    macs = n_in * width * attn.qkv.out_features
    if getattr(attn, "gate", None) is not None:
        macs += n_in * width * attn.gate.out_features
    macs += 2 * n_in * n_in * attn_dim                       # q @ k^T and attn @ v
    macs += n_in * attn.proj.in_features * attn.proj.out_features
    n_out = n_in
    if isinstance(blk, pruning.TokenReducingBlock):
        n_out, active = pruning.tokens_after_reduction(n_in, num_prefix, blk.token_keep)
        if active and getattr(blk, "token_score", "class") == "class":
            macs += n_in * attn_dim                          # class-token attention row
    macs += n_out * (mlp.fc1.in_features * mlp.fc1.out_features + mlp.fc2.in_features * mlp.fc2.out_features)
    return macs, n_out


def _block_macs_original(blk, n_in, fused, num_prefix):
    """The original convention's MACs of one block receiving ``n_in`` tokens of which ``fused``
    (0 or 1) is a fused token, which is not counted; returns (macs, n_out, fused_out)."""
    if isinstance(blk, EvaBlock):  # every matrix of the block, as the original counts a DeiT block's
        return _eva_block_macs(blk, n_in - fused, gate=False), n_in, fused
    attn, mlp = blk.attn, blk.mlp
    n = n_in - fused
    attn_dim = attn.num_heads * attn.head_dim
    macs = n * attn.qkv.in_features * attn.qkv.out_features + n * attn.proj.in_features * attn.proj.out_features
    macs += 2 * n * n * attn_dim
    n_out = n_in
    if isinstance(blk, pruning.TokenReducingBlock):
        n_out, active = pruning.tokens_after_reduction(n_in, num_prefix, blk.token_keep)
        fused = 1 if active else fused
    macs += (n_out - fused) * (mlp.fc1.in_features * mlp.fc1.out_features + mlp.fc2.in_features * mlp.fc2.out_features)
    return macs, n_out, fused


def check_countable(model):
    """Raise ``pruning.SpecError`` (a one-line user error) for a model whose cost this module cannot
    count, and so which the search and prune+finetune cannot budget: an attention pool other than
    timm's AttentionPoolLatent (``global_pool='prr'``), or a patch embedding other than timm's
    PatchEmbed (a hybrid's convolutional backbone, HybridEmbed). Callers check a dense model with
    it before any work."""
    pruning.attn_pool_dims(model)  # refuses a pool it cannot count, naming its class
    pe = getattr(model, "patch_embed", None)
    if not isinstance(pe, PatchEmbed) or not isinstance(pe.proj, nn.Conv2d):
        what = type(pe).__name__ if not isinstance(pe, PatchEmbed) else \
            f"PatchEmbed with a {type(pe.proj).__name__} projection"
        raise pruning.SpecError(f"patch embedding {what} is not supported: its MACs are not counted (only timm "
                                f"PatchEmbed, one Conv2d), so the model cannot be budgeted or compressed")


def attn_pool_macs(pool, n_tokens, num_prefix):
    """MACs of an attention-pool head described by ``pool`` (``pruning.attn_pool_dims``) on the
    ``n_tokens`` tokens (prefix included; an int or an int array) the last block hands on: the
    latent's q projection, kv of the tokens it sees (the prefix only if it includes it), q . k and
    attn @ v of every latent query, proj and its MLP. Its norm and softmax are not counted."""
    seen = np.asarray(n_tokens, dtype=np.int64) - (0 if pool["include_prefix"] else int(num_prefix))
    latent = int(pool["latent_len"])

    def lin(shape):
        return 0 if shape is None else int(shape[0]) * int(shape[1])
    macs = latent * (lin(pool["q"]) + lin(pool["proj"]) + lin(pool["fc1"]) + lin(pool["fc2"]))
    macs = macs + seen * lin(pool["kv"]) + 2 * latent * seen * int(pool["attn_dim"])
    return int(macs) if macs.ndim == 0 else macs


def _head_vectors(pool, n_heads, global_pool, n_tok):
    """Vectors per image each classifier head multiplies: the attention pool's output vectors, every
    token with timm's global_pool='' (one head), else one."""
    if pool is not None:
        return int(pool["vectors"])
    return n_tok if (n_heads == 1 and global_pool == "") else 1


def check_compressible(model, round_to=1):
    """Raise ``pruning.SpecError`` (one line) before any work when the search or prune+finetune
    cannot do what it is asked on dense ``model``: a head ``check_countable`` refuses, or a
    ``round_to`` (``--round-to``) at least as large as the narrowest MLP. Kept neuron counts are
    multiples of ``round_to``, at least ``round_to`` and at most the width (``pruning.kept_count``),
    so such a block would keep every neuron whatever its removal ratio, silently."""
    check_countable(model)
    widths = pruning.model_dims(model)["mlp_hidden"]
    narrow = min(range(len(widths)), key=lambda b: widths[b])
    if int(round_to) > 1 and int(round_to) >= widths[narrow]:
        raise pruning.SpecError(f"--round-to {int(round_to)} would keep every neuron of block {narrow}'s MLP "
                                f"({widths[narrow]} neurons: kept counts are multiples of {int(round_to)}, at most "
                                f"the width); use a --round-to below {widths[narrow]} (1: exact ratios)")


def model_macs(model, input_size=None, convention="exact"):
    """{"macs": int, "params": int, "gmacs": float} of ``model`` at ``input_size`` (int, (H, W) or
    (C, H, W); default the model's image size), from its live shapes and token schedule, counted
    in ``convention`` ("exact" or "original", see the module docstring)."""
    _check_convention(convention)
    blocks = pruning.vit_blocks(model)
    check_countable(model)
    pe = model.patch_embed
    conv = pe.proj
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"patch embedding projection is a {type(conv).__name__}, expected Conv2d")
    height, width = _input_hw(input_size, pe)
    num_patches = _conv_out(height, conv, 0) * _conv_out(width, conv, 1)
    params = sum(p.numel() for p in model.parameters())
    if convention == "original":
        num_prefix = int(getattr(model, "num_prefix_tokens", 1))
        macs, n_tok, fused = 0, num_prefix + num_patches, 0
        for blk in blocks:
            m, n_tok, fused = _block_macs_original(blk, n_tok, fused, num_prefix)
            macs += m
        return {"macs": int(macs), "params": int(params), "gmacs": macs / 1e9}
    macs = (num_patches * conv.out_channels * (conv.in_channels // conv.groups)
            * conv.kernel_size[0] * conv.kernel_size[1])
    num_prefix = int(getattr(model, "num_prefix_tokens", 1))
    n_tok = num_prefix + num_patches
    for blk in blocks:
        m, n_tok = _block_macs(blk, n_tok, num_prefix)
        macs += m
    pool = pruning.attn_pool_dims(model)
    if pool is not None:
        macs += attn_pool_macs(pool, n_tok, num_prefix)
    heads = pruning.classifier_heads(model)
    vectors = _head_vectors(pool, len(heads), getattr(model, "global_pool", "token"), n_tok)
    for head in heads:
        macs += vectors * head.in_features * head.out_features
    return {"macs": int(macs), "params": int(params), "gmacs": macs / 1e9}


def policy_gmacs(dims, X, round_to=1, convention="exact", rounding=None):
    """GMACs of the models that policies ``X`` ([n, 2L+1] or [2L+1]) would give, without building them.

    ``dims`` are the dense model's ``pruning.model_dims``; ``round_to`` and ``rounding`` ("exact" or
    "original"; default: the convention's) round counts as in ``pruning.policy_to_spec``.
    convention="exact" equals
    ``model_macs(apply_spec(dense, policy_to_spec(..., round_to, rounding=rounding)))["macs"] / 1e9``;
    convention="original" is the original's formula (module docstring; only with its rounding).
    """
    _check_convention(convention)
    if rounding is None:
        rounding = "exact" if convention == "exact" else "original"
    if convention == "original" and rounding != "original":
        raise ValueError("the original FLOPs convention counts with the original rounding only")
    X = np.asarray(X, dtype=np.float64)
    single = X.ndim == 1
    X = np.atleast_2d(X)
    shapes = pruning.policy_shapes(dims, X, round_to, rounding)   # checks the rounding, shape and ratios
    width, hd = int(dims["embed_dim"]), int(dims["head_dim"])
    num_prefix, num_patches = int(dims["num_prefix_tokens"]), int(dims["num_patches"])
    if convention == "original":
        out = _original_formula(width, hd, num_prefix + num_patches, pruning.token_schedule(int(dims["depth"])),
                                shapes["heads"], shapes["neurons"], X[:, -1], 1 + int(dims.get("mlp_in_proj", 1)))
        return out[0] if single else out
    qkv_per_chan = 4 if dims.get("attn_gate") else 3
    ph, pw = dims["patch_size"]
    n_tok, attn_dim = shapes["tokens"], shapes["heads"] * hd
    macs = np.full(X.shape[0], num_patches * width * int(dims["in_chans"]) * ph * pw, dtype=np.int64)
    macs += (n_tok * width * attn_dim * (qkv_per_chan + 1) + 2 * n_tok * n_tok * attn_dim).sum(axis=1)
    if pruning.token_score_kind(dims) == "class":
        macs += np.where(shapes["reduces"], n_tok * attn_dim, 0).sum(axis=1)     # class-token attention row
    mlp_mats = 1 + int(dims.get("mlp_in_proj", 1))                         # fc2, and fc1 (SwiGLU: fc1_g, fc1_x)
    macs += (mlp_mats * shapes["mlp_tokens"] * width * shapes["neurons"]).sum(axis=1)
    n_tok = shapes["out_tokens"]
    n_heads = int(dims.get("num_classifier_heads", 1))
    pool = dims.get("attn_pool")
    if pool is not None:
        macs += attn_pool_macs(pool, n_tok, num_prefix)
    vectors = _head_vectors(pool, n_heads, dims.get("global_pool", "token"), n_tok)
    macs += vectors * n_heads * width * int(dims["num_classes"])
    out = macs / 1e9
    return out[0] if single else out


def _original_formula(width, head_dim, n_tokens, schedule, heads_kept, neurons_kept, rate, mlp_mats=2):
    """The original's compute_flops, vectorised over policies, for any depth, width and schedule
    (``mlp_mats``: the MLP's matrices per neuron, 3 for a gated SwiGLU MLP)."""
    temp = 1.0 - rate
    counts = [np.full(rate.shape, n_tokens, dtype=np.int64)]        # tokens after k reductions
    for k in range(1, len(schedule) + 1):
        counts.append(np.floor(n_tokens * (1.0 - (1.0 - temp ** k))).astype(np.int64))
    macs = np.zeros(rate.shape, dtype=np.int64)
    done = 0
    for b in range(heads_kept.shape[1]):
        n_attn = counts[done]
        if b in schedule:
            done += 1
        n_mlp = counts[done]
        attn_dim = heads_kept[:, b] * head_dim
        macs += 4 * n_attn * width * attn_dim + 2 * n_attn * n_attn * attn_dim
        macs += mlp_mats * n_mlp * width * neurons_kept[:, b]
    return macs / 1e9


def _build_parser():
    p = argparse.ArgumentParser(description="GMACs and parameters of a timm ViT or of a compressed-model file, "
                                            "counted exactly and in the original implementation's convention")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="timm ViT name or preset of models.py (built with pretrained=False)")
    p.add_argument("--resume", default="", help="a model file (this tool's, dense or compressed; DeiT/timm "
                   "checkpoints and state dicts with --model NAME); with --policy, the dense model it compresses")
    p.add_argument("--policy", default="", help="count --model compressed by this policy: a published name "
                   f"({', '.join(pruning.published_policy_names())}) or a policy JSON file")
    p.add_argument("--round-to", type=int, default=None, help="with --policy: neuron counts at multiples of N "
                   "(default: the policy file's, as the search counted it; 1 for a published policy)")
    p.add_argument("--flops-convention", default=None, choices=CONVENTIONS,
                   help="which count --json reports as gmacs, and with --policy which rounding builds the model "
                        "(exact: every MAC, counts rounded to nearest; original: the original's compute_flops, "
                        "blocks only, int() rounding; default: the policy file's, as the search counted it, "
                        "else exact). Both are always shown.")
    p.add_argument("--input-size", "--input_size", dest="input_size", type=int, default=None,
                   help="image size in pixels (default: the model's)")
    p.add_argument("--num-classes", "--nb_classes", dest="num_classes", type=int, default=None)
    p.add_argument("--json", action="store_true",
                   help="print one JSON line: gmacs (in --flops-convention), gmacs_exact, gmacs_original, params")
    return p


def main(argv=None):
    """The CLI: prints GMACs and params; every failure is one line on stderr and exit code 2."""
    from models import build_model, load  # the CLI's: counting itself needs only live modules
    args = _build_parser().parse_args(argv)
    try:
        if args.resume:
            model, arch, _ = load(args.resume, model_name=None if args.model == DEFAULT_MODEL else args.model,
                                  input_size=args.input_size)
            name, size = args.resume, arch["input_size"]
            if args.policy and arch.get("prune_spec"):
                raise UserError(f"{args.resume} is already compressed; --policy applies to a dense model")
        else:
            kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
            model = build_model(args.model, img_size=args.input_size, **kwargs)
            name, size = args.model, args.input_size
        original = model_macs(model, size, convention="original")
        convention = args.flops_convention or "exact"
        if args.policy:
            policy, source = pruning.load_policy(args.policy)
            # a search's best_policy.json records how it counted: its convention (which sets the rounding)
            # and round_to, used unless given here
            recorded = pruning.read_policy_file(args.policy)[2] if os.path.isfile(args.policy) else {}
            convention = args.flops_convention or recorded.get("flops_convention", "exact")
            if convention not in CONVENTIONS:
                raise UserError(f"{args.policy} records flops_convention {convention!r}, not one of "
                                f"{', '.join(CONVENTIONS)}; pass --flops-convention")
            rounding = "exact" if convention == "exact" else "original"
            round_to = args.round_to or recorded.get("round_to", 1)
            dims = pruning.model_dims(model)
            identity = {"heads": [list(range(h)) for h in dims["num_heads"]],   # counts do not depend on
                        "neurons": [list(range(m)) for m in dims["mlp_hidden"]]}  # which components go
            spec = pruning.policy_to_spec(policy, identity, dims, round_to=round_to, rounding=rounding)
            pruning.apply_spec(model, spec)
            # a policy's budget in the original convention is the original's formula
            original = {"macs": int(round(policy_gmacs(dims, pruning.policy_to_vector(policy), round_to,
                                                       "original") * 1e9))}
            name = f"{name} + policy {source} ({rounding} rounding)"
        exact = model_macs(model, size)
    except (UserError, ValueError) as exc:  # SpecError is a ValueError: a block type we cannot count
        print(f"error: {exc}", file=sys.stderr)
        return 2
    chosen = exact if convention == "exact" else original
    if args.json:
        print(json.dumps({"model": name, "convention": convention, "gmacs": round(chosen["macs"] / 1e9, 6),
                          "macs": chosen["macs"], "gmacs_exact": round(exact["macs"] / 1e9, 6),
                          "gmacs_original": round(original["macs"] / 1e9, 6), "params": exact["params"]}))
    else:
        print(f"{name}: {exact['macs'] / 1e9:.4f} GMACs exact, {original['macs'] / 1e9:.4f} GMACs in the "
              f"original's convention (blocks only), {exact['params'] / 1e6:.2f} M params")
    return 0


if __name__ == "__main__":
    sys.exit(main())
