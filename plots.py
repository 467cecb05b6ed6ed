"""Every figure the tool draws, written as PNG files beside the run's logs.

* ``plot_history``: the search, every evaluated policy and the best so far (``search/search.png``);
* ``plot_training``: training loss and val top-1 per epoch from a ``log.jsonl`` (``training.png``);
* ``plot_summary``: the pipeline's models, val top-1 against measured images/s and against GMACs
  (``summary.png``).

matplotlib is imported only when a figure is drawn, and only its headless Agg canvas is used (no
pyplot, no global backend switch, no display needed). A figure never fails a run: whatever goes
wrong (matplotlib missing, nothing to draw, a folder that cannot be written) is one warning line
and the function returns False; True when the PNG was written (atomically: temp file, rename).
"""
import logging
import math
import os

from utils import clean_message, read_jsonl

logger = logging.getLogger("vitcompress")


def _draw(path, what, draw, size=(6, 3.5)):
    """Make a figure of ``size`` inches, let ``draw(fig)`` fill it and write it to ``path``."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning(f"matplotlib is not installed: no {what} plot ({path}); pip install matplotlib")
        return False
    tmp = f"{path}.tmp{os.getpid()}.png"
    try:
        fig = Figure(figsize=size)
        FigureCanvasAgg(fig)
        draw(fig)
        fig.tight_layout()
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
        return True
    except Exception as e:  # a figure must never fail the run it illustrates: name the cause, go on
        logger.warning(f"no {what} plot ({path}): {type(e).__name__}: {clean_message(e, 160)}")
        return False
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _number(value):
    """``value`` as a finite float, or None."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def plot_history(history, path, ylabel="search objective"):
    """Scatter of every evaluation of a search (``history``: records with ``step``, ``y`` and
    ``phase``, "init" for the random population) and the best so far. Returns True when written."""
    points = [(r["step"], y) for r in history if (y := _number(r.get("y"))) is not None]
    n_init = sum(1 for r in history if r.get("phase") == "init")

    def draw(fig):
        if not points:
            raise ValueError("the search history holds no evaluation")
        ax = fig.subplots()
        steps, ys = zip(*points)
        best = [max(ys[:i + 1]) for i in range(len(ys))]
        ax.scatter(steps, ys, s=12, label="evaluated policy")
        ax.plot(steps, best, color="C1", label="best so far")
        if n_init:
            ax.axvline(n_init - 0.5, color="grey", linestyle=":", label="end of random population")
        ax.set_xlabel("evaluation")
        ax.set_ylabel(ylabel)
        ax.legend(loc="lower right")
    return _draw(path, "search", draw)


def plot_training(log_path, path):
    """Training loss (and val loss) and val top-1 (and its EMA's) per epoch, from the
    ``log.jsonl`` that engine.fit writes (``epoch``, ``train_loss``, ``test_loss``, ``test_acc1``,
    ``ema_acc1``). Returns True when written."""
    records = read_jsonl(log_path)

    def series(key):
        pts = [(r["epoch"], v) for r in records if "epoch" in r and (v := _number(r.get(key))) is not None]
        return list(zip(*pts)) if pts else None

    def draw(fig):
        if not records:
            raise ValueError(f"{log_path} holds no epoch")
        loss_ax, acc_ax = fig.subplots(1, 2)
        for ax, keys, ylabel in ((loss_ax, (("train_loss", "train"), ("test_loss", "val")), "loss"),
                                 (acc_ax, (("test_acc1", "val"), ("ema_acc1", "val, EMA weights")), "val top-1 (%)")):
            for key, label in keys:
                pts = series(key)
                if pts:
                    ax.plot(pts[0], pts[1], marker="o", markersize=3, label=label)
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylabel)
            if ax.lines:
                ax.legend()
        if not (loss_ax.lines or acc_ax.lines):
            raise ValueError(f"{log_path} holds no loss or accuracy")
    return _draw(path, "training", draw, size=(9, 3.5))


def plot_summary(rows, path):
    """The pipeline's dense and compressed models (``rows`` of engine.compare_models: ``model``,
    ``gmacs``, ``acc1``, ``images_per_s``): val top-1 against measured images/s and against GMACs,
    one labelled point per model, the dense model (``model`` "dense") as a star. Returns True when
    written."""
    rows = list(rows)

    def draw(fig):
        if not rows:
            raise ValueError("no models to compare")
        speed_ax, macs_ax = fig.subplots(1, 2, sharey=True)
        for ax, key, xlabel in ((speed_ax, "images_per_s", "measured images/s"), (macs_ax, "gmacs", "GMACs")):
            for i, row in enumerate(rows):
                x, y = _number(row.get(key)), _number(row.get("acc1"))
                if x is None or y is None:
                    continue
                dense = row.get("model") == "dense"
                ax.scatter([x], [y], s=90 if dense else 40, marker="*" if dense else "o", color=f"C{i % 10}",
                           zorder=3)
                ax.annotate(str(row.get("model", i)), (x, y), textcoords="offset points", xytext=(5, 5),
                            fontsize=8)
            ax.set_xlabel(xlabel)
            ax.margins(0.18)  # room for the labels of the outermost points
            ax.grid(alpha=0.3)
        speed_ax.set_ylabel("val top-1 (%)")
        if not (speed_ax.collections or macs_ax.collections):
            raise ValueError("no model has both a val top-1 and a speed or GMACs")
        fig.suptitle("dense vs compressed: accuracy against speed and cost", fontsize=10)
    return _draw(path, "summary", draw, size=(9, 3.8))
