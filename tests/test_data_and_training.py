"""Data sets, samplers, model building, the training loop and evaluation, checkpoint files, bad inputs."""
import json
import os
import types

import numpy as np
import pytest
import torch

import datasets
import engine
import flags
import main
import models
import utils
from helpers import FAST, make_image_folder, run_cli


def test_digits_split_is_fixed_and_stratified():
    x_tr, y_tr, x_va, y_va = datasets.digits_split()
    assert len(x_tr) + len(x_va) == 1797
    assert x_tr.shape[1:] == (8, 8) and 0 <= x_tr.min() and x_tr.max() <= 1
    again = datasets.digits_split()
    assert np.array_equal(again[3], y_va)
    counts = np.bincount(y_va, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # ~20% of each class


def test_digits_dataset_shapes_and_augmentation():
    args = types.SimpleNamespace(data_set="DIGITS", input_size=32, reprob=0.0)
    train, ncls = datasets.build_dataset(True, args)
    val, _ = datasets.build_dataset(False, args)
    assert ncls == 10 and len(train) == 1437 and len(val) == 360
    img, label = val[0]
    assert img.shape == (3, 32, 32) and isinstance(label, int)
    batch = [train[i] for i in range(8)]
    torch.manual_seed(1)
    xa, ya = train.collate(batch)
    torch.manual_seed(1)
    xb, _ = train.collate(batch)
    plain = torch.stack([b[0] for b in batch])
    assert torch.equal(xa, xb)  # seeded: a resumed epoch replays the same augmentation
    assert not torch.allclose(xa, plain)  # augmentation changes the images
    xv, _ = val.collate(batch)
    assert torch.equal(xv, plain)  # no augmentation at evaluation


def test_stratified_holdout():
    targets = np.repeat(np.arange(5), 20)
    held = datasets.stratified_holdout(targets, 0.2, seed=0)
    assert len(held) == 20 and np.bincount(targets[held]).tolist() == [4] * 5
    assert held == datasets.stratified_holdout(targets, 20, seed=0)
    with pytest.raises(datasets.DataError, match="must select between"):
        datasets.stratified_holdout(targets, 100)


def test_shard_sampler_covers_every_index_once():
    parts = [list(datasets.ShardSampler(11, num_replicas=3, rank=r)) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(11))


def test_ra_sampler_repeats_and_splits():
    ds = list(range(12))
    s0 = datasets.RASampler(ds, num_replicas=2, rank=0, repeats=3)
    s1 = datasets.RASampler(ds, num_replicas=2, rank=1, repeats=3)
    assert len(list(s0)) == len(s0) and len(s0) == 6
    assert set(s0) | set(s1) <= set(ds)
    # uncapped, every image appears exactly `repeats` times over the ranks, and the copies of one
    # image go to different ranks (DeiT's scheme: the repeated list is dealt round-robin)
    big = list(range(512))
    ranks = [datasets.RASampler(big, num_replicas=3, rank=r, repeats=3, seed=1) for r in range(3)]
    for s in ranks:
        s.num_selected = s.num_samples  # look at the whole repeated list, not the per-epoch cap
    draws = [list(s) for s in ranks]
    counts = np.bincount(np.concatenate(draws), minlength=512)
    assert counts.tolist() == [3] * 512
    for d in draws:  # 3 copies dealt to 3 ranks: no rank gets two copies of one image
        assert len(set(d)) == len(d)
    capped = [list(datasets.RASampler(big, num_replicas=3, rank=r, repeats=3, seed=1)) for r in range(3)]
    assert all(len(c) == 512 // 256 * 256 // 3 for c in capped)  # DeiT's per-epoch cap
    ranks[0].set_epoch(1)
    assert list(ranks[0]) != draws[0]  # another epoch, another order


def test_presets_and_unknown_model():
    m = models.build_model("vit_nano_patch4_32", num_classes=10)
    assert len(m.blocks) == 12 and m.patch_embed.num_patches == 64
    d = models.build_model("deit_nano_distilled_patch4_32", num_classes=10)
    assert d.num_prefix_tokens == 2
    with pytest.raises(models.ModelError, match="did you mean deit_small_patch16_224"):
        models.build_model("deit_smal_patch16_224")
    with pytest.raises(models.ModelError, match="not a timm VisionTransformer"):
        models.build_model("resnet18")


def test_pretrained_without_network_is_one_line_error(monkeypatch):
    import timm

    def offline(*a, **k):
        raise OSError("Network is unreachable")
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(models.ModelError, match="could not load pretrained weights.*--finetune"):
        models.build_model("deit_tiny_patch16_224", pretrained=True)


def test_finetune_drops_head_and_interpolates_pos_embed(tmp_path):
    src = models.build_model("vit_pico_patch8_32", num_classes=7, img_size=32)
    path = tmp_path / "weights.pth"
    torch.save(src.state_dict(), path)  # a plain state dict, as timm / DeiT release them
    dst = models.build_model("vit_pico_patch8_32", num_classes=3, img_size=48)
    models.load_finetune(dst, str(path))
    assert torch.equal(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    assert dst.pos_embed.shape[1] == 1 + 36
    other = models.build_model("vit_nano_patch4_32", num_classes=3)
    with pytest.raises(utils.CheckpointError, match="another architecture"):
        models.load_finetune(other, str(path))


def test_checkpoint_errors(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(utils.CheckpointError, match="corrupt or not a PyTorch checkpoint"):
        utils.load_checkpoint_file(str(bad))
    with pytest.raises(utils.CheckpointError, match="not found"):
        utils.load_checkpoint_file(str(tmp_path / "missing.pth"))
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": types.SimpleNamespace(a=1)}, pickled)
    with pytest.raises(utils.CheckpointError, match="holds pickled Python objects .*SimpleNamespace.*not loaded"):
        utils.load_checkpoint_file(str(pickled))
    truncated = tmp_path / "trunc.pth"
    torch.save({"model": models.build_model("vit_pico_patch8_32").state_dict()}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:5000])
    with pytest.raises(utils.CheckpointError, match="corrupt"):
        utils.load_checkpoint_file(str(truncated))


def test_save_atomic_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    utils.save_atomic({"epoch": 1}, str(path))

    def boom(obj, f):
        raise RuntimeError("disk full")
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError):
        utils.save_atomic({"epoch": 2}, str(path))
    assert torch.load(path, weights_only=True)["epoch"] == 1


def test_nonfinite_loss_stops_before_the_step():
    model = models.build_model("vit_pico_patch8_32", num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))]

    def nan_loss(inputs, outputs, targets):
        return outputs.sum() * float("nan")
    with pytest.raises(engine.NonFiniteLoss, match="loss is nan"):
        engine.train_one_epoch(model, nan_loss, loader, opt, torch.device("cpu"), 0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_evaluate_counts_exactly():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x[:, :, 0, 0]  # logits are the first pixel of each channel
    x = torch.zeros(6, 3, 2, 2)
    x[[0, 1, 2], 0, 0, 0] = 1  # predicts 0
    x[[3, 4, 5], 1, 0, 0] = 1  # predicts 1
    y = torch.tensor([0, 0, 1, 1, 1, 2])
    stats = engine.evaluate([(x, y)], Fixed(), torch.device("cpu"))
    assert stats["acc1"] == pytest.approx(100 * 4 / 6) and stats["n"] == 6


def test_distillation_loss_soft_and_hard():
    teacher = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    y = torch.randint(0, 3, (5,))
    base = torch.nn.CrossEntropyLoss()
    student = teacher(x).detach()
    soft = engine.DistillationLoss(base, teacher, "soft", alpha=1.0)
    assert soft(x, student, y).item() == pytest.approx(0.0, abs=1e-6)  # KL(p || p) = 0
    hard = engine.DistillationLoss(base, teacher, "hard", alpha=1.0)
    expected = torch.nn.functional.cross_entropy(student, teacher(x).argmax(1))
    assert hard(x, student, y).item() == pytest.approx(expected.item(), rel=1e-6)


# ----------------------------------------------------------------------------- CLI


def test_help_lists_seed_flags():
    text = main.get_args_parser().format_help()
    for flag in ("--data-path", "--output_dir", "--dist-eval", "--resume", "--eval", "--finetune", "--model"):
        assert flag in text


@pytest.mark.parametrize("argv,message", [
    (["--data-path", "/no/such/folder"], "data path /no/such/folder does not exist (expected"),
    (["--model", "deit_smal_patch16_224"], "unknown model 'deit_smal_patch16_224'; did you mean"),
    (["--eval", "--resume", "/no/such.pth"], "checkpoint not found: /no/such.pth"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--search_flops", "1", "--search-reduction", "0.4"],
     "give one budget, not --search_flops and --search-reduction"),
    (["--pipeline-reductions", "0.4,1"], "--pipeline-reductions must be comma-separated fractions"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--drop-path", "2"], "--drop-path must be in [0, 1)"),
    (["--eval-crop-ratio", "0"], "--eval-crop-ratio must be in (0, 1]"),
    (["--num_workers", "-1"], "--num-workers must be >= 0"),
    (["--model", "vit_pico_patch8_32", "--input-size", "33"], "input size 33 does not fit"),
    (["--device", "tpu"], "--device tpu: use cpu, cuda or cuda:N"),
    (["--output_dir", "/proc/no/such"], "--output_dir /proc/no/such cannot be written"),
    (["--throughput", "--model", "vit_pico_patch8_32", "--throughput-batch", "100000000"], "does not fit in memory"),
])
def test_bad_input_one_line_errors(argv, message):
    code, _, err = run_cli(argv + ["--epochs", "1"])
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_empty_and_mismatched_folders(tmp_path):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir(parents=True)
    code, _, err = run_cli(["--data-path", tmp_path / "empty", "--epochs", "1"])
    assert code == 2 and "has no class folders" in err
    root = make_image_folder(str(tmp_path / "mm"), classes=("a", "b"))
    os.rename(os.path.join(root, "val", "b"), os.path.join(root, "val", "z"))
    code, _, err = run_cli(["--data-path", root, "--epochs", "1"])
    assert code == 2 and "class folders differ" in err and "only in val: ['z']" in err


def test_hidden_folders_are_not_classes(tmp_path):
    """A thumbnail cache or notebook checkpoint folder beside the classes is ignored, as the layout
    check ignores it (it used to become class 0 or crash training with an index error)."""
    import shutil
    root = make_image_folder(str(tmp_path / "imgs"), classes=("a", "b", "c"), per_class=(8, 4))
    for split, hidden in (("train", ".thumbs"), ("val", ".ipynb_checkpoints")):
        os.makedirs(os.path.join(root, split, hidden))
        shutil.copy(os.path.join(root, split, "a", "0.png"), os.path.join(root, split, hidden, "0.png"))
    train = datasets.SafeImageFolder(os.path.join(root, "train"))
    assert train.classes == ["a", "b", "c"] and len(train) == 24 and sorted(set(train.targets)) == [0, 1, 2]
    code, _, err = run_cli(["--data-path", root, "--model", "vit_pico_patch8_32", "--input-size", "32",
                            "--batch-size", "8", "--epochs", "1", "--output_dir", tmp_path / "out"])
    assert code == 0, err
    assert models.load(str(tmp_path / "out" / "checkpoint.pth"))[1]["num_classes"] == 3


def test_transform_errors_are_not_blamed_on_the_file(tmp_path, caplog):
    """A random augmentation that draws invalid parameters is redrawn; the image is not called
    unreadable nor swapped for another (timm's posterize sometimes asks for 0 bits)."""
    root = make_image_folder(str(tmp_path / "imgs"), classes=("a", "b"), per_class=(2, 2))

    class Flaky:
        def __init__(self, fails):
            self.fails, self.calls = fails, 0

        def __call__(self, image):
            self.calls += 1
            if self.calls <= self.fails:
                raise ValueError("bits must be between or equal to 1 and 8")
            return torch.zeros(1)
    ds = datasets.SafeImageFolder(os.path.join(root, "train"), transform=Flaky(1))
    with caplog.at_level("WARNING", logger="vitcompress"):
        assert ds[3][1] == 1 and ds.inner.transform.calls == 2
    assert "unreadable" not in caplog.text
    with pytest.raises(datasets.DataError, match="the image transform fails on .*0.png: bits must be"):
        datasets.SafeImageFolder(os.path.join(root, "train"), transform=Flaky(10))[0]


def test_no_readable_validation_image_is_an_error_not_zero_percent(tmp_path, monkeypatch):
    root = make_image_folder(str(tmp_path / "imgs"), classes=("a", "b"), per_class=(2, 2))
    for name in ("a", "b"):
        for i in range(2):
            (tmp_path / "imgs" / "val" / name / f"{i}.png").write_bytes(b"not a png")
    code, _, err = run_cli(["--data-path", root, "--model", "vit_pico_patch8_32", "--input-size", "32", "--eval",
                            "--batch-size", "4", "--num_workers", "0"])
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: no image was evaluated"), err


def test_evaluation_sums_over_ranks_only_when_the_loader_is_sharded(monkeypatch):
    """Without --dist-eval every rank evaluates every image: summing them counted each image once
    per process (720 of 360 under 2 processes)."""
    summed = []
    monkeypatch.setattr(engine, "all_reduce_sum", lambda t: summed.append(1) or t.mul_(2))
    model = models.build_model("vit_pico_patch8_32", num_classes=10)
    data = [(torch.randn(3, 32, 32), i % 10) for i in range(6)]
    whole = torch.utils.data.DataLoader(data, batch_size=4)
    assert engine.evaluate(whole, model, torch.device("cpu"))["n"] == 6 and summed == []
    shard = torch.utils.data.DataLoader(data, batch_size=4, sampler=datasets.ShardSampler(6, num_replicas=2, rank=0))
    assert engine.evaluate(shard, model, torch.device("cpu"))["n"] == 6 and summed == [1]  # 3 here, 3 on rank 1


def test_cifar_download_without_network_is_one_line(tmp_path, monkeypatch):
    import urllib.error

    def offline(self):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(datasets.CIFAR10, "download", offline)
    with pytest.raises(datasets.DataError, match="could not download CIFAR10 .*without internet"):
        datasets.build_dataset(True, datasets.DataConfig(data_set="CIFAR10", data_path=str(tmp_path), download=True))


def test_corrupt_and_foreign_checkpoints_via_cli(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_text("garbage")
    code, _, err = run_cli(["--eval", "--resume", bad] + FAST)
    assert code == 2 and "corrupt or not a PyTorch checkpoint" in err
    other = tmp_path / "other.pth"
    torch.save({"model": models.build_model("vit_nano_patch4_32", num_classes=10).state_dict()}, other)
    code, _, err = run_cli(["--eval", "--resume", other] + FAST)
    assert code == 2 and "does not match this architecture" in err


def test_unreadable_images_are_skipped(tmp_path, caplog):
    root = make_image_folder(str(tmp_path / "imgs"), classes=("a", "b"), per_class=(3, 2))
    broken = os.path.join(root, "train", "a", "0.png")
    with open(broken, "wb") as f:
        f.write(b"\x89PNG truncated")
    cfg, _ = flags.settle(main.get_args_parser().parse_args(["--data-path", root, "--input-size", "32"]))
    ds, ncls = datasets.build_dataset(True, datasets.DataConfig.take(cfg))
    assert ncls == 2
    import logging
    log = logging.getLogger("vitcompress")
    log.addHandler(caplog.handler)
    try:
        img, label = ds[0]
    finally:
        log.removeHandler(caplog.handler)
    assert img.shape == (3, 32, 32)
    assert any("skipping unreadable image" in r.message and "0.png" in r.message for r in caplog.records)


def test_train_eval_and_artifacts(tmp_path):
    out = tmp_path / "run"
    code, _, err = run_cli(FAST + ["--epochs", "2", "--max-steps", "3", "--output_dir", out])
    assert code == 0, err
    assert json.loads((out / "args.json").read_text())["model"] == "vit_pico_patch8_32"
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1] and "test_acc1" in lines[0]
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["arch"]["model"] == "vit_pico_patch8_32"
    assert (out / "best.pth").exists()
    code, stdout, err = run_cli(FAST + ["--eval", "--resume", out / "checkpoint.pth"])
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["acc1"] == pytest.approx(lines[-1]["test_acc1"])


def test_imagefolder_training(tmp_path):
    root = make_image_folder(str(tmp_path / "imgs"))
    code, _, err = run_cli(FAST + ["--data-set", "IMAGEFOLDER", "--data-path", root, "--input-size", "32",
                                   "--batch-size", "4", "--epochs", "1", "--output_dir", tmp_path / "o"])
    assert code == 0, err
    ckpt = torch.load(tmp_path / "o" / "checkpoint.pth", weights_only=True)
    assert ckpt["arch"]["num_classes"] == 3


def test_cifar_without_files_asks_for_download(tmp_path):
    code, _, err = run_cli(FAST + ["--data-set", "CIFAR10", "--data-path", tmp_path, "--epochs", "1"])
    assert code == 2 and "pass --download" in err


def test_throughput_uses_the_models_native_size():
    code, out, err = run_cli(["--throughput", "--model", "deit_tiny_patch16_224", "--throughput-batch", "1"])
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert round(result["gmacs"], 1) == 1.3 and result["images_per_s"] > 0 and not result["compressed"]


def test_distillation_from_a_teacher_file_and_finetune_flag(tmp_path):
    code, _, err = run_cli(FAST + ["--epochs", "1", "--max-steps", "2", "--output_dir", tmp_path / "t"])
    assert code == 0, err
    teacher = tmp_path / "t" / "checkpoint.pth"
    code, _, err = run_cli(FAST + ["--epochs", "1", "--max-steps", "2", "--distillation-type", "hard",
                                   "--teacher-path", teacher, "--finetune", teacher, "--output_dir", tmp_path / "s"])
    assert code == 0, err
    assert "initialised from" in err
    code, _, err = run_cli(FAST + ["--epochs", "1", "--distillation-type", "soft"])
    assert code == 2 and "--teacher-path" in err
