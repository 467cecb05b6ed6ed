"""A flag never silently does nothing: every flag of --help is in flags.FLAG_SCOPES, and a flag given
where it does not act is refused in one line or warned about once; the README's three command lines
and the flags at their defaults settle with no warning. Nothing here trains or loads a model."""
import os
import re

import pytest

import flags
import main
import models
import utils
from helpers import FAST, ROOT, run_cli


def parse(argv):
    return main.Parser("main.py", parents=[main.get_args_parser()]).parse_args([str(a) for a in argv])


def settle(argv):
    return flags.settle(parse(argv))[0]


def warnings_of(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]


def test_every_flag_of_help_is_in_the_table():
    parser = main.Parser("main.py", parents=[main.get_args_parser()])
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    missing = sorted(dests - set(flags.FLAG_SCOPES))
    assert not missing, f"flags of --help that flags.FLAG_SCOPES does not place: {missing}"
    assert not set(flags.FLAG_SCOPES) - dests, "FLAG_SCOPES names flags that --help no longer has"
    scopes = flags.flag_scopes()
    assert {s for names in flags.FLAG_SCOPES.values() for s in names} <= set(scopes)
    assert all(action in ("refuse", "warn") for action, _, _ in scopes.values())


def seed_command_lines():
    """The three command lines of README's 'The three steps', as the arguments main.py gets."""
    text = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"## The three steps.*?```bash\n(.*?)```", text, re.S).group(1)
    commands = [c for c in block.replace("\\\n", " ").splitlines() if c.strip() and not c.startswith("#")]
    assert len(commands) == 3
    return [c.split("main.py", 1)[1].split() for c in commands]


def test_the_seed_command_lines_settle_with_no_warning(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)  # ./logs is created here
    monkeypatch.setattr(models, "read_model_file", lambda path: {})  # ./logs/deit_small.pth, never read
    monkeypatch.setattr(models, "inspect_checkpoint", lambda ckpt, path: {"model": None, "input_size": None,
                                                                          "arch": None, "training": False})
    pretrain, search, prune = seed_command_lines()
    assert "--eval" in search and "--search" in search
    for argv, mode in ((pretrain, "train"), (search, "search"), (prune, "prune_finetune")):
        cfg = settle(argv)
        assert flags.run_mode(cfg) == mode
        assert warnings_of(capsys) == [], argv


@pytest.mark.parametrize("argv", [
    [],
    ["--eval", "--search", "--search-reduction", "0.4", "--search_epoch", "1", "--search_population", "2",
     "--criterion-batches", "1", "--search-pool", "200", "--search-tol", "0.05", "--search-holdout", "40"],
    ["--prune_finetune", "--head_sparsity", "0.5", "--finetune-epochs", "0", "--max-steps", "2"],
    ["--pipeline", "--epochs", "1", "--pipeline-reductions", "0.4", "--finetune-epochs", "1", "--search_epoch", "2",
     "--throughput-batch", "8", "--output_dir", "{tmp}"],
    ["--throughput", "--throughput-batch", "4", "--compile"],
    ["--search", "--criterion", "hsic", "--head-alpha", "0.5", "--neuron-magnitude", "contribution",
     "--search-reduction", "0.4"],
    ["--eval", "--no-model-ema", "--no-repeated-aug", "--epochs", "3"],  # a training command line plus --eval
    ["--search-tol", "0.02", "--pipeline-reductions", "0.4,0.6", "--head-alpha", "1"],  # the defaults, spelled out
    ["--data-set", "DIGITS", "--data-path", ""],  # test_slurm's '--data-path ""': no data path
])
def test_fitting_flags_settle_quietly(argv, tmp_path, capsys):
    settle(FAST + [str(a).replace("{tmp}", str(tmp_path / "out")) for a in argv])
    assert warnings_of(capsys) == []


@pytest.mark.parametrize("argv,message", [
    (["--search", "--head-alpha", "0.5"], "--head-alpha applies to --criterion hsic, not taylor (the default); "
                                          "add --criterion hsic or drop --head-alpha"),
    (["--prune_finetune", "--neuron-magnitude", "contribution", "--criterion", "taylor"],
     "--neuron-magnitude applies to --criterion hsic, not taylor"),
    (["--search", "--hsic-kernel", "original", "--head-lambda", "0.2"], "--head-lambda applies to the scaled HSIC"),
    (["--search", "--criterion", "magnitude", "--criterion-batches", "2"], "not --criterion magnitude"),
    (["--search", "--head_sparsity", "0.5"], "--head_sparsity applies to --prune_finetune"),
    (["--policy", "hou2022-deit-s"], "--policy applies to --prune_finetune"),
    (["--prune_finetune", "--search_flops", "1.84"], "--search_flops applies to --search"),
    (["--pipeline", "--search-reduction", "0.4", "--output_dir", "{tmp}"], "--search-reduction applies to --search"),
    (["--pipeline-reductions", "0.5"], "--pipeline-reductions applies to --pipeline; add --pipeline or drop"),
    (["--compile"], "--compile applies to --throughput measurements; add --throughput or drop --compile"),
    (["--cuda-graph"], "--cuda-graph applies to --throughput measurements"),  # as check_speed_flags says it
    (["--head_pruning"], "--head_pruning applies to compressing"),
    (["--search", "--prune_finetune"], "--prune_finetune applies to its own run, not to this --search run"),
    (["--pipeline", "--throughput", "--output_dir", "{tmp}"], "--throughput applies to its own run, not to this "
                                                              "--pipeline run"),
])
def test_contradicting_flags_are_refused_in_one_line(argv, message, tmp_path):
    argv = FAST + [str(a).replace("{tmp}", str(tmp_path / "out")) for a in argv]
    with pytest.raises(utils.UserError, match=re.escape(message)):
        settle(argv)
    code, out, err = run_cli(argv)
    assert code == 2 and out == "" and err.startswith("error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("argv,message", [
    (["--search-pool", "10"], "--search-pool is not used: it applies to searching"),
    (["--prune_finetune", "--search-population", "3"], "--search_population is not used"),
    (["--search", "--search-mode", "random", "--search-pool", "10"], "--search-pool is not used: it applies to "
                                                                     "--search-mode ei"),
    (["--search-objective", "kl"], "--search-objective is not used"),
    (["--head-alpha", "0.5"], "--head-alpha is not used: it applies to ranking heads and neurons"),
    (["--criterion", "hsic", "--eval"], "--criterion is not used"),
    (["--finetune-epochs", "3"], "--finetune-epochs is not used: it applies to prune+finetune"),
    (["--search", "--recipe", "paper"], "--recipe is not used"),
    (["--prune_finetune", "--epochs", "3"], "--epochs is not used: it applies to pretraining; prune+finetune "
                                            "trains for --finetune-epochs"),
    (["--throughput-batch", "8"], "--throughput-batch is not used"),
    (["--eval", "--throughput"], "--eval is not used"),
    (["--teacher-model", "regnety_002"], "--teacher-model is not used"),
    (["--prune_finetune", "--teacher-path", "t.pth"], "--teacher-path is not used"),
    (["--distillation-type", "hard", "--teacher-path", "t.pth", "--distillation-tau", "2"],
     "--distillation-tau is not used: it applies to soft distillation"),
    (["--model-ema-decay", "0.9"], "--model-ema-decay is not used"),  # DIGITS trains with no EMA
    (["--mixup-prob", "0.5"], "--mixup-prob is not used"),  # DIGITS: no mixup, no cutmix
    (["--aa", "rand-m9-mstd0.5-inc1"], "--aa is not used: it applies to the augmentation of image data sets; DIGITS"),
    (["--download"], "--download is not used"),
    (["--data-set", "DIGITS", "--data-path", "/data"], "--data-path is not used"),
    (["--resume", "x.pth", "--drop-path", "0.1"], "--drop-path is not used"),
    (["--round-to", "16"], "--round-to is not used: it applies to compressing"),
    (["--sched", "cosine", "--decay-epochs", "10"], "--decay-epochs is not used"),
    (["--world_size", "3"], "--world_size is not used: it applies to nothing in this tool"),
    (["--no-amp"], "--no-amp is not used: it applies to mixed precision on CUDA"),
    (["--amp-dtype", "float16"], "--amp-dtype is not used"),
])
def test_flags_that_do_nothing_are_warned_about_once(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(models, "read_model_file", lambda path: {})
    monkeypatch.setattr(models, "inspect_checkpoint", lambda ckpt, path: {"model": None, "input_size": None,
                                                                          "arch": None, "training": False})
    settle(FAST + argv + ["--device", "cpu"])
    lines = warnings_of(capsys)
    assert len(lines) == 1 and message in lines[0], lines


def test_the_model_ema_pair_counts_the_flag_given(capsys):
    settle(FAST + ["--model-ema", "--model-ema-decay", "0.9"])  # EMA on: the decay acts
    assert warnings_of(capsys) == []
    settle(FAST + ["--no-model-ema", "--model-ema-decay", "0.9"])
    assert len(warnings_of(capsys)) == 1


def test_other_ranks_stay_quiet(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    settle(FAST + ["--search-pool", "10"])
    assert warnings_of(capsys) == []
    with pytest.raises(utils.UserError, match="--compile applies to --throughput"):  # every rank refuses
        settle(FAST + ["--compile"])

