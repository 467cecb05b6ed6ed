"""Shapes the hardware likes: --round-to's CUDA default and the warning for misaligned MLP widths."""
import pytest
import torch

import flags
import main
import models
import pruning


def settled(monkeypatch, argv, cuda=True):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)  # check_config asks before a CUDA run
    args = main.Parser("main.py", parents=[main.get_args_parser()]).parse_args(argv)
    return args, flags.settle(args)[0]


@pytest.mark.parametrize("argv, cuda, round_to", [
    ([], True, 64), (["--flops-convention", "original"], True, 64), (["--round-to", "8"], True, 8),
    (["--round-to", "1", "--flops-convention", "original"], True, 1),
    ([], False, 8), (["--flops-convention", "original"], False, 1), (["--round-to", "16"], False, 16),
])
def test_round_to_default_is_64_on_cuda(monkeypatch, argv, cuda, round_to):
    _, cfg = settled(monkeypatch, ["--model", "deit_small_patch16_224", "--device", "cuda" if cuda else "cpu"] + argv,
                     cuda)
    assert cfg.round_to == round_to


def test_small_presets_keep_the_cpu_default_on_cuda(monkeypatch):
    """vit_pico's 64-wide and vit_nano's 192-wide MLPs would have one to three widths at 64."""
    for name in ("vit_pico_patch8_32", "vit_nano_patch4_32"):
        assert settled(monkeypatch, ["--model", name, "--device", "cuda"])[1].round_to == 8
        assert settled(monkeypatch, ["--model", name, "--device", "cuda", "--flops-convention", "original"])[1] \
            .round_to == 1


def test_original_convention_on_cuda_says_round_to_1_gives_its_widths(monkeypatch):
    base = ["--model", "deit_small_patch16_224", "--device", "cuda", "--flops-convention", "original",
            "--prune_finetune"]
    note = flags.round_to_note(*settled(monkeypatch, base))
    assert "multiples of 64" in note and "--round-to 1" in note and "\n" not in note
    assert flags.round_to_note(*settled(monkeypatch, base + ["--round-to", "64"])) is None  # asked for
    assert flags.round_to_note(*settled(monkeypatch, base[:-1])) is None                    # nothing is sliced
    assert flags.round_to_note(*settled(monkeypatch, base[:4] + ["--prune_finetune"])) is None  # exact convention


def test_misaligned_widths_names_the_blocks():
    dense = models.build_model("vit_nano_patch4_32", num_classes=10)
    dims = pruning.model_dims(dense)
    assert pruning.misaligned_widths(dense) == []
    ranks = {"heads": [list(range(h)) for h in dims["num_heads"]],
             "neurons": [list(range(m)) for m in dims["mlp_hidden"]]}
    neuron = [0.0] * dims["depth"]
    neuron[2], neuron[5] = 0.1, 0.5                                   # 192 -> 173 and 96
    model = pruning.slice_model(dense, {"head": [0.0] * 12, "neuron": neuron, "token": 0.0}, ranks, round_to=1)
    assert pruning.misaligned_widths(model) == [(2, 173)]
    assert pruning.misaligned_widths(model, 64) == [(2, 173), (5, 96)]
    assert pruning.misaligned_widths(model, 32) == [(2, 173)]


def test_load_warns_once_on_cuda_only(monkeypatch):
    dense = models.build_model("vit_nano_patch4_32", num_classes=10)
    dims = pruning.model_dims(dense)
    ranks = {"heads": [list(range(h)) for h in dims["num_heads"]],
             "neurons": [list(range(m)) for m in dims["mlp_hidden"]]}
    model = pruning.slice_model(dense, pruning.uniform_policy(12, neuron=0.1), ranks, round_to=1)
    said = []
    monkeypatch.setattr(main.logger, "warning", said.append)
    main.warn_misaligned(model, torch.device("cpu"))
    assert said == []
    main.warn_misaligned(model, torch.device("cuda"))
    assert len(said) == 1 and "block 0 173" in said[0] and "block 11 173" in said[0]


@pytest.mark.parametrize("mlp_ratio, round_to", [(2.0, 8), (12.0, 64)])
def test_a_converted_models_own_widths_decide_its_cuda_default(monkeypatch, tmp_path, mlp_ratio, round_to):
    """A model file of the architecture it defines (vit_custom: a converted Hugging Face model) is
    small or not by its own MLP width: 96 stays at 8 on CUDA, 576 goes to 64."""
    kwargs = dict(patch_size=8, embed_dim=48, depth=1, num_heads=3, mlp_ratio=mlp_ratio)
    model = models.build_model(models.CUSTOM_MODEL, num_classes=10, img_size=32, **kwargs)
    path = str(tmp_path / "custom.pth")
    models.save_model_file(path, model, models.model_arch(models.CUSTOM_MODEL, model, 32, (0.5,) * 3, (0.5,) * 3,
                                                          model_kwargs=kwargs))
    assert settled(monkeypatch, ["--resume", path, "--device", "cuda", "--eval"])[1].round_to == round_to
    assert settled(monkeypatch, ["--resume", path, "--device", "cpu", "--eval"], cuda=False)[1].round_to == 8
