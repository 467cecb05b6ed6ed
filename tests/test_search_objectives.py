"""Search objectives (acc, loss, kl) on constructed examples, on a real model, and across 2 ranks."""
import copy
import math
import os
import sys

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import datasets
import engine
from helpers import run_ranks, threads_for_tests

CPU = torch.device("cpu")


class Table(torch.nn.Module):
    """A 'model' whose logits for image i (an image holding the number i) are log(probs[i])."""

    def __init__(self, probs):
        super().__init__()
        self.register_buffer("logits", torch.tensor(probs, dtype=torch.float64).log().float())

    def forward(self, x):
        return self.logits[x.flatten(1)[:, 0].long()]


def loader_of(n, labels, batch_size):
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
    ds = torch.utils.data.TensorDataset(images, torch.tensor(labels))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)


DENSE = [[0.25, 0.75], [0.4, 0.6], [0.9, 0.1]]
CAND = [[1 / 3, 2 / 3], [0.75, 0.25], [0.5, 0.5 - 1e-9]]
LABELS = [1, 1, 0]


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_constructed_example_by_hand(batch_size):
    loader = loader_of(3, LABELS, batch_size)
    ref = engine.reference_outputs(Table(DENSE), loader, CPU)
    stats = engine.objective_stats(Table(CAND), loader, CPU, ref)
    # by hand: the candidate's top-1 is class 1, 0, 0 -> right, wrong, right
    assert stats["acc1"] == pytest.approx(100 * 2 / 3) and stats["n"] == 3
    loss = -(math.log(CAND[0][1]) + math.log(CAND[1][1]) + math.log(CAND[2][0])) / 3
    kl = sum(p * math.log(p / q) for ps, qs in zip(DENSE, CAND) for p, q in zip(ps, qs)) / 3
    assert stats["loss"] == pytest.approx(loss, rel=1e-6)
    assert stats["kl"] == pytest.approx(kl, rel=1e-5)
    assert engine.objective_value(stats, "acc") == stats["acc1"]
    assert engine.objective_value(stats, "loss") == -stats["loss"]
    assert engine.objective_value(stats, "kl") == -stats["kl"]
    # the dense model against itself: KL 0, its own top-1 (right, right, right) and loss
    self_stats = engine.objective_stats(Table(DENSE), loader, CPU, ref)
    assert self_stats["kl"] == 0.0 and self_stats["acc1"] == 100.0
    assert self_stats["loss"] == pytest.approx(-(math.log(0.75) + math.log(0.6) + math.log(0.9)) / 3, rel=1e-6)


def tiny_vit():
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=4, mlp_ratio=2.0,
                             num_classes=5)


def image_loader(n=20, batch_size=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    ds = torch.utils.data.TensorDataset(torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 5, (n,), generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)


def test_candidate_equal_to_dense_has_zero_kl_and_evaluate_agrees():
    dense = tiny_vit()
    loader = image_loader()
    ref = engine.reference_outputs(dense, loader, CPU)
    same = engine.objective_stats(copy.deepcopy(dense), loader, CPU, ref)
    assert same["kl"] == 0.0
    ev = engine.evaluate(loader, dense, CPU)
    assert same["acc1"] == pytest.approx(ev["acc1"]) and same["loss"] == pytest.approx(ev["loss"], rel=1e-6)
    other = copy.deepcopy(dense)
    with torch.no_grad():
        other.head.weight.mul_(0.5)
    changed = engine.objective_stats(other, loader, CPU, ref)
    assert changed["kl"] > 0
    assert engine.objective_stats(other, loader, CPU)["kl"] is None  # no reference, no KL
    with pytest.raises(ValueError, match="kl objective needs"):
        engine.objective_value(engine.objective_stats(other, loader, CPU), "kl")
    with pytest.raises(ValueError, match="unknown search objective"):
        engine.objective_value(changed, "top5")


def test_other_batches_than_the_reference_are_refused():
    dense = tiny_vit()
    ref = engine.reference_outputs(dense, image_loader(), CPU)
    with pytest.raises(ValueError, match="other batches"):
        engine.objective_stats(dense, image_loader(seed=2), CPU, ref)  # same labels would not save it
    with pytest.raises(ValueError, match="batches"):
        engine.objective_stats(dense, image_loader(n=12), CPU, ref)
    # a freshly composed (augmenting) set seen at another epoch is another set of images
    fresh = datasets.build_cluttered_digits(True, 32, fresh=True)
    sub = torch.utils.data.Subset(fresh, range(8))
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=10)
    loader = torch.utils.data.DataLoader(sub, batch_size=4)
    ref = engine.reference_outputs(model, loader, CPU)
    fresh.set_epoch(1)
    with pytest.raises(ValueError, match="other batches"):
        engine.objective_stats(model, loader, CPU, ref)


# ---------------------------------------------------------------- distributed (gloo, 2 processes)



def _sharded(rank, world):
    full = image_loader(n=21).dataset
    sampler = datasets.ShardSampler(len(full), num_replicas=world, rank=rank)
    return torch.utils.data.DataLoader(full, batch_size=4, sampler=sampler)


def _candidate():
    model = tiny_vit()
    with torch.no_grad():
        model.head.weight.mul_(-4.0)  # well away from the dense model
    return model


def _dist_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        loader = _sharded(rank, world)
        ref = engine.reference_outputs(tiny_vit(), loader, CPU)
        stats = engine.objective_stats(_candidate(), loader, CPU, ref)
        torch.save(stats, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_sums_equal_single_process(tmp_path):
    res = run_ranks(__file__, tmp_path, timeout=180)
    loader = _sharded(0, 1)
    single = engine.objective_stats(_candidate(), loader, CPU, engine.reference_outputs(tiny_vit(), loader, CPU))
    assert res[0] == res[1] and res[0]["n"] == 21
    assert res[0]["acc1"] == single["acc1"]  # counts add up exactly
    for k in ("loss", "kl"):  # float32 logits of other batch groupings: rounding-level differences only
        assert single[k] > 1e-3 and res[0][k] == pytest.approx(single[k], rel=1e-6, abs=1e-8)


if __name__ == "__main__":  # a rank of test_distributed_sums_equal_single_process
    torch.set_num_threads(threads_for_tests())
    _dist_worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
