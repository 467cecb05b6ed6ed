"""The figures: each is a real PNG with something drawn on it, drawn by default where the tool
writes its logs, and a figure that cannot be drawn is one warning line, never a failed run."""
import json
import logging
import os

import numpy as np
import pytest

import plots
import utils
from helpers import FAST, run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_real_png(path):
    """A PNG file (magic bytes) of some size whose pixels are not all one colour."""
    import matplotlib.image
    data = open(path, "rb").read()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 5000, (path, len(data))
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0).shape[0] > 10, path


SUMMARY_ROWS = [
    {"model": "dense", "gmacs": 0.0104, "acc1": 91.0, "images_per_s": 5200.0, "params": 51000},
    {"model": "-40% GMACs", "gmacs": 0.0062, "acc1": 89.5, "images_per_s": 7900.0, "params": 34000},
    {"model": "-60% GMACs", "gmacs": 0.0042, "acc1": 86.0, "images_per_s": 10100.0, "params": 27000},
]


def test_summary_plot(tmp_path):
    path = tmp_path / "summary.png"
    assert plots.plot_summary(SUMMARY_ROWS, str(path)) is True
    assert_real_png(path)
    assert os.listdir(tmp_path) == ["summary.png"]  # no temporary file left


def test_training_plot_from_a_log(tmp_path):
    log = tmp_path / "log.jsonl"
    for epoch in range(4):
        utils.append_jsonl(str(log), {"epoch": epoch, "train_loss": 2.0 / (epoch + 1), "train_lr": 1e-3,
                                      "test_loss": 2.2 / (epoch + 1), "test_acc1": 40.0 + 10 * epoch,
                                      "test_acc5": 90.0})
    assert plots.plot_training(str(log), str(tmp_path / "training.png")) is True
    assert_real_png(tmp_path / "training.png")


def test_search_plot_moved_here(tmp_path):
    import expected_improvement
    assert not hasattr(expected_improvement, "plot_history")  # the GP + EI module draws nothing
    history = [{"step": i, "y": float(np.sin(i)), "phase": "init" if i < 4 else "ei"} for i in range(10)]
    assert plots.plot_history(history, str(tmp_path / "search.png"), "top-1") is True
    assert_real_png(tmp_path / "search.png")


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_a_figure_that_cannot_be_drawn_is_one_warning_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases = [(plots.plot_summary, SUMMARY_ROWS, str(blocker / "summary.png")),   # a folder that is a file
             (plots.plot_summary, [{"model": "dense"}], str(tmp_path / "s.png")),  # nothing to draw
             (plots.plot_training, str(tmp_path / "missing.jsonl"), str(tmp_path / "t.png")),
             (plots.plot_history, [], str(tmp_path / "h.png"))]
    logger, collect = logging.getLogger("vitcompress"), Collect()
    logger.addHandler(collect)
    try:
        for fn, arg, path in cases:
            collect.messages.clear()
            assert fn(arg, path) is False
            assert len(collect.messages) == 1 and "\n" not in collect.messages[0], collect.messages
            assert path in collect.messages[0], collect.messages
            assert not os.path.exists(path)
    finally:
        logger.removeHandler(collect)
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_training_writes_its_plot(tmp_path):
    out = tmp_path / "run"
    code, _, err = run_cli(FAST + ["--epochs", "2", "--max-steps", "2", "--output_dir", out])
    assert code == 0, err
    assert [r["epoch"] for r in utils.read_jsonl(str(out / "log.jsonl"))] == [0, 1]
    assert_real_png(out / "training.png")


@pytest.mark.slow
def test_pipeline_draws_every_figure_by_default(tmp_path):
    out = tmp_path / "pipe"
    code, _, err = run_cli(FAST + ["--max-steps", "3", "--epochs", "1", "--search_epoch", "1", "--search_population",
                                   "2", "--criterion-batches", "1", "--pipeline", "--pipeline-reductions", "0.4",
                                   "--finetune-epochs", "1", "--output_dir", out, "--throughput-batch", "8"])
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert [r["model"] for r in summary["rows"]][0] == "dense" and len(summary["rows"]) == 2
    for png in ("summary.png", "dense/training.png", "reduce40/search/search.png",
                "reduce40/prune_finetune/training.png"):
        assert_real_png(out / png)
