"""--output_dir inside another run's folder (a parent holding run.json, checkpoint.pth or args.json)
is refused in one line before any work; the folder itself may be a run's (reruns, --resume auto),
and the subfolders the tool lays out itself (prune_finetune/, search/, dense/...) are not refused."""
import json
import os

import pytest

from helpers import FAST, run_cli


@pytest.mark.parametrize("marker,sub", [("args.json", "dense"), ("checkpoint.pth", "x"),
                                        ("run.json", os.path.join("search", "again"))])
def test_output_dir_inside_another_run_is_refused(tmp_path, marker, sub):
    run = tmp_path / "run"
    run.mkdir()
    (run / marker).write_text("{}")
    target = run / sub
    code, out, err = run_cli(FAST + ["--epochs", "1", "--max-steps", "1", "--output_dir", target])
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error:") and "inside another run's folder" in lines[0], err
    assert marker in lines[0]
    assert not target.exists()  # refused before any work: nothing made


def test_own_folder_and_tool_made_subfolders_are_accepted(tmp_path):
    d = tmp_path / "d"
    code, _, err = run_cli(FAST + ["--epochs", "1", "--max-steps", "2", "--output_dir", d])
    assert code == 0, err
    assert (d / "args.json").exists() and (d / "checkpoint.pth").exists()
    # the same folder again (it holds args.json itself), and a step the tool lays out under it
    code, _, err = run_cli(FAST + ["--prune_finetune", "--resume", d / "checkpoint.pth", "--head_sparsity", "0.5",
                                   "--finetune-epochs", "0",
                                   "--output_dir", d])
    assert code == 0, err
    assert (d / "prune_finetune" / "run.json").exists()
    json.load(open(d / "args.json"))
