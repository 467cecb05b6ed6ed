"""timm's forward_intermediates on compressed models: a token-reduced model gives its blocks'
tokens with output_fmt="NLC" and refuses timm's default NCHW maps in one line (its tokens are no
longer a patch grid); a model without token reduction keeps timm's NCHW maps."""
import copy

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import models
import pruning
from pruning import apply_spec, model_dims, policy_to_spec, uniform_policy
from helpers import block_outputs


def tiny_vit():
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=4, mlp_ratio=2.0,
                             num_classes=5).eval()


def compressed(model, token=0.5, head=0.25, neuron=0.25):
    dims = model_dims(model)
    rng = np.random.default_rng(0)
    rankings = {"heads": [rng.permutation(h).tolist() for h in dims["num_heads"]],
                "neurons": [rng.permutation(m).tolist() for m in dims["mlp_hidden"]]}
    return apply_spec(model, policy_to_spec(uniform_policy(dims["depth"], head=head, neuron=neuron, token=token),
                                            rankings, dims))


def test_token_reduced_intermediates_in_nlc_are_the_blocks_tokens():
    model = compressed(tiny_vit())
    assert any(isinstance(b, pruning.TokenReducingBlock) for b in model.blocks)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = block_outputs(model, x)
        final, inter = model.forward_intermediates(x, output_fmt="NLC")
        only = model.forward_intermediates(x, indices=[1, 3], output_fmt="NLC", intermediates_only=True)
    assert len(inter) == len(ref) == 4
    assert inter[-1].shape[1] < 16  # fewer tokens than patches at the end
    for got, want in zip(inter, ref):
        torch.testing.assert_close(got, want[:, model.num_prefix_tokens:])
    torch.testing.assert_close(final, model.norm(ref[-1]))
    torch.testing.assert_close(only[0], ref[1][:, 1:])
    torch.testing.assert_close(only[1], ref[3][:, 1:])


def test_token_reduced_nchw_request_is_a_one_line_error():
    model = compressed(tiny_vit())
    x = torch.randn(1, 3, 32, 32)
    for call in (lambda: model.forward_intermediates(x), lambda: model.forward_intermediates(x, output_fmt="NCHW"),
                 lambda: model.forward_intermediates(x, None, False, False, False, "NCHW")):
        with pytest.raises(pruning.SpecError) as info:
            call()
        text = str(info.value)
        assert len(text.splitlines()) == 1 and "output_fmt='NLC'" in text and "reduces tokens" in text, text


def test_guard_follows_the_model_through_copies_files_and_respecs(tmp_path):
    model = compressed(tiny_vit())
    x = torch.randn(1, 3, 32, 32)
    twin = copy.deepcopy(model)
    assert twin.forward_intermediates.__self__ is twin
    with pytest.raises(pruning.SpecError):
        twin.forward_intermediates(x)
    arch = models.model_arch("t", model, 32, (0.5,) * 3, (0.5,) * 3)
    rebuilt = apply_spec(tiny_vit(), arch["prune_spec"])  # what models.build_from_arch does
    with pytest.raises(pruning.SpecError):
        rebuilt.forward_intermediates(x)
    assert "forward_intermediates" not in model.state_dict()
    # the same model re-specced without token reduction gets timm's NCHW maps back
    plain = compressed(tiny_vit(), token=0.0)
    with torch.no_grad():
        maps = plain.forward_intermediates(x, intermediates_only=True)
    assert [tuple(m.shape) for m in maps] == [(1, 32, 4, 4)] * 4
    tokens_only = compressed(tiny_vit(), head=0.0, neuron=0.0)  # shapes of the dense model: re-speccable
    respecced = apply_spec(tokens_only, dict(tokens_only.prune_spec, tokens=None))
    assert "forward_intermediates" not in vars(respecced)
    with torch.no_grad():
        assert tuple(respecced.forward_intermediates(x, intermediates_only=True)[0].shape) == (1, 32, 4, 4)
