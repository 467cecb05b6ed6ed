"""engine.search_policy and engine.prune_finetune called from Python with run folders: what main.py's
--search and --prune_finetune run, checked without the CLI (resume replays, refusals, rankings
computed only when needed)."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

import datasets
import dependency_criterion as dc
import engine
import flops
import models
import pruning
import utils

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    cfg = datasets.DataConfig(data_set="DIGITS", input_size=32, batch_size=64)
    data = datasets.build_loaders(cfg, distributed=False)
    model = models.build_model("vit_pico_patch8_32", num_classes=10)
    engine.fit(
        model,
        data["train"],
        data["val"],
        recipe=engine.Recipe(epochs=1, lr=2e-3, max_steps=10),
        num_classes=10,
        device=CPU,
    )
    model.eval()
    arch = models.model_arch("vit_pico_patch8_32", model, 32, (0.5,) * 3, (0.5,) * 3)
    train_plain, _ = datasets.build_dataset(True, cfg, train_transform=False)
    split, _ = datasets.search_split(train_plain, None, holdout=120)
    held_out = datasets.split_loader(split, cfg, distributed=False)
    rankings = dc.rank_model(model, datasets.criterion_loader(train_plain, cfg, num_batches=1), criterion="taylor")
    return dict(cfg=cfg, data=data, model=model, arch=arch, held_out=held_out, rankings=rankings)


def counted_rankings(rankings, calls):
    def rank():
        calls.append(1)
        return rankings

    return rank


def test_search_policy_folder_resumes_by_replay_and_refuses_another_search(setup, tmp_path, capsys):
    model, out = setup["model"], str(tmp_path / "search")
    settings = engine.SearchSettings(search_population=3, search_epoch=2, search_pool=200, seed=1)
    target = 0.6 * flops.model_macs(model)["macs"] / 1e9
    sampler = settings.space(pruning.model_dims(model), target)
    identity, calls = {"target_gmacs": target, "seed": 1}, []
    first = engine.search_policy(
        model,
        setup["held_out"],
        rankings=counted_rankings(setup["rankings"], calls),
        sampler=sampler,
        settings=settings,
        device=CPU,
        run_dir=out,
        identity=identity,
        val_loader=setup["data"]["val"],
    )
    assert calls == [1]
    res = first["result"]
    assert len(utils.read_jsonl(os.path.join(out, "search_log.jsonl"))) == 5
    stored = json.load(open(os.path.join(out, "best_policy.json")))
    assert stored["policy"] == res["policy"] and stored["seed"] == 1 and stored["rankings"] is not None
    # the stored rankings and policy rebuild the model the search scored: same GMACs as recorded
    assert flops.model_macs(first["model"])["macs"] / 1e9 == pytest.approx(res["gmacs"])
    assert sampler.is_feasible(np.asarray(res["vector"])[None])[0]
    assert res["val_acc1_before_finetune"] == engine.evaluate(setup["data"]["val"], first["model"], CPU)["acc1"]
    # flops.py counts the searched policy on the dense model file as the search did (its round_to, its head)
    dense_file = str(tmp_path / "dense.pth")
    models.save_model_file(dense_file, model, setup["arch"])
    capsys.readouterr()
    assert flops.main(["--resume", dense_file, "--policy", os.path.join(out, "best_policy.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["macs"] == round(res["gmacs"] * 1e9)

    # a rerun of the finished search returns it (no evaluation, no ranking) and touches no file
    names = sorted(os.listdir(out))
    stamps = [os.stat(os.path.join(out, n)).st_mtime_ns for n in names]
    again = engine.search_policy(
        model,
        setup["held_out"],
        rankings=counted_rankings(setup["rankings"], calls),
        sampler=sampler,
        settings=settings,
        device=CPU,
        run_dir=out,
        identity=identity,
    )
    assert calls == [1]
    assert len(utils.read_jsonl(os.path.join(out, "search_log.jsonl"))) == 5
    assert again["result"]["policy"] == res["policy"] and again["result"]["search_score"] == res["search_score"]
    assert again["result"] == stored and [os.stat(os.path.join(out, n)).st_mtime_ns for n in names] == stamps
    assert flops.model_macs(again["model"])["macs"] == flops.model_macs(first["model"])["macs"]

    # a shorter search in the same folder is the first evaluations of the log, which keeps them all
    shorter = engine.search_policy(
        model,
        setup["held_out"],
        rankings=setup["rankings"],
        sampler=sampler,
        settings=dataclasses.replace(settings, search_epoch=1),
        device=CPU,
        run_dir=out,
        identity=identity,
    )
    log = utils.read_jsonl(os.path.join(out, "search_log.jsonl"))
    assert len(log) == 5 and shorter["result"]["evaluations"] == 4
    assert shorter["result"]["search_score"] == max(r["y"] for r in log[:4])

    # an interrupted search (log cut after 2 records) continues to the same history as the whole run
    log = utils.read_jsonl(os.path.join(out, "search_log.jsonl"))
    utils.write_jsonl(os.path.join(out, "search_log.jsonl"), log[:2])
    resumed = engine.search_policy(
        model,
        setup["held_out"],
        rankings=setup["rankings"],
        sampler=sampler,
        settings=settings,
        device=CPU,
        run_dir=out,
        identity=identity,
    )
    assert [r["x"] for r in resumed["history"]] == [r["x"] for r in log]

    with pytest.raises(utils.UserError, match="another search run"):
        engine.search_policy(
            model,
            setup["held_out"],
            rankings=setup["rankings"],
            sampler=sampler,
            settings=settings,
            device=CPU,
            run_dir=out,
            identity=dict(identity, seed=2),
        )
    # the settings define the search by themselves: another tolerance is refused with no caller identity
    with pytest.raises(utils.UserError, match="tol 0.02 -> 0.05"):
        engine.search_policy(
            model,
            setup["held_out"],
            rankings=setup["rankings"],
            sampler=sampler,
            settings=dataclasses.replace(settings, search_tol=0.05),
            device=CPU,
            run_dir=out,
            identity=identity,
        )


def test_prune_finetune_folder_continues_and_refuses_another_policy(setup, tmp_path):
    model, run_dir = setup["model"], str(tmp_path / "pf")
    policy = pruning.uniform_policy(pruning.model_dims(model)["depth"], 0.25, 0.25, 0.0)
    recipe = engine.Recipe(epochs=1, lr=1e-3, max_steps=3, distillation="soft")
    identity, calls = {"policy": policy}, []

    def run(**kw):  # this run's folder and policy; the rankings count the times they are computed
        return engine.prune_finetune(model, setup["data"], dense_arch=setup["arch"], policy=policy,
                                     rankings=counted_rankings(setup["rankings"], calls), device=CPU,
                                     run_dir=run_dir, identity=identity, **{"recipe": recipe, **kw})

    res = run()
    assert calls == [1]
    assert json.load(open(os.path.join(run_dir, "result.json")))["policy"] == policy
    small, arch, _ = models.load(res["file"])
    expected = pruning.slice_model(model, policy, setup["rankings"], 8)
    assert arch["prune_spec"] == expected.prune_spec
    assert flops.model_macs(small)["macs"] / 1e9 == pytest.approx(res["gmacs"])

    # the finished run again returns its result (no ranking, no training) and touches no file
    names = sorted(os.listdir(run_dir))
    stamps = [os.stat(os.path.join(run_dir, n)).st_mtime_ns for n in names]
    again = run()
    assert calls == [1] and again == json.load(open(os.path.join(run_dir, "result.json")))
    assert [os.stat(os.path.join(run_dir, n)).st_mtime_ns for n in names] == stamps
    # one more epoch continues the checkpoint (no ranking) and reports the same pre-finetune top-1
    longer = run(recipe=dataclasses.replace(recipe, epochs=2))
    assert calls == [1] and longer["acc1_before_finetune"] == res["acc1_before_finetune"]
    assert [r["epoch"] for r in utils.read_jsonl(os.path.join(run_dir, "log.jsonl"))] == [0, 1]
    # fewer epochs than the model has had would give a result.json that understates its training
    with pytest.raises(utils.UserError, match="has finetuned 2 epochs, more than the 1 asked for"):
        run()
    assert calls == [1]

    other = pruning.uniform_policy(pruning.model_dims(model)["depth"], 0.25, 0.5, 0.0)
    with pytest.raises(utils.UserError, match="another prune\\+finetune run"):
        engine.prune_finetune(
            model,
            setup["data"],
            dense_arch=setup["arch"],
            policy=other,
            rankings=setup["rankings"],
            recipe=recipe,
            device=CPU,
            run_dir=run_dir,
            identity={"policy": other},
        )
    # the policy and recipe define the run by themselves, with no identity from the caller
    with pytest.raises(utils.UserError, match="policy"):
        engine.prune_finetune(
            model,
            setup["data"],
            dense_arch=setup["arch"],
            policy=other,
            rankings=setup["rankings"],
            recipe=recipe,
            device=CPU,
            run_dir=run_dir,
        )


def test_fit_checks_its_own_run_identity(setup, tmp_path):
    """fit with an identity records the training run in run.json; continuing it under another
    identity is refused in one line, and a fresh run (no resume) records itself over it."""
    run_dir, recipe = str(tmp_path / "train"), engine.Recipe(epochs=1, lr=1e-3, max_steps=2)
    model = models.build_model("vit_pico_patch8_32", num_classes=10)

    def train(identity, resume=None, **kw):
        return engine.fit(model, setup["data"]["train"], setup["data"]["val"], recipe=dataclasses.replace(recipe, **kw),
                          num_classes=10, arch=setup["arch"], identity=identity, resume=resume, run_dir=run_dir,
                          device=CPU)

    train({"data_set": "DIGITS"})
    stored = json.load(open(os.path.join(run_dir, "run.json")))
    assert stored == {"step": "train", "model": "vit_pico_patch8_32", "input_size": 32, "num_classes": 10,
                      "prune_spec": False, "seed": 0, "distillation": "none", "data_set": "DIGITS"}
    state = utils.load_checkpoint_file(os.path.join(run_dir, "checkpoint.pth"))
    with pytest.raises(utils.UserError, match="another training run \\(data_set 'DIGITS' -> 'CLUTTERED_DIGITS'\\)"):
        train({"data_set": "CLUTTERED_DIGITS"}, resume=state, epochs=2)
    with pytest.raises(utils.UserError, match="seed 0 -> 1"):  # the recipe's part, with no help from the caller
        train({"data_set": "DIGITS"}, resume=state, epochs=2, seed=1)
    train({"data_set": "DIGITS"}, resume=state, epochs=2)  # the same run continues
    assert [r["epoch"] for r in utils.read_jsonl(os.path.join(run_dir, "log.jsonl"))] == [0, 1]
    train({"data_set": "CLUTTERED_DIGITS"})  # a fresh run: its identity over the old one, the old files kept
    assert json.load(open(os.path.join(run_dir, "run.json")))["data_set"] == "CLUTTERED_DIGITS"
    assert os.path.exists(os.path.join(run_dir, "checkpoint.previous.pth"))
