"""Train a dense ViT on CLUTTERED_DIGITS with the library alone (no main.py): the recipe tuner.

    python benchmarks/train_cluttered.py --epochs 40 --out output/cluttered_dense
    python benchmarks/train_cluttered.py --epochs 2 --eval-every 1 --val-limit 512   # smoke run

The recipe is main.py's DIGITS recipe (AdamW, cosine schedule with warm-up, label smoothing 0.1,
weight decay 0.05, lr scaled by batch / 512) on the cluttered set; the augmentation is the data
set's own: every epoch composes new placements of the training digits. Prints one JSON line per
evaluation and a final summary line (val top-1, wall-clock, seconds per epoch); with --out it
writes log.jsonl and a model file that models.load_model_file reads.
"""
import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import datasets  # noqa: E402
import engine  # noqa: E402
import models  # noqa: E402
import utils  # noqa: E402


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_nano_d6_patch8_64")
    p.add_argument("--input-size", type=int, default=64)
    p.add_argument("--depth", type=int, default=None, help="override the preset's depth")
    p.add_argument("--embed-dim", type=int, default=None, help="override the preset's width")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--train-repeats", type=int, default=datasets.CLUTTER_TRAIN_REPEATS,
                   help="compositions of each training digit per epoch")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-2, help="base lr, scaled by batch / 512 (as main.py)")
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--warmup-epochs", type=int, default=1)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--smoothing", type=float, default=0.1)
    p.add_argument("--drop-path", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N epochs (0: only at the end)")
    p.add_argument("--val-limit", type=int, default=None, help="evaluate on the first N val images only")
    p.add_argument("--digit-size", type=float, nargs=2, default=None, help="digit side range, fractions of the canvas")
    p.add_argument("--fragments", type=int, nargs=2, default=None, help="clutter fragments per image (range)")
    p.add_argument("--fragment-cut", type=int, nargs=2, default=None, help="fragment cut side range, source px")
    p.add_argument("--noise", type=float, default=None)
    p.add_argument("--out", default=None, help="folder for log.jsonl and model.pth (keep it out of git)")
    return p


def main(argv=None):
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    a = get_parser().parse_args(argv)
    torch.set_num_threads(a.threads)
    utils.seed_everything(a.seed)
    device = torch.device(a.device)

    comp = {k: getattr(a, k) for k in ("digit_size", "fragments", "fragment_cut", "noise") if getattr(a, k) is not None}
    train = datasets.build_cluttered_digits(True, a.input_size, seed=a.seed, train_repeats=a.train_repeats, **comp)
    val = datasets.build_cluttered_digits(False, a.input_size, **comp)
    val_eval = val if a.val_limit is None else torch.utils.data.Subset(val, range(min(a.val_limit, len(val))))
    g = torch.Generator().manual_seed(a.seed)
    train_loader = torch.utils.data.DataLoader(train, batch_size=a.batch_size, shuffle=True, generator=g,
                                               drop_last=True, num_workers=a.workers)
    val_loader = torch.utils.data.DataLoader(val_eval, batch_size=256, num_workers=a.workers)

    model_kwargs = {k: v for k, v in (("depth", a.depth), ("embed_dim", a.embed_dim)) if v}
    model = models.build_model(a.model, num_classes=10, img_size=a.input_size, drop_path_rate=a.drop_path,
                               **model_kwargs).to(device)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=a.lr * a.batch_size / 512.0, weight_decay=a.weight_decay)
    steps = len(train_loader)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=a.epochs, min_lr=a.min_lr,
                                       warmup_lr=1e-6, warmup_epochs=min(a.warmup_epochs, a.epochs - 1),
                                       cooldown_epochs=0, step_on_epochs=False, updates_per_epoch=steps)
    criterion = engine.DistillationLoss(LabelSmoothingCrossEntropy(a.smoothing) if a.smoothing > 0
                                        else torch.nn.CrossEntropyLoss(), None, "none")
    log = open(os.path.join(a.out, "log.jsonl"), "w") if a.out and os.makedirs(a.out, exist_ok=True) is None else None

    t0 = time.time()
    train_seconds = 0.0
    stats = None
    for epoch in range(a.epochs):
        train.set_epoch(epoch)
        torch.manual_seed(a.seed * 1000 + epoch)
        t1 = time.time()
        tr = engine.train_one_epoch(model, criterion, train_loader, optimizer, device, epoch,
                                    total_epochs=a.epochs, log_every=10 ** 9, lr_scheduler=scheduler)
        train_seconds += time.time() - t1
        last = epoch == a.epochs - 1
        if last or (a.eval_every and (epoch + 1) % a.eval_every == 0):
            stats = engine.evaluate(val_loader, model, device)
            rec = {"epoch": epoch, "train_loss": round(tr.get("loss", float("nan")), 4),
                   "val_acc1": round(stats["acc1"], 2), "val_loss": round(stats["loss"], 4),
                   "seconds": round(time.time() - t0, 1)}
            print(json.dumps(rec), flush=True)
            if log:
                log.write(json.dumps(rec) + "\n")
                log.flush()
    total = time.time() - t0
    summary = {"model": a.model, "depth": len(model.blocks), "embed_dim": model.embed_dim, "input_size": a.input_size,
               "epochs": a.epochs, "train_repeats": a.train_repeats,
               "batch_size": a.batch_size, "lr": a.lr, "seed": a.seed, "composition": comp, "val_images": stats["n"],
               "val_acc1": round(stats["acc1"], 2), "seconds": round(total, 1),
               "train_seconds_per_epoch": round(train_seconds / a.epochs, 2), "threads": a.threads,
               "device": a.device, "load_average": [round(x, 2) for x in os.getloadavg()]}
    print(json.dumps(summary), flush=True)
    if a.out:
        arch = models.model_arch(a.model, model, a.input_size, datasets.DIGITS_MEAN, datasets.DIGITS_STD,
                                 model_kwargs=model_kwargs)
        models.save_model_file(os.path.join(a.out, "model.pth"), model.cpu(), arch, extra={"recipe": vars(a),
                                                                                            "val": stats})
        log.close()
    return summary


if __name__ == "__main__":
    main()
