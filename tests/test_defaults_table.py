"""Per-data-set defaults come from one table (flags.DATA_SET_DEFAULTS): settle applies it, --help
shows it, --data-set X --help shows X's row alone; DeiT-only flags are hidden from --help."""
import argparse
import contextlib
import io

import pytest

import flags
import main


def help_of(argv=()):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main.cli(list(argv) + ["--help"])
    return " ".join(out.getvalue().split())  # argparse wraps lines: compare on single spaces


def flag_helps(data_set=None):
    parser = main.get_args_parser(data_set)
    return {a.dest: a.help for a in parser._actions if a.help}


def shown(value):
    return "on" if value is True else "off" if value is False else str(value)


def test_every_per_data_set_default_is_shown_from_the_table():
    helps = flag_helps()
    for key in flags.DATA_SET_DEFAULTS["IMAGE"]:
        assert key in helps, f"--help says nothing of {key}'s per-data-set default"
        for name, row in flags.DATA_SET_DEFAULTS.items():
            assert shown(row[key]) in helps[key], (key, name, helps[key])
    # a value the data sets share is said once, one that differs once per data set
    assert "(default 0.05)" in helps["weight_decay"]
    assert "(IMNET: 30, DIGITS: 15, CLUTTERED_DIGITS: 6)" in helps["finetune_epochs"]


@pytest.mark.parametrize("data_set", ["CLUTTERED_DIGITS", "DIGITS", "IMNET", "CIFAR10"])
def test_data_set_help_shows_its_row_alone(data_set):
    text = help_of(["--data-set", data_set.lower()])
    row = flags.data_set_defaults(data_set)
    assert f"finetuning epochs (default on {data_set}: {row['finetune_epochs']})" in text
    assert f"(default on {data_set}: {row['model']})" in text
    others = [name for name in ("IMNET", "DIGITS", "CLUTTERED_DIGITS") if name != data_set]
    assert not [name for name in others if f" {name}:" in text or f"({name}:" in text]


def test_settle_takes_the_table_and_a_given_flag_wins():
    parse = main.Parser("main.py", parents=[main.get_args_parser()]).parse_args
    for data_set in ("CLUTTERED_DIGITS", "DIGITS"):
        cfg, _ = flags.settle(parse(["--data-set", data_set]))
        for key, value in flags.DATA_SET_DEFAULTS[data_set].items():
            assert getattr(cfg, key) == value, (data_set, key)
    cfg, _ = flags.settle(parse(["--data-set", "CLUTTERED_DIGITS", "--finetune-epochs", "2"]))
    assert cfg.finetune_epochs == 2


def test_given_data_set_reads_the_command_line_before_parsing():
    assert flags.given_data_set(["--epochs", "3", "--data_set=cifar"]) == "CIFAR100"
    assert flags.given_data_set(["--data-set", "cluttered_digits", "--help"]) == "CLUTTERED_DIGITS"
    assert flags.given_data_set(["--data-set", "nonsense"]) is None
    assert flags.given_data_set(["--help"]) is None


def test_deit_only_flags_are_hidden_but_accepted():
    text = help_of()
    for flag in ("--start_epoch", "--world_size"):
        assert flag not in text
    args = main.Parser("main.py", parents=[main.get_args_parser()]).parse_args(
        ["--start_epoch", "5", "--world_size", "8"])
    assert isinstance(args, argparse.Namespace) and (args.start_epoch, args.world_size) == (5, 8)


def test_cooldown_epochs_add_epochs_at_the_minimum_lr(tmp_path):
    """--cooldown-epochs reaches the scheduler as in timm's train.py: the run lasts --epochs plus
    the cool-down epochs, and these run at --min-lr."""
    import torch

    import engine
    import models
    import utils

    parse = main.Parser("main.py", parents=[main.get_args_parser()]).parse_args
    cfg, _ = flags.settle(parse(["--cooldown-epochs", "2", "--epochs", "2", "--min-lr", "1e-4", "--device", "cpu"]))
    recipe = main.make_recipe(cfg, world_size=1)
    assert (recipe.epochs, recipe.cooldown_epochs, recipe.min_lr) == (2, 2, 1e-4)
    recipe = engine.Recipe(epochs=2, cooldown_epochs=2, lr=1e-2, min_lr=1e-4, warmup_epochs=0, max_steps=2,
                           log_every=0)
    torch.manual_seed(0)
    data = [(torch.randn(3, 32, 32), i % 10) for i in range(8)]
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    model = models.build_model("vit_pico_patch8_32", num_classes=10)
    engine.fit(model, loader, loader, recipe=recipe, num_classes=10, run_dir=str(tmp_path), device=torch.device("cpu"))
    log = utils.read_jsonl(str(tmp_path / "log.jsonl"))
    assert [r["epoch"] for r in log] == [0, 1, 2, 3]
    assert log[0]["train_lr"] > 10 * recipe.min_lr
    assert [r["train_lr"] for r in log[2:]] == [recipe.min_lr] * 2
