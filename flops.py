"""Exact multiply-accumulates (MACs) and parameter counts of dense and compressed timm ViTs.

Convention (the paper's and the DeiT model cards'): "FLOPs" are multiply-accumulates of the
patch-embedding convolution, every block's qkv projection, q @ k^T, attn @ v, output projection,
MLP fc1 and fc2, the class-token attention row of a token-reducing block (q_cls @ K^T), and the
classifier head(s). Norms, softmax, GELU, residual adds, biases, token gathering and fusing are
not counted. DeiT-Ti / S / B at 224 px: 1.26 / 4.61 / 17.58 GMACs.

Token counts follow ``pruning.tokens_after_reduction``: a reducing block runs its attention on the
tokens it receives and its MLP on ``prefix + kept + 1`` tokens when it drops any.

    python flops.py --model deit_small_patch16_224 [--input-size 224] [--num-classes 1000] [--json]
    python flops.py --resume compressed_model_file [--json]
"""
import argparse
import json
import sys

import numpy as np
import torch.nn as nn

import pruning
from models import build_model, load
from utils import UserError

DEFAULT_MODEL = "deit_small_patch16_224"


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


def _block_macs(blk, n_in, num_prefix):
    """MACs of one block receiving ``n_in`` tokens, and the token count it hands on."""
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
        if active:
            macs += n_in * attn_dim                          # class-token attention row
    macs += n_out * (mlp.fc1.in_features * mlp.fc1.out_features + mlp.fc2.in_features * mlp.fc2.out_features)
    return macs, n_out


def model_macs(model, input_size=None):
    """{"macs": int, "params": int, "gmacs": float} of ``model`` at ``input_size`` (int, (H, W) or
    (C, H, W); default the model's image size), from its live shapes and token schedule."""
    blocks = pruning.vit_blocks(model)
    if getattr(model, "attn_pool", None) is not None:
        raise ValueError("attention-pool heads (global_pool='map') are not supported by model_macs")
    pe = model.patch_embed
    conv = pe.proj
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"patch embedding projection is a {type(conv).__name__}, expected Conv2d")
    height, width = _input_hw(input_size, pe)
    num_patches = _conv_out(height, conv, 0) * _conv_out(width, conv, 1)
    macs = num_patches * conv.out_channels * (conv.in_channels // conv.groups) * conv.kernel_size[0] * conv.kernel_size[1]
    num_prefix = int(getattr(model, "num_prefix_tokens", 1))
    n_tok = num_prefix + num_patches
    for blk in blocks:
        m, n_tok = _block_macs(blk, n_tok, num_prefix)
        macs += m
    heads = pruning.classifier_heads(model)
    vectors = n_tok if (len(heads) == 1 and getattr(model, "global_pool", "token") == "") else 1
    for head in heads:
        macs += vectors * head.in_features * head.out_features
    params = sum(p.numel() for p in model.parameters())
    return {"macs": int(macs), "params": int(params), "gmacs": macs / 1e9}


def policy_gmacs(dims, X, round_to=1):
    """GMACs of the models that policies ``X`` ([n, 2L+1] or [2L+1]) would give, without building them.

    ``dims`` are the dense model's ``pruning.model_dims``; ``round_to`` rounds neuron counts as in
    ``pruning.policy_to_spec``. Equals ``model_macs(apply_spec(dense, policy_to_spec(...)))["macs"] / 1e9``.
    """
    X = np.asarray(X, dtype=np.float64)
    single = X.ndim == 1
    X = np.atleast_2d(X)
    depth = int(dims["depth"])
    if X.ndim != 2 or X.shape[1] != 2 * depth + 1:
        raise pruning.SpecError(f"policy vectors must have 2*{depth}+1 = {2 * depth + 1} entries, got shape {X.shape}")
    width, hd = int(dims["embed_dim"]), int(dims["head_dim"])
    num_prefix, num_patches = int(dims["num_prefix_tokens"]), int(dims["num_patches"])
    heads_kept = pruning.kept_count(np.asarray(dims["num_heads"], np.int64)[None, :], X[:, :depth])
    neurons_kept = pruning.kept_count(np.asarray(dims["mlp_hidden"], np.int64)[None, :], X[:, depth:2 * depth], round_to)
    rate = X[:, 2 * depth]
    pruning.check_ratio(rate, "token rate")
    schedule = pruning.token_schedule(depth)
    keep = {b: pruning.kept_tokens(num_patches, kr)
            for b, kr in zip(schedule, pruning.token_keep_rates(rate, len(schedule)))}
    qkv_per_chan = 4 if dims.get("attn_gate") else 3
    n_tok = np.full(X.shape[0], num_prefix + num_patches, dtype=np.int64)
    ph, pw = dims["patch_size"]
    macs = np.full(X.shape[0], num_patches * width * int(dims["in_chans"]) * ph * pw, dtype=np.int64)
    for b in range(depth):
        attn_dim = heads_kept[:, b] * hd
        macs += n_tok * width * attn_dim * (qkv_per_chan + 1) + 2 * n_tok * n_tok * attn_dim
        n_out = n_tok
        if b in keep:
            n_out, active = pruning.tokens_after_reduction(n_tok, num_prefix, keep[b])
            n_out = n_out.astype(np.int64)
            macs += np.where(active, n_tok * attn_dim, 0)
        macs += 2 * n_out * width * neurons_kept[:, b]
        n_tok = n_out
    n_heads = int(dims.get("num_classifier_heads", 1))
    vectors = n_tok if (n_heads == 1 and dims.get("global_pool", "token") == "") else 1
    macs += vectors * n_heads * width * int(dims["num_classes"])
    out = macs / 1e9
    return out[0] if single else out


def _build_parser():
    p = argparse.ArgumentParser(description="GMACs and parameters of a timm ViT or of a compressed-model file")
    p.add_argument("--model", default=DEFAULT_MODEL, help="timm ViT name or preset of models.py (built with pretrained=False)")
    p.add_argument("--resume", default="", help="a model file (this tool's, dense or compressed; DeiT/timm "
                   "checkpoints and state dicts with --model NAME)")
    p.add_argument("--input-size", "--input_size", dest="input_size", type=int, default=None,
                   help="image size in pixels (default: the model's)")
    p.add_argument("--num-classes", "--nb_classes", dest="num_classes", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON line with keys gmacs and params")
    return p


def main(argv=None):
    """The CLI: prints GMACs and params; every failure is one line on stderr and exit code 2."""
    args = _build_parser().parse_args(argv)
    try:
        if args.resume:
            model, arch, _ = load(args.resume, model_name=None if args.model == DEFAULT_MODEL else args.model,
                                  input_size=args.input_size)
            name, size = args.resume, arch["input_size"]
        else:
            kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
            model = build_model(args.model, img_size=args.input_size, **kwargs)
            name, size = args.model, args.input_size
        stats = model_macs(model, size)
    except (UserError, ValueError) as exc:  # SpecError is a ValueError: a block type we cannot count
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"model": name, "gmacs": round(stats["macs"] / 1e9, 6), "params": stats["params"],
                          "macs": stats["macs"]}))
    else:
        print(f"{name}: {stats['macs'] / 1e9:.3f} GMACs, {stats['params'] / 1e6:.2f} M params")
    return 0


if __name__ == "__main__":
    sys.exit(main())
