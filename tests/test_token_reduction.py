"""The cheaper token reduction (top-k of the kept tokens, the fused token from sums, the class-token
row without a [B, H, 1, N] tensor) against the slow, obvious version it replaced."""
import pytest
import torch
import torch.nn.functional as F
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Attention
from torch import nn

import models
import pruning


# ------------------------------------------------------------------------------------------------
# the reference: pruning.py's two functions as they were before (verbatim, from git), slow but obvious
# ------------------------------------------------------------------------------------------------

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
    cls_logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)          # [B, H, 1, N]
    cls_row = torch.softmax(cls_logits, dim=-1)[:, :, 0, num_prefix:].mean(dim=1)
    out = attn.norm(out.transpose(1, 2).reshape(bsz, n_tok, heads * hd))
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * torch.sigmoid(gate(x))
    return attn.proj_drop(attn.proj(out)), cls_row


def reduce_tokens(x, score, num_prefix, keep, fuse="mean"):
    """Keep the prefix tokens and the ``keep`` best-scored other tokens of ``x`` [B, N, C]
    (``score`` [B, N - num_prefix]); fuse the rest into one token appended last."""
    prefix, rest = x[:, :num_prefix], x[:, num_prefix:]
    chans = x.shape[-1]
    order = torch.argsort(score, dim=1, descending=True)
    keep_idx = order[:, :keep].sort(dim=1).values
    drop_idx = order[:, keep:]
    kept = rest.gather(1, keep_idx.unsqueeze(-1).expand(-1, -1, chans))
    dropped = rest.gather(1, drop_idx.unsqueeze(-1).expand(-1, -1, chans))
    if fuse == "weighted":
        w = score.gather(1, drop_idx).unsqueeze(-1)
        fused = (dropped * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True)
    else:
        fused = dropped.mean(dim=1, keepdim=True)
    return torch.cat([prefix, kept, fused], dim=1)


# ------------------------------------------------------------------------------------------------

def tokens_and_scores(batch, n_rest, num_prefix, chans=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, num_prefix + n_rest, chans, generator=g) * 3 + 1
    score = torch.softmax(torch.randn(batch, n_rest, generator=g) * 2, dim=1)  # distinct, like attention
    return x, score


@pytest.mark.parametrize("fuse", pruning.FUSE_MODES)
@pytest.mark.parametrize("num_prefix", [1, 2])
@pytest.mark.parametrize("keep", [1, 7, 22, 23])   # 23 = n - 1
def test_reduce_tokens_equals_reference(fuse, num_prefix, keep):
    x, score = tokens_and_scores(batch=3, n_rest=24, num_prefix=num_prefix, seed=keep)
    got = pruning.reduce_tokens(x, score, num_prefix, keep, fuse)
    want = reduce_tokens(x, score, num_prefix, keep, fuse)
    assert got.shape == want.shape == (3, num_prefix + keep + 1, 16) and got.dtype == x.dtype
    torch.testing.assert_close(got[:, :-1], want[:, :-1], rtol=0, atol=0)  # prefix and kept: copied exactly
    torch.testing.assert_close(got[:, -1], want[:, -1], rtol=1e-5, atol=1e-5)


def test_mean_fuse_keeps_precision_in_half_precision():
    x, score = tokens_and_scores(batch=2, n_rest=196, num_prefix=1, chans=32)
    x = x.to(torch.bfloat16)
    got = pruning.reduce_tokens(x, score, 1, 195)[:, -1].double()
    want = reduce_tokens(x.double(), score.double(), 1, 195)[:, -1]
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)  # bfloat16 rounding of one token, no more


@pytest.mark.parametrize("fused_attn", [True, False])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_class_row_equals_reference(fused_attn, qk_norm):
    attn = Attention(48, num_heads=4, qkv_bias=True, qk_norm=qk_norm, norm_layer=nn.LayerNorm).eval()
    attn.fused_attn = fused_attn
    x = torch.randn(3, 1 + 2 + 20, 48)
    with torch.no_grad():
        got, got_row = pruning.attention_with_class_row(attn, x, 2)
        want, want_row = attention_with_class_row(attn, x, 2)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_row, want_row, rtol=1e-5, atol=1e-7)
    assert got_row.shape == (3, 21)


def old_functions(monkeypatch):
    monkeypatch.setattr(pruning, "attention_with_class_row", attention_with_class_row)
    monkeypatch.setattr(pruning, "reduce_tokens", reduce_tokens)


def random_rankings(dims, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"heads": [torch.randperm(h, generator=g).tolist() for h in dims["num_heads"]],
            "neurons": [torch.randperm(m, generator=g).tolist() for m in dims["mlp_hidden"]]}


@pytest.mark.parametrize("fuse", pruning.FUSE_MODES)
def test_compressed_model_equals_the_same_model_with_the_old_functions(fuse, monkeypatch):
    dense = models.build_model("vit_nano_patch4_32", num_classes=10).eval()
    dims = pruning.model_dims(dense)
    policy = pruning.uniform_policy(dims["depth"], head=0.25, neuron=0.3, token=0.3)
    model = pruning.slice_model(dense, policy, random_rankings(dims), round_to=8, fuse=fuse)
    assert [k for _, k in pruning.model_dims(model)["token_reduction"]] == [45, 31, 22]
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        got = model(x)
        old_functions(monkeypatch)
        want = model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_distilled_model_with_two_prefix_tokens_equals_old_functions(monkeypatch):
    dense = VisionTransformerDistilled(img_size=32, patch_size=4, embed_dim=48, depth=6, num_heads=4,
                                       mlp_ratio=2.0, num_classes=5).eval()
    dims = pruning.model_dims(dense)
    assert dims["num_prefix_tokens"] == 2
    model = pruning.slice_model(dense, pruning.uniform_policy(6, token=0.5), random_rankings(dims), fuse="weighted")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got = model(x)
        old_functions(monkeypatch)
        want = model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
