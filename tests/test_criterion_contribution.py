"""The contribution size terms of the dependency criterion against slow loops: a head's
contribution to the residual stream is x_h W_h^T through its columns of attn.proj, a neuron's is
a_j W2[:, j]; the scores mix min-max-scaled dependency and size as the docstring says."""
import pytest
import torch

import dependency_criterion as dc
import models


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = models.build_model("vit_pico_patch8_32", num_classes=10).eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 3, 32, 32, generator=g), torch.zeros(6, dtype=torch.long)) for _ in range(2)]
    return model, batches


def reference_sizes(model, batches):
    """Per block: mean over images and tokens of ||x_h W_h^T|| for every head (one at a time, in
    float64), and ||a_j W2[:, j]|| / (images x tokens) summed the slow way for every neuron."""
    inputs = {}
    hooks = []
    for i, blk in enumerate(model.blocks):
        hooks.append(blk.attn.proj.register_forward_hook(
            lambda m, a, o, i=i: inputs.setdefault(("h", i), []).append(a[0])))
        hooks.append(blk.mlp.fc2.register_forward_hook(
            lambda m, a, o, i=i: inputs.setdefault(("n", i), []).append(a[0])))
    with torch.no_grad():
        for images, _ in batches:
            model(images)
    for h in hooks:
        h.remove()
    heads, neurons = [], []
    for i, blk in enumerate(model.blocks):
        H, hd = blk.attn.num_heads, blk.attn.head_dim
        W = blk.attn.proj.weight.detach().double()
        x = torch.cat(inputs[("h", i)]).double()
        per_head = []
        for h in range(H):
            total, count = 0.0, 0
            for b in range(x.shape[0]):
                for n in range(x.shape[1]):
                    total += float((W[:, h * hd:(h + 1) * hd] @ x[b, n, h * hd:(h + 1) * hd]).norm())
                    count += 1
            per_head.append(total / count)
        heads.append(torch.tensor(per_head, dtype=torch.float64))
        a = torch.cat(inputs[("n", i)]).double()
        W2 = blk.mlp.fc2.weight.detach().double()
        neurons.append(torch.tensor([float((a[..., j].abs().mean()) * W2[:, j].norm()) for j in range(a.shape[-1])],
                                    dtype=torch.float64))
    return heads, neurons


def minmax(v):
    span = v.max() - v.min()
    return (v - v.min()) / span if span > 0 else torch.zeros_like(v)


def test_head_and_neuron_contributions_match_slow_loops(tiny):
    model, batches = tiny
    stats = dc.hsic_statistics(model, batches, num_batches=2)
    heads, neurons = reference_sizes(model, batches)
    for b in range(len(model.blocks)):
        assert torch.allclose(stats["head_out"][b], heads[b], rtol=1e-4), b
        assert torch.allclose(stats["neuron_abs"][b] * stats["neuron_wout"][b], neurons[b], rtol=1e-4), b


@pytest.mark.parametrize("head_alpha,magnitude", [(1.0, "activation"), (0.3, "contribution"), (0.0, "contribution")])
def test_scores_mix_dependency_and_contribution(tiny, head_alpha, magnitude):
    model, batches = tiny
    stats = dc.hsic_statistics(model, batches, num_batches=2)
    scores = dc.scores_from_statistics(stats, head_lambda=0.1, neuron_alpha=0.2, head_normalize=True,
                                       head_alpha=head_alpha, magnitude=magnitude)
    heads, neurons = reference_sizes(model, batches)
    for b in range(len(model.blocks)):
        s = stats["head_self"][b].sqrt()
        dep = stats["head_rel"][b] / s - 0.1 * stats["head_red"][b] / s
        want = dep if head_alpha == 1.0 else head_alpha * minmax(dep) + (1 - head_alpha) * minmax(heads[b])
        assert torch.allclose(scores["heads"][b], want, rtol=1e-4, atol=1e-9)
        size = neurons[b] if magnitude == "contribution" else stats["neuron_abs"][b]
        want = 0.2 * minmax(stats["neuron_rel"][b]) + 0.8 * minmax(size)
        assert torch.allclose(scores["neurons"][b], want, rtol=1e-4, atol=1e-7)
    if head_alpha == 0.0:  # size alone: the head adding the least to the residual stream goes first
        ranks = dc.rank_components(scores)
        assert ranks["heads"][0][0] == int(torch.argmin(heads[0]))


def test_bad_options_are_refused(tiny):
    model, batches = tiny
    stats = dc.hsic_statistics(model, batches, num_batches=1)
    with pytest.raises(ValueError, match="magnitude"):
        dc.scores_from_statistics(stats, magnitude="weights")
    with pytest.raises(ValueError, match="head_alpha"):
        dc.scores_from_statistics(stats, head_alpha=1.5)


def test_taylor_size_term_mixes_dependency_with_taylor_importance(tiny):
    """magnitude="taylor": the size term is taylor_scores (itself checked against finite
    differences in test_taylor.py), min-max scaled and mixed with the dependency."""
    model, batches = tiny
    got = dc.compute_scores(model, batches, num_batches=2, head_alpha=0.25, neuron_alpha=0.4, magnitude="taylor")
    stats = dc.hsic_statistics(model, batches, num_batches=2)
    taylor = dc.taylor_scores(model, batches, num_batches=2)
    for b in range(len(model.blocks)):
        s = stats["head_self"][b].sqrt()
        dep = stats["head_rel"][b] / s - dc.DEFAULT_HEAD_LAMBDA * stats["head_red"][b] / s
        torch.testing.assert_close(got["heads"][b], 0.25 * minmax(dep) + 0.75 * minmax(taylor["heads"][b]))
        torch.testing.assert_close(got["neurons"][b], 0.4 * minmax(stats["neuron_rel"][b])
                                   + 0.6 * minmax(taylor["neurons"][b]))
    only = dc.compute_scores(model, batches, num_batches=2, head_alpha=0.0, neuron_alpha=0.0, magnitude="taylor")
    assert dc.rank_components(only) == dc.rank_components(taylor)
