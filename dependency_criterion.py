"""Ranking every attention head and MLP neuron of a timm ViT: the paper's dependency criterion
(HSIC) and the criteria it is compared with (first-order Taylor, this tool's default; weight
magnitude; random). ``rank_model`` is the entry point.

Pure tensors in, scores out. The estimator is the biased empirical HSIC

    HSIC(K, L) = trace(K H L H) / (n - 1)^2,    H = I - 11^T / n,

computed without forming H: since H is idempotent, trace(K H L H) = sum_ij K_ij (H L H)_ij, so one
side is double-centred (subtract row and column means, add back the grand mean) and the result is an
elementwise product summed over the last two dims. That broadcasts over any leading batch of
components, so a whole block (all heads, or a chunk of neurons) is one batched op.

Features (one vector per image, per component):
  * head h: the head's output over the N tokens, averaged over the head dimension (the input of
    ``attn.proj`` is the concatenation of per-head outputs, [B, N, H * head_dim]);
  * neuron j: its activation over the N tokens (the input of ``mlp.fc2``, [B, N, hidden]).
The same two tensors exist in EVA-02 blocks (EvaAttention / AttentionRope, whose proj reads the
heads' outputs after the rope'd attention; SwiGLU / GluMlp, whose fc2 reads SiLU(gate) * x), so
every criterion ranks their heads and neurons the same way.
Features get a Gaussian kernel, the prediction (softmax of the model output) a linear kernel.

Two kernels (``kernel=``):
  * "scaled" (default): distances are scaled per component, by the median distance
    (bandwidth="median") or by the variance and the feature length (bandwidth="multi", on
    standardised features), and HSIC is trace(K H L H) / (n - 1)^2;
  * "original": the original implementation's kernel (Hou & Kung 2022, zejiangh/Multi-dimensional-
    vit-compression): the average of exp(-||xi - xj||^2 / (2 sigma^2)) over sigma in 1, 2, 4, 8, 16
    on the RAW features (its standardisation line subtracts mean / std from every sample, a shift
    that leaves distances unchanged), no division by the feature length, and HSIC is
    trace((H K H)(H L H)) = trace(K H L H) with no 1 / (n - 1)^2 factor. Its score formulas are
    the ones below with head_normalize=False, lambda 0.1 and alpha 0.1 (compute_scores' defaults
    for this kernel); it ranked on one augmented training batch with the model in train mode
    (``original_criterion_kwargs``).

Scores (higher = more important):
  * head:   relevance - head_lambda * mean redundancy with the other heads of its block,
            relevance = HSIC(K_head, L_pred), redundancy = HSIC(K_head, K_other_head); with
            head_normalize both are divided by sqrt(HSIC(K_head, K_head)) (normalised HSIC);
  * neuron: neuron_alpha * minmax(relevance) + (1 - neuron_alpha) * minmax(mean |activation|),
            where minmax rescales a block's values to [0, 1] ((x - min) / (max - min); a block whose
            values are all equal maps to 0). Min-max makes the two terms commensurable whatever
            their raw scales, so alpha really is the weight of relevance.

Kernels are built inside forward hooks as each block runs (they do not depend on the prediction),
and only the strict upper triangle of each neuron's kernel is kept until the prediction is known
(the diagonal is exactly 1), so no block's activations outlive its forward.

Statistics are summed over batches (per-batch HSIC values, sums of |activation| and element
counts); under torch.distributed the sums and counts are all-reduced before anything is averaged,
normalised or combined, so every rank computes the same scores as one process over the union of
the ranks' batches.
"""

import numpy as np
import torch
import torch.distributed as dist
from timm.layers import AttentionRope, GluMlp, Mlp, SwiGLU
from timm.models.eva import EvaAttention
from timm.models.vision_transformer import Attention

from flags import BANDWIDTHS, CRITERIA, KERNELS, MAGNITUDES
from models import class_logits

__all__ = [
    "MULTI_SIGMAS",
    "KERNELS",
    "original_criterion_kwargs",
    "center_kernel",
    "hsic",
    "hsic_pairwise",
    "gaussian_kernel",
    "linear_kernel",
    "compute_scores",
    "rank_components",
    "rank_model",
    "hsic_statistics",
    "scores_from_statistics",
    "taylor_scores",
]

# Bandwidths of the original's multi-scale Gaussian kernel (on raw features in the original; on
# standardised, length-scaled features with kernel="scaled", bandwidth="multi").
MULTI_SIGMAS = (1.0, 2.0, 4.0, 8.0, 16.0)
DEFAULT_BANDWIDTH = "median"
DEFAULT_KERNEL = "scaled"
DEFAULT_HEAD_LAMBDA = 0.1
DEFAULT_NEURON_ALPHA = 0.1
DEFAULT_HEAD_NORMALIZE = True  # chosen on a tune split of training images: see benchmarks/bench_criterion_evidence.py
_EPS = 1e-12


# ----------------------------------------------------------------------------------------------
# kernels and the estimator
# ----------------------------------------------------------------------------------------------

def _work_dtype(t):
    """float64 stays float64; everything else (fp16/bf16/fp32) is computed in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def center_kernel(K):
    """H K H for K [..., n, n] (double centring by row/column/grand means; no H is formed)."""
    return (K - K.mean(dim=-1, keepdim=True) - K.mean(dim=-2, keepdim=True)
            + K.mean(dim=(-2, -1), keepdim=True))


def hsic(K, L):
    """Biased HSIC trace(K H L H) / (n-1)^2 for every leading batch entry of K [..., n, n].

    L is [n, n] or broadcastable against K. Returns a tensor of K's (broadcast) batch shape.
    """
    n = K.shape[-1]
    if n < 2:
        raise ValueError("HSIC needs at least two samples")
    return (K * center_kernel(L)).sum(dim=(-2, -1)) / (n - 1) ** 2


def hsic_pairwise(K, kernel=DEFAULT_KERNEL):
    """All-pairs HSIC between the C kernels of K [C, n, n] -> [C, C] (one matmul).
    kernel="original" leaves out the 1 / (n-1)^2 factor, as the original does."""
    C, n = K.shape[0], K.shape[-1]
    if n < 2:
        raise ValueError("HSIC needs at least two samples")
    Kc = center_kernel(K).reshape(C, n * n)
    return (Kc @ K.reshape(C, n * n).transpose(0, 1)) / _hsic_norm(n, kernel)


def _hsic_norm(n, kernel):
    """The estimator's divisor: (n-1)^2, or 1 for the original's unnormalised trace."""
    return 1.0 if kernel == "original" else float((n - 1) ** 2)


def _check_kernel(kernel, bandwidth):
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")
    if bandwidth not in BANDWIDTHS:
        raise ValueError(f"unknown bandwidth {bandwidth!r}; expected one of {BANDWIDTHS}")


def _kernel_of_centred(x, bandwidth, triu=None, kernel=DEFAULT_KERNEL):
    """Gaussian kernels of x [C, n, d], contiguous, each component already centred (its n*d values
    have mean 0; centring leaves distances unchanged but keeps the Gram-based ones accurate).

    Returns [C, n, n]; with triu (torch.triu_indices(n, n, 1)) only the strict upper triangles,
    [C, n(n-1)/2] (the diagonal is exactly 1), which halves the exponentials.
    kernel="original" averages the MULTI_SIGMAS kernels of the raw distances (bandwidth is ignored).
    """
    C, n, d = x.shape
    sq = (x * x).sum(dim=-1)  # [C, n]
    D = torch.baddbmm(sq.unsqueeze(-1) + sq.unsqueeze(-2), x, x.transpose(-2, -1), alpha=-2.0)
    D.clamp_min_(0.0)
    D.diagonal(dim1=-2, dim2=-1).zero_()
    iu = triu if triu is not None else torch.triu_indices(n, n, offset=1, device=D.device)
    if bandwidth == "multi" or kernel == "original":
        if triu is not None:
            D = D[:, iu[0], iu[1]].unsqueeze(1)
        if kernel != "original":
            # Standardising (x - mean) / std only rescales squared distances by 1 / var, and with x
            # centred var is sum(sq) / (n d): fold 1 / (var d) into the distances instead.
            var = sq.sum(dim=-1) / (n * d)
            D.mul_((1.0 / (var.clamp_min(_EPS * _EPS) * d)).view(C, 1, 1))
        K = torch.zeros_like(D)
        tmp = torch.empty_like(D)
        for sigma in MULTI_SIGMAS:  # 5 fixed scales, each one batched op over all components
            torch.mul(D, -0.5 / (sigma * sigma), out=tmp)
            K.add_(tmp.exp_())
        K.mul_(1.0 / len(MULTI_SIGMAS))
        return K.squeeze(1) if triu is not None else K
    if bandwidth == "median":
        U = D[:, iu[0], iu[1]]
        med = _lower_median(U).to(D.device) if n > 1 else torch.ones(C, dtype=D.dtype, device=D.device)
        tiny = torch.finfo(D.dtype).tiny
        scale = (-0.5 / med.clamp_min(tiny))
        if triu is not None:
            return U.mul_(scale.view(C, 1)).exp_()
        return D.mul_(scale.view(C, 1, 1)).exp_()
    raise ValueError(f"unknown bandwidth {bandwidth!r}; expected one of {BANDWIDTHS}")


def gaussian_kernel(feats, bandwidth=DEFAULT_BANDWIDTH, kernel=DEFAULT_KERNEL):
    """Gaussian kernel matrices of C components over n samples: feats [C, n, d] -> [C, n, n].

    kernel="original": the average over sigma in MULTI_SIGMAS of exp(-||xi - xj||^2 / (2 sigma^2))
        on the raw features (bandwidth is ignored). Otherwise (kernel="scaled"):

    bandwidth="multi": each component is standardised over all its n*d values, (x - mean) / std,
        and the kernel is the average over sigma in MULTI_SIGMAS of exp(-||xi - xj||^2 / (2 sigma^2 d)).
        Dividing by the feature length d (as the HSIC-bottleneck kernel the original builds on does)
        keeps the sigma grid meaningful whether a feature spans 17 tokens or 197.
    bandwidth="median": exp(-||xi - xj||^2 / (2 s^2)) with s^2 the median off-diagonal squared
        distance of that component (the median heuristic; scale-free, so no standardisation).
    A constant component gets the all-ones kernel, whose HSIC with anything is 0.
    """
    if feats.dim() != 3:
        raise ValueError(f"feats must be [C, n, d], got {tuple(feats.shape)}")
    _check_kernel(kernel, bandwidth)
    x = feats.to(_work_dtype(feats))
    x = (x - x.mean(dim=(1, 2), keepdim=True)).contiguous()
    return _kernel_of_centred(x, bandwidth, kernel=kernel)


def linear_kernel(y):
    """Linear kernel y y^T of per-sample vectors y [n, k] -> [n, n]."""
    y = y.to(_work_dtype(y))
    return y @ y.transpose(0, 1)


# ----------------------------------------------------------------------------------------------
# model traversal
# ----------------------------------------------------------------------------------------------

def _unwrap(model):
    # DistributedDataParallel / DataParallel keep the real model in .module
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def _find(block, cls):
    for m in block.modules():
        if isinstance(m, cls):
            return m
    return None


_ATTENTIONS = (Attention, EvaAttention, AttentionRope)   # timm ViT, EVA-02 (dense, and sliced: pruning.py)
_MLPS = (Mlp, GluMlp, SwiGLU)


def _block_parts(model):
    """[(attention or None, MLP or None)] per entry of model.blocks, found by isinstance."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError("expected a timm VisionTransformer with a .blocks container")
    return [(_find(b, _ATTENTIONS), _find(b, _MLPS)) for b in blocks]


def _neurons(mlp):
    """Hidden neurons of an MLP (or 0 for None): its fc2's input width (a GluMlp's fc1 has two rows each)."""
    return 0 if mlp is None else int(mlp.fc2.in_features)


def _head_in_weight(attn):
    """The q, k and v rows of an attention's input projections, [3 * H * hd, C] (fused or not)."""
    if getattr(attn, "qkv", None) is not None:
        return attn.qkv.weight
    return torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])


def _neuron_in_weight(mlp):
    """Every input weight of each hidden neuron, [M, C] (Mlp) or [M, 2C] (SwiGLU's fc1_g and fc1_x,
    GluMlp's two halves of fc1)."""
    if isinstance(mlp, SwiGLU):
        return torch.cat([mlp.fc1_g.weight, mlp.fc1_x.weight], dim=1)
    if isinstance(mlp, GluMlp):
        return torch.cat(mlp.fc1.weight.chunk(2, dim=0), dim=1)
    return mlp.fc1.weight


def _model_device(model):
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# criteria
# ----------------------------------------------------------------------------------------------

def _minmax(v):
    if v.numel() == 0:
        return v
    lo, hi = v.min(), v.max()
    span = hi - lo
    if span <= 0:
        return torch.zeros_like(v)
    return (v - lo) / span


def head_features(x, num_heads):
    """input of attn.proj [B, N, H*hd] -> per-head features [H, B, N] (mean over head dim)."""
    B, N, _ = x.shape
    return x.reshape(B, N, num_heads, -1).mean(dim=-1).permute(2, 0, 1)


def _head_contribution(x, proj_weight, num_heads):
    """Sum over images and tokens of the L2 norm of each head's contribution to the residual
    stream: x [B, N, H*hd] (input of attn.proj), proj_weight [D, H*hd] -> [H] float64. Head h adds
    x_h W_h^T (its hd columns of proj; the bias is shared by all heads and left out)."""
    B, N, _ = x.shape
    xh = x.reshape(B, N, num_heads, -1)
    W = proj_weight.detach().to(x.dtype).reshape(proj_weight.shape[0], num_heads, -1)
    return torch.stack([torch.linalg.vector_norm(xh[:, :, h] @ W[:, h].t(), dim=-1).sum(dtype=torch.float64)
                        for h in range(num_heads)])


def _magnitude_scores(parts):
    """Weight-magnitude baseline.

    head h: sum of |w| over the rows of qkv that produce its q, k and v, plus the columns of proj
            that read its output (all of the head's weights, L1);
    neuron j: ||fc1.weight[j, :]||_2 * ||fc2.weight[:, j]||_2 (the gain of its in->out path).
    """
    heads, neurons = [], []
    for attn, mlp in parts:
        if attn is None:
            heads.append(torch.zeros(0, dtype=torch.float64))
        else:
            H, hd = attn.num_heads, attn.head_dim
            qkv = _head_in_weight(attn).detach().abs().double()  # [3*H*hd, C]
            proj = attn.proj.weight.detach().abs().double()  # [C, H*hd]
            s = qkv.reshape(3, H, hd, -1).sum(dim=(0, 2, 3)) + proj.reshape(-1, H, hd).sum(dim=(0, 2))
            heads.append(s.cpu())
        if mlp is None:
            neurons.append(torch.zeros(0, dtype=torch.float64))
        else:
            w1 = _neuron_in_weight(mlp).detach().double()  # [hidden, C] (gated: [hidden, 2C])
            w2 = mlp.fc2.weight.detach().double()  # [C, hidden]
            neurons.append((w1.norm(dim=1) * w2.norm(dim=0)).cpu())
    return {"heads": heads, "neurons": neurons}


def _random_scores(parts, seed):
    g = torch.Generator().manual_seed(int(seed))
    heads, neurons = [], []
    for attn, mlp in parts:
        heads.append(torch.rand(attn.num_heads if attn is not None else 0, generator=g, dtype=torch.float64))
        hidden = _neurons(mlp)
        neurons.append(torch.rand(hidden, generator=g, dtype=torch.float64))
    return {"heads": heads, "neurons": neurons}


def _lower_median(U):
    """Lower median of each row of U [C, m] (torch.median's convention). On the CPU numpy's
    introselect (np.partition) is about twice as fast as torch.median and returns the same value."""
    k = (U.shape[1] - 1) // 2
    if U.device.type == "cpu":
        return torch.from_numpy(np.partition(U.numpy(), k, axis=1)[:, k].copy())
    return U.median(dim=1).values


def neuron_kernels(acts, bandwidth, neuron_chunk, kernel=DEFAULT_KERNEL):
    """Upper triangles of the Gaussian kernels of every neuron of one block.

    acts [B, N, M] (the input of fc2) -> (Ku [M, B(B-1)/2] in the work dtype, the strict upper
    triangle of each neuron's kernel in torch.triu_indices order; sum |activation| [M], float64).
    The diagonal of a Gaussian kernel is exactly 1 (distances are zeroed there), so the upper
    triangle is all HSIC with a symmetric L needs (see _relevance), and it is what is kept between
    the forward hook and the prediction: B(B-1)/2 values per neuron instead of B*N activations.
    """
    B, N, M = acts.shape
    a2d = acts.reshape(B * N, M)
    chunk = min(int(neuron_chunk), M)
    buf = torch.empty(chunk, B * N, dtype=_work_dtype(acts), device=acts.device)
    iu = torch.triu_indices(B, B, offset=1, device=acts.device)
    Ku = torch.empty(M, iu.shape[1], dtype=buf.dtype, device=acts.device)
    mag = torch.empty(M, dtype=torch.float64, device=acts.device)
    tile = 256  # rows per tile of the transposing copy (cache-sized tiles: ~3x a plain strided copy)
    for j0 in range(0, M, chunk):
        c = min(chunk, M - j0)
        x = buf[:c]
        src = a2d[:, j0:j0 + c]
        for r0 in range(0, B * N, tile):
            x[:, r0:r0 + tile].copy_(src[r0:r0 + tile].t())  # neuron-first layout [c, B*N]
        mag[j0:j0 + c] = torch.linalg.vector_norm(x, 1, dim=1, dtype=torch.float64)
        x.sub_(x.mean(dim=1, keepdim=True))  # centre each neuron over its B*N values
        Ku[j0:j0 + c] = _kernel_of_centred(x.view(c, B, N), bandwidth, triu=iu, kernel=kernel)
    return Ku, mag


def _relevance(Ku, Lc, norm):
    """HSIC of upper-triangle kernels Ku [C, n(n-1)/2] (unit diagonal) with the centred L:
    sum_ij K_ij Lc_ij = 2 sum_{i<j} K_ij Lc_ij + trace(Lc)."""
    n = Lc.shape[-1]
    iu = torch.triu_indices(n, n, offset=1, device=Lc.device)
    Lu = Lc[iu[0], iu[1]].to(Ku.dtype)
    return ((2.0 * (Ku @ Lu) + torch.trace(Lc).to(Ku.dtype)) / norm).double()


class _Capture:
    """Forward hooks on attn.proj / mlp.fc2 that turn one batch's internals into kernels at once.

    Per block and batch it keeps the heads' kernel matrices [H, n, n] with their pairwise HSIC
    [H, H] (neither depends on the prediction), and the upper triangles of the neurons' kernels
    [M, n(n-1)/2] with their sums of |activation|. Only the prediction-dependent products are left
    for after the forward. Peak memory is therefore 12 x M x n(n-1)/2 floats rather than every
    block's fc2 input (12 x n x N x M): for DeiT-B at batch 128, 1.2 GB instead of 3.7 GB.
    The hooks are removed by close(), which compute_scores calls in a finally block.
    """

    def __init__(self, parts, bandwidth, neuron_chunk, kernel=DEFAULT_KERNEL):
        self.bandwidth, self.neuron_chunk, self.kernel = bandwidth, neuron_chunk, kernel
        self.heads = [None] * len(parts)    # (Kh [H, n, n], R [H, H], sum ||contribution|| [H], tokens)
        self.neurons = [None] * len(parts)  # (Ku [M, n(n-1)/2], sum|a| [M], count)
        self._handles = []
        for i, (attn, mlp) in enumerate(parts):
            if attn is not None:
                self._handles.append(attn.proj.register_forward_hook(self._head_hook(i, attn)))
            if mlp is not None:
                self._handles.append(mlp.fc2.register_forward_hook(self._neuron_hook(i)))

    def _head_hook(self, i, attn):
        def hook(module, inputs, output):
            x = inputs[0]
            if x.shape[0] < 2:
                return
            Kh = gaussian_kernel(head_features(x, attn.num_heads), self.bandwidth, self.kernel)
            self.heads[i] = (Kh, hsic_pairwise(Kh, self.kernel), _head_contribution(x, module.weight, attn.num_heads),
                             x.shape[0] * x.shape[1])
        return hook

    def _neuron_hook(self, i):
        def hook(module, inputs, output):
            a = inputs[0]
            if a.shape[0] < 2:
                return
            Ku, mag = neuron_kernels(a, self.bandwidth, self.neuron_chunk, self.kernel)
            self.neurons[i] = (Ku, mag, a.shape[0] * a.shape[1])
        return hook

    def clear(self):
        self.heads = [None] * len(self.heads)
        self.neurons = [None] * len(self.neurons)

    def close(self):
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()


def _prediction(out):
    out = class_logits(out)
    return out.to(_work_dtype(out)).softmax(dim=-1)


def _head_stats(Kh, R, Lc, kernel=DEFAULT_KERNEL):
    """(relevance [H], mean redundancy [H], self-dependence HSIC(K_h, K_h) [H]), float64."""
    n = Lc.shape[-1]
    H = Kh.shape[0]
    rel = (Kh.reshape(H, -1) @ Lc.reshape(-1).to(Kh.dtype)) / _hsic_norm(n, kernel)
    red = (R.sum(dim=1) - R.diagonal()) / (H - 1) if H > 1 else torch.zeros_like(rel)
    return rel.double(), red.double(), R.diagonal().double()


def block_stats(head_feats, acts, Lc, bandwidth, neuron_chunk, kernel=DEFAULT_KERNEL):
    """Per-batch HSIC statistics of one block from its captured internals (what the hooks and the
    post-forward step of compute_scores do, in one call; used by the benchmark).

    Returns (head relevance [H], head mean redundancy [H], neuron relevance [M], neuron sum of
    |activation| [M]) in float64; None entries where the block has no heads / no MLP.
    """
    rel_h = red_h = rel_n = abs_n = None
    n = Lc.shape[-1]
    if head_feats is not None:
        Kh = gaussian_kernel(head_feats, bandwidth, kernel)
        rel_h, red_h, _ = _head_stats(Kh, hsic_pairwise(Kh, kernel), Lc, kernel)
    if acts is not None:
        Ku, abs_n = neuron_kernels(acts, bandwidth, neuron_chunk, kernel)
        rel_n = _relevance(Ku, Lc, _hsic_norm(n, kernel))
    return rel_h, red_h, rel_n, abs_n


_STAT_KEYS = ("head_rel", "head_red", "head_self", "neuron_rel", "neuron_abs")


@torch.no_grad()
def _hsic_statistics(model, parts, loader, num_batches, bandwidth, neuron_chunk, device, kernel):
    nb = len(parts)
    f64 = dict(dtype=torch.float64, device=device)
    n_heads = [a.num_heads if a is not None else 0 for a, _ in parts]
    n_neurons = [_neurons(m) for _, m in parts]
    acc = {k: [torch.zeros(h, **f64) for h in n_heads] for k in _STAT_KEYS[:3]}
    acc.update({k: [torch.zeros(m, **f64) for m in n_neurons] for k in _STAT_KEYS[3:]})
    abs_count = torch.zeros(nb, **f64)
    head_out = [torch.zeros(h, **f64) for h in n_heads]
    out_count = torch.zeros(nb, **f64)
    batch_count = torch.zeros(1, **f64)

    cap = _Capture(parts, bandwidth, neuron_chunk, kernel)
    try:
        for b, batch in enumerate(loader):
            if b >= num_batches:
                break
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            images = images.to(device, non_blocking=True)
            P = _prediction(model(images))
            if P.shape[0] < 2:  # HSIC is undefined on one sample: skip the batch
                cap.clear()
                continue
            Lc = center_kernel(linear_kernel(P))
            norm = _hsic_norm(P.shape[0], kernel)
            for i in range(nb):
                if cap.heads[i] is not None:
                    Kh, R, contribution, tokens = cap.heads[i]
                    rh, dh, sh = _head_stats(Kh, R, Lc, kernel)
                    head_out[i] += contribution
                    out_count[i] += tokens
                    acc["head_rel"][i] += rh
                    acc["head_red"][i] += dh
                    acc["head_self"][i] += sh
                if cap.neurons[i] is not None:
                    Ku, mag, cnt = cap.neurons[i]
                    acc["neuron_rel"][i] += _relevance(Ku, Lc, norm)
                    acc["neuron_abs"][i] += mag
                    abs_count[i] += cnt
                cap.heads[i] = cap.neurons[i] = None  # free this block's kernels early
            batch_count += 1
    finally:
        cap.close()

    # One flat vector so a single all_reduce combines every SUM and count across ranks.
    flat = torch.cat([t for k in _STAT_KEYS for t in acc[k]] + head_out + [out_count, abs_count, batch_count])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    sizes = n_heads * 3 + n_neurons * 2 + n_heads + [nb, nb, 1]
    pieces = list(torch.split(flat, sizes))
    nbat = float(pieces[-1].item())
    if nbat == 0:
        raise ValueError("compute_scores saw no batch with at least two images")
    abs_count = pieces[-2]
    stats = {}
    for j, k in enumerate(_STAT_KEYS):
        stats[k] = [p.cpu() for p in pieces[j * nb:(j + 1) * nb]]
    stats["neuron_abs"] = [(s / abs_count[i].clamp_min(1.0).cpu()) for i, s in enumerate(stats["neuron_abs"])]
    for k in _STAT_KEYS[:4]:
        stats[k] = [s / nbat for s in stats[k]]
    out_count = pieces[-3].cpu()
    stats["head_out"] = [p.cpu() / out_count[i].clamp_min(1.0) for i, p in enumerate(pieces[5 * nb:6 * nb])]
    stats["neuron_wout"] = [(m.fc2.weight.detach().double().norm(dim=0).cpu() if m is not None
                             else torch.zeros(0, dtype=torch.float64)) for _, m in parts]
    stats["batches"] = int(nbat)
    return stats


def hsic_statistics(model, loader, num_batches=1, bandwidth=DEFAULT_BANDWIDTH, neuron_chunk=512,
                    device=None, kernel=DEFAULT_KERNEL, train_mode=False):
    """The raw, batch-averaged (and all-reduced) HSIC statistics of every block, as float64 CPU
    tensors: head_rel (HSIC of each head with the prediction), head_red (mean HSIC with the other
    heads of the block), head_self (HSIC of the head's kernel with itself), neuron_rel (HSIC of
    each neuron with the prediction), neuron_abs (mean |activation|). scores_from_statistics turns
    them into scores, so weights can be varied without running the model again.

    kernel: "scaled" (bandwidth applies) or "original" (see the module docstring). The model runs
    in eval mode, or in train mode (dropout and drop-path active) with train_mode=True, as the
    original did; the modules' own flags are restored afterwards either way."""
    _check_kernel(kernel, bandwidth)
    if int(neuron_chunk) < 1:
        raise ValueError("neuron_chunk must be >= 1")
    model = _unwrap(model)
    parts = _block_parts(model)
    device = torch.device(device) if device is not None else _model_device(model)
    modes = {m: m.training for m in model.modules()}
    model.train(bool(train_mode))
    try:
        return _hsic_statistics(model, parts, loader, int(num_batches), bandwidth, int(neuron_chunk), device,
                                kernel)
    finally:
        for m, was_training in modes.items():
            m.training = was_training


def scores_from_statistics(stats, head_lambda=0.1, neuron_alpha=0.1, head_normalize=False, head_alpha=1.0,
                           magnitude="activation"):
    """Head and neuron scores (see the module docstring) from hsic_statistics.

    head_normalize=True uses normalised HSIC for heads: relevance / sqrt(HSIC(K_h, K_h)) and
    redundancy / sqrt(HSIC(K_h, K_h)) (HSIC(L, L) is common to all heads and dropped), so a head
    whose kernel merely varies more does not look more relevant and more redundant at once.

    magnitude: the size term that the neuron score mixes with dependency (weight 1 - neuron_alpha):
    "activation" (the paper's: mean |activation|), "contribution" (mean |activation| times
    ||fc2.weight[:, j]||, the mean norm of what neuron j adds to the residual stream) or "taylor"
    (first-order Taylor importance, taylor_scores; then ``stats`` must hold "taylor_heads" and
    "taylor_neurons", which compute_scores adds).
    head_alpha < 1 gives heads the same form: head_alpha * minmax(dependency) + (1 - head_alpha) *
    minmax(size), the size being the mean norm of head h's contribution through its columns of
    attn.proj, mean ||x_h W_h^T|| (or its Taylor importance with magnitude="taylor");
    head_alpha=1 (default) is the dependency alone.
    """
    if magnitude not in MAGNITUDES:
        raise ValueError(f"unknown magnitude {magnitude!r}; expected one of {MAGNITUDES}")
    if not 0.0 <= head_alpha <= 1.0:
        raise ValueError(f"head_alpha must be in [0, 1], got {head_alpha}")
    heads, neurons = [], []
    for b, (rel, red, self_, nrel, nabs) in enumerate(zip(*(stats[k] for k in _STAT_KEYS))):
        if head_normalize:
            s = self_.clamp_min(_EPS).sqrt()
            rel, red = rel / s, red / s
        dep = rel - head_lambda * red
        head_size = stats["taylor_heads"][b] if magnitude == "taylor" else stats["head_out"][b]
        heads.append(dep if head_alpha >= 1.0 else
                     head_alpha * _minmax(dep) + (1.0 - head_alpha) * _minmax(head_size))
        size = {"activation": nabs, "contribution": nabs * stats["neuron_wout"][b],
                "taylor": stats["taylor_neurons"][b] if magnitude == "taylor" else None}[magnitude]
        neurons.append(neuron_alpha * _minmax(nrel) + (1.0 - neuron_alpha) * _minmax(size))
    return {"heads": heads, "neurons": neurons}


def compute_scores(model, loader, num_batches=1, criterion="hsic", head_lambda=DEFAULT_HEAD_LAMBDA,
                   neuron_alpha=DEFAULT_NEURON_ALPHA, bandwidth=DEFAULT_BANDWIDTH, neuron_chunk=512, device=None,
                   seed=0, head_normalize=None, kernel=DEFAULT_KERNEL, train_mode=False, head_alpha=1.0,
                   magnitude="activation"):
    """Importance of every head and MLP neuron: {"heads": [...], "neurons": [...]}, one 1-D float64
    CPU tensor per entry of model.blocks (empty where a block has no Attention / Mlp); higher means
    more important.

    criterion="hsic": the dependency criterion (module docstring), from the first num_batches
        batches of loader ((images, targets) pairs; targets are ignored), in eval mode under
        no_grad; the modules' train/eval flags are restored and every hook removed afterwards.
        head_normalize=True divides a head's relevance and redundancy by sqrt(HSIC(K_h, K_h))
        (normalised HSIC; see scores_from_statistics); None means the kernel's own choice: True
        for kernel="scaled" (DEFAULT_HEAD_NORMALIZE), False for kernel="original" (the original's
        formula). kernel and train_mode: see hsic_statistics. Equivalent to
        scores_from_statistics(hsic_statistics(...), head_lambda, neuron_alpha, head_normalize,
        head_alpha, magnitude).
        The original's criterion in full is compute_scores(model, loader, **original_criterion_kwargs())
        with loader yielding augmented training batches.
    criterion="taylor": first-order Taylor importance from the same batches (see taylor_scores);
        gradients are taken with respect to activations only, so no parameter's .grad changes.
    criterion="magnitude": weight magnitudes (see _magnitude_scores); loader is not used.
    criterion="random": uniform scores from torch.Generator seeded with `seed` (same on all ranks).
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; expected one of {CRITERIA}")
    model = _unwrap(model)
    parts = _block_parts(model)
    if criterion == "magnitude":
        return _magnitude_scores(parts)
    if criterion == "random":
        return _random_scores(parts, seed)
    if criterion == "taylor":
        return taylor_scores(model, loader, num_batches, device)
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")
    if head_normalize is None:
        head_normalize = DEFAULT_HEAD_NORMALIZE if kernel == "scaled" else False
    stats = hsic_statistics(model, loader, num_batches, bandwidth, neuron_chunk, device, kernel, train_mode)
    if magnitude == "taylor":
        taylor = taylor_scores(model, loader, num_batches, device)
        stats = dict(stats, taylor_heads=taylor["heads"], taylor_neurons=taylor["neurons"])
    return scores_from_statistics(stats, float(head_lambda), float(neuron_alpha), bool(head_normalize),
                                  float(head_alpha), magnitude)


def original_criterion_kwargs():
    """compute_scores / rank_model keyword arguments of the original's criterion (a new dict each
    call): its kernel, unnormalised head HSIC, lambda 0.1, alpha 0.1, one batch, train mode.
    The original drew that batch from its augmented training loader (RandAugment, random erasing;
    no mixup), on every rank separately; here the statistics are all-reduced across ranks."""
    return {"criterion": "hsic", "kernel": "original", "head_normalize": False, "head_lambda": 0.1,
            "neuron_alpha": 0.1, "num_batches": 1, "train_mode": True}



def criterion_kwargs(criterion="hsic", hsic_kernel="scaled", criterion_batches=1, seed=0,
                     head_lambda=DEFAULT_HEAD_LAMBDA, neuron_alpha=DEFAULT_NEURON_ALPHA, head_normalize=None,
                     head_alpha=1.0, neuron_magnitude="activation", hsic_bandwidth=None):
    """rank_model keyword arguments of a criterion named the way main.py's flags name it;
    ``hsic_kernel="original"`` means the original's criterion in full (original_criterion_kwargs).
    Options at their defaults are left out, so the record of a run made before they existed (a
    search's run identity) stays the same."""
    if criterion == "hsic" and hsic_kernel == "original":
        return dict(original_criterion_kwargs(), num_batches=criterion_batches, seed=seed)
    kw = dict(criterion=criterion, num_batches=criterion_batches, head_lambda=head_lambda, neuron_alpha=neuron_alpha,
              seed=seed, head_normalize=head_normalize)
    kw.update({k: v for k, v, default in (("head_alpha", head_alpha, 1.0),
                                          ("magnitude", neuron_magnitude, "activation"),
                                          ("bandwidth", hsic_bandwidth, None)) if v != default})
    return kw

# ----------------------------------------------------------------------------------------------
# first-order Taylor importance (the baseline most structured ViT pruners use)
# ----------------------------------------------------------------------------------------------

def _split_batch(batch):
    """(images, targets or None) from a loader's batch: (images, targets) pairs or bare images."""
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def _taylor_loss(out, targets):
    """Cross entropy SUMMED over the batch, so each image's activations get the gradient of that
    image's own loss. Against the labels when the loader gives them (class indices, or soft
    [B, classes] targets); otherwise against the model's own top-1 prediction."""
    out = class_logits(out)
    if targets is None:
        targets = out.detach().argmax(dim=-1)
    targets = targets.to(out.device)
    if targets.dim() == out.dim() and targets.is_floating_point():
        targets = targets.to(out.dtype)
    return torch.nn.functional.cross_entropy(out, targets, reduction="sum")


@torch.no_grad()
def _taylor_block_terms(acts, grads, num_heads):
    """Per-image first-order terms of one block: heads [H], neurons [M], float64 sums over images of
    |sum over the component's outputs and the tokens of activation * gradient|."""
    heads = neurons = None
    if acts[0] is not None:
        a, g = acts[0], grads[0]  # input of attn.proj, [B, N, H * hd]
        B, N, _ = a.shape
        per_image = (a * g).reshape(B, N, num_heads, -1).sum(dim=(1, 3), dtype=torch.float64)  # [B, H]
        heads = per_image.abs().sum(dim=0)
    if acts[1] is not None:
        a, g = acts[1], grads[1]  # input of mlp.fc2, [B, N, M]
        neurons = (a * g).sum(dim=1, dtype=torch.float64).abs().sum(dim=0)  # [M]
    return heads, neurons


def _taylor_sums(model, parts, loader, num_batches, device):
    nb = len(parts)
    f64 = dict(dtype=torch.float64, device=device)
    n_heads = [a.num_heads if a is not None else 0 for a, _ in parts]
    n_neurons = [_neurons(m) for _, m in parts]
    heads = [torch.zeros(h, **f64) for h in n_heads]
    neurons = [torch.zeros(m, **f64) for m in n_neurons]
    images_seen = torch.zeros(1, **f64)

    captured = {}
    handles = []
    for i, (attn, mlp) in enumerate(parts):
        if attn is not None:
            handles.append(attn.proj.register_forward_pre_hook(
                lambda mod, inp, key=(i, 0): captured.__setitem__(key, inp[0])))
        if mlp is not None:
            handles.append(mlp.fc2.register_forward_pre_hook(
                lambda mod, inp, key=(i, 1): captured.__setitem__(key, inp[0])))
    try:
        with torch.enable_grad():
            for b, batch in enumerate(loader):
                if b >= num_batches:
                    break
                images, targets = _split_batch(batch)
                # gradients flow from the input, so frozen weights do not matter
                images = images.to(device, non_blocking=True).detach().requires_grad_(True)
                captured.clear()
                loss = _taylor_loss(model(images), targets)
                keys = sorted(captured)
                grads = dict(zip(keys, torch.autograd.grad(loss, [captured[k] for k in keys])))
                for i, attn in enumerate(p[0] for p in parts):
                    h, n = _taylor_block_terms((captured.get((i, 0)), captured.get((i, 1))),
                                               (grads.get((i, 0)), grads.get((i, 1))),
                                               attn.num_heads if attn is not None else 0)
                    if h is not None:
                        heads[i] += h
                    if n is not None:
                        neurons[i] += n
                images_seen += images.shape[0]
                captured.clear()
    finally:
        for h in handles:
            h.remove()
        captured.clear()

    # one flat vector: a single all_reduce sums every rank's terms and image count
    flat = torch.cat(heads + neurons + [images_seen])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    pieces = [p.cpu() for p in torch.split(flat, n_heads + n_neurons + [1])]
    count = float(pieces[-1].item())
    if count == 0:
        raise ValueError("the taylor criterion saw no batch")
    return {"heads": [p / count for p in pieces[:nb]], "neurons": [p / count for p in pieces[nb:2 * nb]]}


def taylor_scores(model, loader, num_batches=1, device=None):
    """First-order Taylor importance of every head and MLP neuron, in compute_scores' format.

    Removing a component sets its output to zero; to first order that changes image i's loss by
    -sum over the component's outputs of activation * gradient. The score is the size of that
    change, |sum_{tokens t, channels k of c} a_itk * dL_i/da_itk|, averaged over the images of the
    first num_batches batches (and over all ranks' images under torch.distributed). The absolute
    value is taken per image, so gains on one image do not cancel losses on another.

    * head h of a block: its channels of the input of ``attn.proj`` (its slice of the attention
      output, [B, N, H * head_dim]), the same tensor the HSIC head features come from;
    * neuron j: channel j of the input of ``mlp.fc2``, i.e. the fc1 activation after GELU (and after
      the Mlp's own norm when it has one): exactly what slicing the neuron removes.

    L_i is the cross entropy of image i against its label when the loader yields (images, labels)
    (soft [B, classes] labels too), or against the model's own top-1 prediction when it yields bare
    images. The model runs in eval mode (no dropout / drop-path) with gradients enabled (it cannot
    run under torch.inference_mode); gradients are taken with torch.autograd.grad with respect to
    the captured activations only, so parameters' .grad are untouched; hooks are removed and the
    modules' train/eval flags restored afterwards. Higher = more important.
    """
    model = _unwrap(model)
    parts = _block_parts(model)
    device = torch.device(device) if device is not None else _model_device(model)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        return _taylor_sums(model, parts, loader, int(num_batches), device)
    finally:
        for m, was_training in modes.items():
            m.training = was_training


def rank_components(scores):
    """Scores -> {"heads": [[idx, least important first] per block], "neurons": [...]} as plain
    lists of ints. Stable ascending sort: among equal scores the lower index comes first."""
    out = {}
    for key in ("heads", "neurons"):
        out[key] = [
            [int(i) for i in torch.sort(torch.as_tensor(s, dtype=torch.float64).cpu(), stable=True).indices]
            for s in scores[key]
        ]
    return out


def rank_model(model, loader, **kwargs):
    """rank_components(compute_scores(model, loader, **kwargs))."""
    return rank_components(compute_scores(model, loader, **kwargs))
