"""Speed of the dependency criterion: vectorised (dependency_criterion.compute_scores) against a
per-component loop (one kernel matrix, one explicit H product at a time, as a straightforward
implementation would do it), scoring every head and MLP neuron of a timm ViT on one batch.

    python benchmarks/bench_criterion.py                       # deit_small, 64 x 224 px, CPU
    python benchmarks/bench_criterion.py --loop-neurons 64     # time more of the loop

Both sides start from the same captured internals (one forward with hooks); the "criterion part"
is the comparison the issue asks for, and an end-to-end figure (forward included) is printed too.
The loop is slow, so by default it is timed on every head of every block but only on the first
--loop-neurons neurons of each block, and the neuron part is extrapolated linearly to all neurons
(each neuron costs the same); the output says so. --loop-neurons 0 times the whole loop.
Rounds are interleaved and the best of each side is kept, so a busy machine hurts both alike.
"""
import argparse
import os
import sys
import time

import torch
import timm
from timm.layers import Mlp
from timm.models.vision_transformer import Attention

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dependency_criterion as dc  # noqa: E402


def loop_kernel(x, bandwidth):
    """Gaussian kernel of one component, x [n, d]."""
    n, d = x.shape
    D = torch.cdist(x, x) ** 2
    if bandwidth == "multi":
        z = (x - x.mean()) / x.std(correction=0).clamp_min(1e-12)
        D = torch.cdist(z, z) ** 2 / d
        return sum(torch.exp(-D / (2 * s * s)) for s in dc.MULTI_SIGMAS) / len(dc.MULTI_SIGMAS)
    med = D[torch.triu(torch.ones(n, n, dtype=torch.bool), 1)].median().clamp_min(1e-30)
    return torch.exp(-D / (2 * med))


def loop_hsic(K, L, H):
    n = K.shape[0]
    return torch.trace(K @ H @ L @ H) / (n - 1) ** 2


@torch.no_grad()
def capture(model, images):
    """One forward; per block the input of attn.proj and of mlp.fc2, and the softmax output."""
    store, handles = {}, []
    for i, blk in enumerate(model.blocks):
        for m in blk.modules():
            if isinstance(m, Attention):
                handles.append(m.proj.register_forward_hook(
                    lambda mod, inp, out, i=i: store.__setitem__(("h", i), inp[0])))
            if isinstance(m, Mlp):
                handles.append(m.fc2.register_forward_hook(
                    lambda mod, inp, out, i=i: store.__setitem__(("n", i), inp[0])))
    try:
        P = model(images).softmax(-1)
    finally:
        for h in handles:
            h.remove()
    return store, P


@torch.no_grad()
def loop_scores(model, store, P, bandwidth, neuron_limit):
    """Per-component loop; returns (seconds for heads, seconds for the neurons timed, neurons timed)."""
    n = P.shape[0]
    H = torch.eye(n) - torch.full((n, n), 1.0 / n)
    L = P @ P.T
    t_heads = t_neurons = 0.0
    timed = 0
    for i, blk in enumerate(model.blocks):
        attn = next(m for m in blk.modules() if isinstance(m, Attention))
        t0 = time.perf_counter()
        x = store[("h", i)]
        hd = attn.head_dim
        Ks = [loop_kernel(x[:, :, h * hd:(h + 1) * hd].mean(-1), bandwidth) for h in range(attn.num_heads)]
        for h, K in enumerate(Ks):
            rel = loop_hsic(K, L, H)
            red = sum(loop_hsic(K, Ks[g], H) for g in range(len(Ks)) if g != h) / (len(Ks) - 1)
            _ = rel - 0.1 * red
        t_heads += time.perf_counter() - t0
        a = store[("n", i)]
        M = a.shape[-1] if neuron_limit <= 0 else min(neuron_limit, a.shape[-1])
        t0 = time.perf_counter()
        for j in range(M):
            _ = loop_hsic(loop_kernel(a[:, :, j], bandwidth), L, H)
            _ = a[:, :, j].abs().mean()
        t_neurons += time.perf_counter() - t0
        timed += M
    return t_heads, t_neurons, timed


@torch.no_grad()
def vectorised_criterion(model, store, P, bandwidth, neuron_chunk):
    """The criterion part of dc.compute_scores (what its hooks and the post-forward step compute) on
    captured internals."""
    Lc = dc.center_kernel(dc.linear_kernel(P))
    for i, blk in enumerate(model.blocks):
        attn = next(m for m in blk.modules() if isinstance(m, Attention))
        dc.block_stats(dc.head_features(store[("h", i)], attn.num_heads), store[("n", i)], Lc,
                        bandwidth, neuron_chunk)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--bandwidth", default=dc.DEFAULT_BANDWIDTH, choices=dc.BANDWIDTHS)
    ap.add_argument("--neuron-chunk", type=int, default=512)
    ap.add_argument("--loop-neurons", type=int, default=32,
                    help="neurons per block timed in the loop (0 = all, no extrapolation)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved rounds (vectorised, loop, ...); the best of each is reported")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, img_size=args.img_size).eval()
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    loader = [(images, torch.zeros(args.batch_size, dtype=torch.long))]
    n_heads = sum(b.attn.num_heads for b in model.blocks)
    n_neurons = sum(b.mlp.fc1.out_features for b in model.blocks)
    print(f"model {args.model}  depth {len(model.blocks)}  heads {n_heads}  neurons {n_neurons}  "
          f"batch {args.batch_size} x {args.img_size}px  bandwidth {args.bandwidth}  "
          f"neuron_chunk {args.neuron_chunk}  torch threads {torch.get_num_threads()}  device cpu")

    store, P = capture(model, images)  # also the warm-up forward
    inf = float("inf")
    t_fwd = t_e2e = t_vec = t_heads = t_neu = inf
    timed = 0
    # Interleaved rounds, best of each: a shared machine's load hits both sides alike.
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        vectorised_criterion(model, store, P, args.bandwidth, args.neuron_chunk)
        t_vec = min(t_vec, time.perf_counter() - t0)
        th, tn, timed = loop_scores(model, store, P, args.bandwidth, args.loop_neurons)
        t_heads, t_neu = min(t_heads, th), min(t_neu, tn)
    for _ in range(2):
        with torch.no_grad():
            t0 = time.perf_counter()
            model(images)
            t_fwd = min(t_fwd, time.perf_counter() - t0)
        t0 = time.perf_counter()
        dc.compute_scores(model, loader, num_batches=1, bandwidth=args.bandwidth,
                          neuron_chunk=args.neuron_chunk)
        t_e2e = min(t_e2e, time.perf_counter() - t0)

    t_neu_all = t_neu * n_neurons / timed
    t_loop = t_heads + t_neu_all
    print(f"criterion part (given the captured head outputs / MLP activations), best of {args.rounds}:")
    print(f"  vectorised, all heads + neurons  : {t_vec:8.2f} s")
    print(f"  per-component loop, heads        : {t_heads:8.2f} s   (all {n_heads} heads, timed)")
    if timed < n_neurons:
        print(f"  per-component loop, neurons      : {t_neu_all:8.2f} s   (EXTRAPOLATED linearly: timed "
              f"{timed} of {n_neurons} neurons ({args.loop_neurons} per block) = {t_neu:.2f} s, "
              f"x{n_neurons / timed:.1f})")
    else:
        print(f"  per-component loop, neurons      : {t_neu_all:8.2f} s   (all {n_neurons}, timed)")
    print(f"  per-component loop, total        : {t_loop:8.2f} s")
    print(f"  speed-up                         : {t_loop / t_vec:8.1f}x")
    print("end to end, best of 2:")
    print(f"  forward pass alone               : {t_fwd:8.2f} s")
    print(f"  dc.compute_scores (fwd + hooks + criterion) : {t_e2e:8.2f} s")
    print(f"  forward + per-component loop     : {t_fwd + t_loop:8.2f} s")
    print(f"  speed-up                         : {(t_fwd + t_loop) / t_e2e:8.1f}x")


if __name__ == "__main__":
    main()
