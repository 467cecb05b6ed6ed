"""--criterion taylor against a slow reference that needs no autograd: for every component in
turn, scale its output by (1 +- eps) and difference each image's float64 loss."""
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

import dependency_criterion as dc
from helpers import run_ranks, threads_for_tests


def tiny_vit(**kw):
    cfg = dict(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=5)
    cfg.update(kw)
    torch.manual_seed(0)
    return VisionTransformer(**cfg)


def make_batches(num, batch, seed=1, dtype=torch.float32, size=16):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=g, dtype=dtype), torch.randint(0, 5, (batch,), generator=g))
            for _ in range(num)]


def per_image_loss(model, images, labels, block, kind, index, scale):
    """Cross entropy of each image with ONE component's output multiplied by ``scale``."""
    blk = model.blocks[block]
    if kind == "head":
        hd = blk.attn.head_dim
        cols = slice(index * hd, (index + 1) * hd)
        module = blk.attn.proj
    else:
        cols = slice(index, index + 1)
        module = blk.mlp.fc2

    def scale_component(mod, inputs):
        x = inputs[0].clone()
        x[..., cols] = x[..., cols] * scale
        return (x,)

    handle = module.register_forward_pre_hook(scale_component)
    try:
        with torch.no_grad():
            out = model(images)
    finally:
        handle.remove()
    if isinstance(out, tuple):
        out = (out[0] + out[1]) / 2
    return F.cross_entropy(out, labels, reduction="none")


def reference_scores(model, batches, eps=1e-5):
    """mean over images of |dL_i / d gate_c| by central differences, one component at a time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # hundreds of tiny forwards: one thread, no hand-offs (much faster on a busy CPU)
    try:
        return _reference_scores(model, batches, eps)
    finally:
        torch.set_num_threads(threads)


def _reference_scores(model, batches, eps):
    model.eval()
    heads = [torch.zeros(b.attn.num_heads, dtype=torch.float64) for b in model.blocks]
    neurons = [torch.zeros(b.mlp.fc1.out_features, dtype=torch.float64) for b in model.blocks]
    n = 0
    for images, labels in batches:
        n += images.shape[0]
        for j in range(len(model.blocks)):
            for kind, store in (("head", heads[j]), ("neuron", neurons[j])):
                for c in range(len(store)):
                    up = per_image_loss(model, images, labels, j, kind, c, 1 + eps)
                    down = per_image_loss(model, images, labels, j, kind, c, 1 - eps)
                    store[c] += ((up - down) / (2 * eps)).abs().sum()
    return [h / n for h in heads], [m / n for m in neurons]


def test_taylor_equals_per_component_reference():
    model = tiny_vit().double()
    batches = make_batches(2, 5, dtype=torch.float64)
    got = dc.compute_scores(model, batches, num_batches=2, criterion="taylor")
    want_h, want_n = reference_scores(model, batches)
    for j in range(2):
        torch.testing.assert_close(got["heads"][j], want_h[j], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(got["neurons"][j], want_n[j], rtol=1e-6, atol=1e-9)
        assert got["heads"][j].dtype == torch.float64 and got["heads"][j].shape == (4,)
        assert got["neurons"][j].shape == (32,)
    direct = dc.taylor_scores(model, batches, num_batches=2)
    assert all(torch.equal(a, b) for k in ("heads", "neurons") for a, b in zip(got[k], direct[k]))


def test_float32_model_close_to_float64():
    model = tiny_vit()
    batches = make_batches(2, 6)
    s32 = dc.taylor_scores(model, batches, num_batches=2)
    s64 = dc.taylor_scores(model.double(), [(x.double(), y) for x, y in batches], num_batches=2)
    for k in ("heads", "neurons"):
        for a, b in zip(s32[k], s64[k]):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


def test_dead_head_and_neuron_rank_first():
    # a head whose projection columns are zero, a neuron whose fc2 column is zero: removing them
    # changes nothing, so their Taylor score is exactly zero and they go first
    model = tiny_vit()
    hd = model.blocks[0].attn.head_dim
    with torch.no_grad():
        model.blocks[0].attn.proj.weight[:, 2 * hd:3 * hd] = 0
        model.blocks[1].mlp.fc2.weight[:, 7] = 0
    s = dc.compute_scores(model, make_batches(1, 8), criterion="taylor")
    assert s["heads"][0][2] == 0 and (s["heads"][0][[0, 1, 3]] > 0).all()
    assert s["neurons"][1][7] == 0 and (s["neurons"][1].count_nonzero() == 31)
    ranks = dc.rank_components(s)
    assert ranks["heads"][0][0] == 2 and ranks["neurons"][1][0] == 7


def test_labels_or_own_prediction():
    model = tiny_vit()
    batches = make_batches(2, 6)
    images_only = [x for x, _ in batches]
    with torch.no_grad():
        predicted = [(x, model(x).argmax(-1)) for x in images_only]
    a = dc.taylor_scores(model, images_only, num_batches=2)
    b = dc.taylor_scores(model, predicted, num_batches=2)
    c = dc.taylor_scores(model, batches, num_batches=2)
    for k in ("heads", "neurons"):
        assert all(torch.equal(x, y) for x, y in zip(a[k], b[k]))
        assert not all(torch.equal(x, y) for x, y in zip(a[k], c[k]))
    # soft labels equal to one-hot labels give the hard-label scores
    soft = [(x, F.one_hot(y, 5).float()) for x, y in batches]
    d = dc.taylor_scores(model, soft, num_batches=2)
    for k in ("heads", "neurons"):
        for x, y in zip(c[k], d[k]):
            torch.testing.assert_close(x, y)


def test_no_side_effects_on_model_or_data():
    model = tiny_vit(drop_rate=0.3)
    model.train()
    batches = make_batches(3, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = dc.compute_scores(model, batches, num_batches=2, criterion="taylor")
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.training and all(m.training for m in model.modules())
    assert all(not x.requires_grad for x, _ in batches)
    assert not any(b.attn.proj._forward_pre_hooks or b.mlp.fc2._forward_pre_hooks for b in model.blocks)
    # eval mode inside (no dropout): the same scores twice, and from 2 of 3 batches only
    again = dc.compute_scores(model, batches[:2], num_batches=5, criterion="taylor")
    assert all(torch.equal(a, b) for k in s for a, b in zip(s[k], again[k]))
    # works with frozen weights and under an outer no_grad
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        frozen = dc.compute_scores(model, batches, num_batches=2, criterion="taylor")
    assert all(torch.allclose(a, b) for k in s for a, b in zip(s[k], frozen[k]))


def test_distilled_model():
    torch.manual_seed(0)
    model = VisionTransformerDistilled(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=4,
                                       mlp_ratio=2.0, num_classes=5).double()
    model.set_distilled_training(True)  # returns (cls, dist) logits: the criterion averages them
    batches = make_batches(1, 4, dtype=torch.float64)
    got = dc.taylor_scores(model, batches)
    want_h, want_n = reference_scores(model, batches)
    for j in range(2):
        torch.testing.assert_close(got["heads"][j], want_h[j], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(got["neurons"][j], want_n[j], rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------- distributed (gloo, 2 processes)



def _dist_worker(rank, world, port, out_dir):
    """One rank: Taylor scores of its share of the same four batches."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = tiny_vit()
        shard = make_batches(4, 6)[rank::world]
        s = dc.compute_scores(model, shard, num_batches=len(shard), criterion="taylor")
        torch.save({"scores": s, "ranks": dc.rank_components(s)}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_ranks_agree_with_single_process(tmp_path):
    res = run_ranks(__file__, tmp_path, timeout=180)
    single = dc.compute_scores(tiny_vit(), make_batches(4, 6), num_batches=4, criterion="taylor")
    assert res[0]["ranks"] == res[1]["ranks"] == dc.rank_components(single)
    for key in ("heads", "neurons"):
        for a, b, c in zip(res[0]["scores"][key], res[1]["scores"][key], single[key]):
            assert torch.equal(a, b)
            torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-12)


if __name__ == "__main__":  # a rank of test_distributed_ranks_agree_with_single_process
    torch.set_num_threads(threads_for_tests())
    _dist_worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
