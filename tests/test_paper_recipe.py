"""The paper's finetuning recipe reaches the finetuning loop (EMA, repeated augmentation, drop-path
0.1) unless a flag says otherwise, and flops.py counts a search's policy as the search counted it."""
import contextlib
import io
import json

import pytest
import torch
from timm.layers import DropPath

import datasets
import engine
import flops
import flags
import main
import models
import pruning
from helpers import FAST, run_cli

PRUNE = ["--prune_finetune", "--head_sparsity", "0.25", "--neuron_sparsity", "0.25", "--criterion-batches", "1",
         "--finetune-epochs", "1", "--max-steps", "2"]


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("dense")
    code, _, err = run_cli(FAST + ["--epochs", "1", "--max-steps", "2", "--output_dir", out])
    assert code == 0, err
    return out / "checkpoint.pth"


def timm_rates(rate, depth):
    """Per-block drop-path probabilities of timm's VisionTransformer built with drop_path_rate=rate."""
    model = models.build_model("vit_pico_patch8_32", drop_path_rate=rate)
    assert len(model.blocks) == depth
    return [[getattr(m, "drop_prob", 0.0) for m in (b.drop_path1, b.drop_path2)] for b in model.blocks]


def drop_rates(model):
    return [[getattr(m, "drop_prob", 0.0) for m in (b.drop_path1, b.drop_path2)] for b in model.blocks]


def finetune(dense_ckpt, out, flags, monkeypatch):
    """Run prune+finetune; returns (the checkpoint, what each training epoch saw: sampler, drop rates)."""
    seen = []
    real = engine.train_one_epoch

    def spy(model, criterion, loader, *a, **kw):
        inner = getattr(model, "module", model)
        seen.append({"sampler": type(loader.sampler), "drop": drop_rates(inner),
                     "ema": kw.get("model_ema") is not None})
        return real(model, criterion, loader, *a, **kw)
    monkeypatch.setattr(engine, "train_one_epoch", spy)
    code, _, err = run_cli(FAST + PRUNE + ["--resume", dense_ckpt, "--output_dir", out] + flags)
    assert code == 0, err
    assert len(seen) == 1
    return torch.load(out / "prune_finetune" / "checkpoint.pth", weights_only=True), seen[0]


def test_set_drop_path_is_timms_schedule():
    model = models.build_model("vit_pico_patch8_32").eval()
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    assert models.set_drop_path(model, 0.1) is model
    assert drop_rates(model) == timm_rates(0.1, len(model.blocks))
    assert isinstance(model.blocks[0].drop_path1, torch.nn.Identity)  # the first block's rate is 0, as timm's
    assert all(isinstance(b.drop_path2, DropPath) for b in model.blocks[1:])
    torch.testing.assert_close(model(x), before)                       # eval: identity
    models.set_drop_path(model, 0.0)
    assert all(isinstance(m, torch.nn.Identity) for b in model.blocks for m in (b.drop_path1, b.drop_path2))


def test_paper_recipe_settles_every_value_unless_a_flag_is_given():
    cfg, _ = flags.settle(main.get_args_parser().parse_args(["--recipe", "paper"]))
    paper = flags.paper_settings()
    assert {k: getattr(cfg, k) for k in paper} == paper
    recipe = main.make_recipe(cfg, 1, finetune=True)
    assert recipe.model_ema is True and recipe.drop_path == 0.1 and recipe.distillation == "none"
    assert datasets.DataConfig.take(cfg).repeated_aug is True
    given = ["--recipe", "paper", "--no-model-ema", "--no-repeated-aug", "--drop-path", "0", "--finetune-epochs", "2"]
    cfg, _ = flags.settle(main.get_args_parser().parse_args(given))
    assert (cfg.model_ema, cfg.repeated_aug, cfg.drop_path, cfg.finetune_epochs) == (False, False, 0.0, 2)
    assert cfg.mixup == paper["mixup"]  # the flags left alone still take the paper's values
    recipe = main.make_recipe(cfg, 1, finetune=True)
    assert recipe.model_ema is False and recipe.drop_path == 0.0
    cfg, _ = flags.settle(main.get_args_parser().parse_args(["--recipe", "paper", "--model-ema"]))
    assert cfg.model_ema is True


@pytest.mark.slow
def test_paper_recipe_reaches_the_finetuning_loop(dense_ckpt, tmp_path, monkeypatch):
    ckpt, seen = finetune(dense_ckpt, tmp_path / "paper", ["--recipe", "paper"], monkeypatch)
    depth = len(ckpt["arch"]["prune_spec"]["heads"])
    assert ckpt["recipe"]["model_ema"] is True and ckpt["model_ema"] is not None and seen["ema"]
    assert ckpt["recipe"].get("drop_path") == 0.1 and seen["drop"] == timm_rates(0.1, depth)
    assert ckpt["args"]["repeated_aug"] is True and seen["sampler"] is datasets.RASampler
    assert ckpt["recipe"]["distillation"] == "none" and ckpt["recipe"]["mixup"] == 0.8


@pytest.mark.slow
def test_explicit_flags_win_over_the_paper_recipe(dense_ckpt, tmp_path, monkeypatch):
    ckpt, seen = finetune(dense_ckpt, tmp_path / "mine", ["--recipe", "paper", "--no-model-ema", "--no-repeated-aug",
                                                          "--drop-path", "0.05"], monkeypatch)
    depth = len(ckpt["arch"]["prune_spec"]["heads"])
    assert ckpt["recipe"]["model_ema"] is False and ckpt["model_ema"] is None and not seen["ema"]
    assert ckpt["recipe"].get("drop_path") == 0.05 and seen["drop"] == timm_rates(0.05, depth)
    assert ckpt["args"]["repeated_aug"] is False and seen["sampler"] is not datasets.RASampler
    assert ckpt["recipe"]["mixup"] == 0.8  # a flag left alone: still the paper's


def flops_json(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = flops.main([str(a) for a in argv])
    assert code == 0
    return json.loads(out.getvalue().strip().splitlines()[-1])


@pytest.mark.slow
def test_flops_cli_counts_a_policy_as_its_search_did(dense_ckpt, tmp_path):
    out = tmp_path / "s"
    search = ["--search", "--search-reduction", "0.4", "--search_population", "3", "--search_epoch", "1",
              "--search-holdout", "60", "--criterion-batches", "1", "--search-pool", "200",
              "--flops-convention", "original", "--device", "cpu"]
    code, _, err = run_cli(FAST + search + ["--resume", dense_ckpt, "--output_dir", out])
    assert code == 0, err
    path = out / "search" / "best_policy.json"
    best = json.loads(path.read_text())
    assert best["flops_convention"] == "original" and best["round_to"] == 1
    line = flops_json(["--resume", dense_ckpt, "--policy", path, "--json"])
    assert line["gmacs_exact"] == pytest.approx(best["gmacs"], abs=5e-7)
    assert line["params"] == best["params"]
    assert line["convention"] == "original" and "original rounding" in line["model"]
    assert line["gmacs"] == line["gmacs_original"] == pytest.approx(best["budget_gmacs"], abs=5e-7)
    # the user's flags win over what the file records
    line = flops_json(["--resume", dense_ckpt, "--policy", path, "--json", "--flops-convention", "exact",
                       "--round-to", "8"])
    assert line["convention"] == "exact" and "exact rounding" in line["model"]
    dense, _ = models.load_model_file(str(dense_ckpt))
    dims = pruning.model_dims(dense)
    spec = pruning.policy_to_spec(best["policy"], best["rankings"], dims, round_to=8)
    assert line["params"] == flops.model_macs(pruning.apply_spec(dense, spec))["params"]
