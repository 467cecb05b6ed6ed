"""Write a grid of CLUTTERED_DIGITS samples as a PNG and print the class balance.

    python scripts/cluttered_samples.py                      # docs/cluttered_digits.png, 64 px
    python scripts/cluttered_samples.py --rows 3 --cols 8 --out /tmp/grid.png --split train

Each tile is one composed image (greyscale, as the model sees it before normalisation) with its
label in the corner; the digit's box is outlined in the --boxes variant. The balance table counts
labels in the training set (one epoch), its un-augmented copy and the validation set.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import datasets  # noqa: E402


def grid_image(ds, indices, cols, pad=2, boxes=False):
    from PIL import Image, ImageDraw
    side = ds.canvas
    rows = -(-len(indices) // cols)
    sheet = Image.new("L", (cols * (side + pad) + pad, rows * (side + pad) + pad), color=128)
    draw = ImageDraw.Draw(sheet)
    for k, i in enumerate(indices):
        y, x = pad + (k // cols) * (side + pad), pad + (k % cols) * (side + pad)
        sheet.paste(Image.fromarray(ds.canvas_uint8(i)), (x, y))
        if boxes:
            top, left, h, w = ds.layout(i)["box"]
            draw.rectangle([x + left, y + top, x + left + w - 1, y + top + h - 1], outline=160)
        draw.text((x + 2, y + 1), str(ds.targets[i]), fill=255)
    return sheet


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/cluttered_digits.png")
    p.add_argument("--input-size", type=int, default=64)
    p.add_argument("--split", choices=["val", "train"], default="val")
    p.add_argument("--rows", type=int, default=3)
    p.add_argument("--cols", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="picks which images are shown")
    p.add_argument("--boxes", action="store_true", help="outline the labelled digit")
    args = p.parse_args(argv)

    val = datasets.build_cluttered_digits(False, args.input_size)
    train = datasets.build_cluttered_digits(True, args.input_size, fresh=True)
    ds = val if args.split == "val" else train
    rng = np.random.default_rng(args.seed)
    picks = rng.choice(len(ds), size=args.rows * args.cols, replace=False).tolist()
    sheet = grid_image(ds, picks, args.cols, boxes=args.boxes)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    sheet.save(args.out, optimize=True)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1024:.1f} KB, {len(picks)} {args.split} images "
          f"of {args.input_size} px)")

    plain = datasets.build_cluttered_digits(True, args.input_size, fresh=False)
    print("| class | " + " | ".join(str(c) for c in range(10)) + " | total |")
    print("|---" * 12 + "|")
    for name, d in (("train (per epoch)", train), ("train, un-augmented", plain), ("val", val)):
        counts = np.bincount(d.targets, minlength=10)
        print(f"| {name} | " + " | ".join(str(c) for c in counts) + f" | {counts.sum()} |")


if __name__ == "__main__":
    main()
