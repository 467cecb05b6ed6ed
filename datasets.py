"""Data sets, transforms, samplers and the search split.

- DIGITS: scikit-learn's 1,797 handwritten digits (8x8, shipped inside scikit-learn, no
  download), a fixed stratified train/val split, upsampled to the input size, 3 channels.
- CLUTTERED_DIGITS: the same digits, each enlarged at a random position and scale on a larger
  canvas (the input size, 64 px by default) among fragments of other digits and mild noise;
  training images are composed afresh every epoch, validation is a fixed set of 5,400.
- IMNET: ImageNet as ``train/`` and ``val/`` class folders under the data path.
- IMAGEFOLDER: any ``train/`` + ``val/`` class-folder tree.
- CIFAR10 / CIFAR100 (``--data-set CIFAR`` means CIFAR-100, as in DeiT): torchvision's
  files under the data path; downloaded only with ``--download``.

Unreadable or truncated images in folder data sets are skipped with a warning (each file
once) and replaced by the next readable image, so one bad file does not end a long run.
"""
import dataclasses
import logging
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from timm.data import create_transform
from torch.utils.data import Dataset, Sampler
from torchvision import transforms
from torchvision.datasets import CIFAR10, CIFAR100, ImageFolder

from utils import UserError, clean_message, get_rank, get_world_size, settings_from

logger = logging.getLogger("vitcompress")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DIGITS_MEAN = (0.5, 0.5, 0.5)
DIGITS_STD = (0.5, 0.5, 0.5)
DATA_SETS = ("DIGITS", "CLUTTERED_DIGITS", "IMNET", "IMAGEFOLDER", "CIFAR10", "CIFAR100")


class DataError(UserError):
    pass


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What building data needs, settled once by the caller (the CLI passes its settled
    configuration through ``DataConfig.take``; Python users construct it directly)."""
    data_set: str = "DIGITS"
    data_path: str = ""
    input_size: int = 32
    batch_size: int = 64
    num_workers: int = 0
    pin_mem: bool = False
    download: bool = False
    color_jitter: float = 0.3
    aa: str = "none"
    train_interpolation: str = "bicubic"
    reprob: float = 0.0
    remode: str = "pixel"
    recount: int = 1
    eval_crop_ratio: float = 0.875
    repeated_aug: bool = False
    ra_reps: int = 3
    seed: int = 0
    dist_eval: bool = False

    take = classmethod(settings_from)  # DataConfig.take(cfg, **overrides)


# --------------------------------------------------------------------------- digits

def digits_split(seed=0, val_fraction=0.2):
    """Fixed stratified split of scikit-learn's digits: (x_train, y_train, x_val, y_val).

    Images are float32 in [0, 1], shape [n, 8, 8].
    """
    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    x_tr, x_va, y_tr, y_va = train_test_split(x, y, test_size=val_fraction, random_state=seed, stratify=y)
    return x_tr, y_tr, x_va, y_va


class DigitsDataset(Dataset):
    """Digits as [3, S, S] normalised tensors; light affine augmentation in training (no flips)."""

    def __init__(self, images, labels, input_size=32, train=False, reprob=0.0, mean=DIGITS_MEAN, std=DIGITS_STD):
        imgs = torch.from_numpy(images).unsqueeze(1)  # [n, 1, 8, 8]
        imgs = F.interpolate(imgs, size=(input_size, input_size), mode="bilinear", align_corners=False)
        imgs = imgs.clamp(0, 1).expand(-1, 3, -1, -1)
        mean_t = torch.tensor(mean).view(1, 3, 1, 1)
        std_t = torch.tensor(std).view(1, 3, 1, 1)
        self.images = ((imgs - mean_t) / std_t).contiguous()
        self.targets = [int(t) for t in labels]
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.train = train
        self.input_size = input_size
        self.classes = [str(i) for i in range(10)]
        self.background = float((0 - mean[0]) / std[0])
        self.eraser = None
        if train and reprob > 0:
            from timm.data.random_erasing import RandomErasing
            self.eraser = RandomErasing(probability=reprob, mode="pixel", device="cpu")

    def __len__(self):
        return len(self.targets)

    def augment_batch(self, imgs):
        """Small random rotation, scale and shift per image (a handwriting jitter), in one
        batched resampling call; then random erasing when asked."""
        n = imgs.shape[0]
        angle = torch.empty(n).uniform_(-12, 12) * (math.pi / 180)
        scale = torch.empty(n).uniform_(0.9, 1.1)
        shift = torch.empty(n, 2).uniform_(-0.1, 0.1)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = torch.cos(angle) / scale
        theta[:, 0, 1] = -torch.sin(angle) / scale
        theta[:, 1, 0] = torch.sin(angle) / scale
        theta[:, 1, 1] = torch.cos(angle) / scale
        theta[:, :, 2] = shift
        grid = F.affine_grid(theta, list(imgs.shape), align_corners=False)
        out = F.grid_sample(imgs - self.background, grid, align_corners=False, padding_mode="zeros")
        out = out + self.background
        if self.eraser is not None:
            out = torch.stack([self.eraser(img) for img in out])
        return out

    def collate(self, batch):
        imgs = torch.stack([b[0] for b in batch])
        labels = torch.tensor([b[1] for b in batch], dtype=torch.int64)
        if self.train:
            imgs = self.augment_batch(imgs)
        return imgs, labels

    def __getitem__(self, index):
        # augmentation happens per batch in ``collate`` (one resampling call per batch)
        return self.images[index], int(self.targets[index])


# --------------------------------------------------------------------------- cluttered digits

# Composition of one cluttered image, as fractions of the canvas side where a size is involved
# (so any input size works; the numbers below are for the 64 px default).
CLUTTER_DIGIT_SIZE = (0.375, 0.5)     # side of the enlarged 8x8 digit: 24-32 px on 64 px
CLUTTER_FRAGMENTS = (3, 5)            # fragments of other digits per image (inclusive range)
CLUTTER_FRAGMENT_CUT = (2, 3)         # a fragment is a cut of 2x2 to 3x3 of a digit's 8x8 pixels...
CLUTTER_NOISE = 0.05                  # ...enlarged like a digit; then Gaussian noise of this sd
CLUTTER_TRAIN_REPEATS = 8             # training: an epoch composes each of the 1,437 digits 8 times
CLUTTER_VAL_PER_DIGIT = 15            # validation: 15 compositions of each of the 360 held-out digits
CLUTTER_DATA_SEED = 20240611          # fixed placements (validation, un-augmented training set)
_STREAM_FRESH, _STREAM_FIXED_TRAIN, _STREAM_VAL = 0, 1, 2


def _resize_matrix(n_in, n_out):
    """[n_out, n_in] bilinear interpolation matrix (half-pixel centres, edges clamped: what
    F.interpolate(mode="bilinear", align_corners=False) does along one axis when enlarging)."""
    pos = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    pos = np.clip(pos, 0, n_in - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    w = pos - lo
    m = np.zeros((n_out, n_in), dtype=np.float32)
    m[np.arange(n_out), lo] += 1 - w
    m[np.arange(n_out), hi] += w
    return m




class ClutteredDigits(Dataset):
    """Cluttered digits: one enlarged scikit-learn digit per canvas among fragments of others.

    Image ``index`` shows digit ``index % len(images)`` of the pool ``images`` [n, 8, 8] (values in
    [0, 1]), so every digit appears equally often and the class balance is the pool's. Its side is
    drawn from CLUTTER_DIGIT_SIZE (times ``canvas``) and it lies wholly inside the canvas at a
    uniform random position. Then 3-5 fragments: a random 2x2 to 3x3 cut (with ink) of another
    digit OF THE SAME POOL, enlarged by the same kind of factor, anywhere on the canvas; pixels
    combine by maximum. Finally Gaussian noise (sd CLUTTER_NOISE), clipped to [0, 1] and quantised
    to 8 bits. The label is the whole digit's.

    Every random draw comes from a generator seeded with (seed, stream, epoch, index), so an image
    depends on nothing else: DDP ranks, data-loader workers and a resumed run compose the same one.
    ``fresh=True`` (training) uses the epoch set by ``set_epoch`` (new placements each epoch);
    ``fresh=False`` composes every image once, at epoch 0, and keeps the uint8 canvases.

    Returns ([3, canvas, canvas] float tensor normalised by mean/std, int label), like DigitsDataset.
    """

    def __init__(self, images, labels, canvas=64, length=None, seed=CLUTTER_DATA_SEED, stream=_STREAM_VAL,
                 fresh=False, digit_size=CLUTTER_DIGIT_SIZE, fragments=CLUTTER_FRAGMENTS,
                 fragment_cut=CLUTTER_FRAGMENT_CUT, noise=CLUTTER_NOISE, mean=DIGITS_MEAN, std=DIGITS_STD):
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 3 or images.shape[0] < 2:
            raise DataError("cluttered digits need a pool of at least two [h, w] digits")
        if int(canvas) < 2 * images.shape[1]:
            raise DataError(f"cluttered digits need an input size of at least {2 * images.shape[1]} px, got {canvas}")
        self.pool = images
        self.pool_labels = np.asarray(labels, dtype=np.int64)
        self.canvas = int(canvas)
        self.length = int(length) if length is not None else len(images)
        self.seed, self.stream, self.fresh = int(seed), int(stream), bool(fresh)
        self.digit_size = (float(digit_size[0]), float(digit_size[1]))
        self.fragments = (int(fragments[0]), int(fragments[1]))
        self.fragment_cut = (int(fragment_cut[0]), int(fragment_cut[1]))
        if not (0 < self.digit_size[0] <= self.digit_size[1] <= 1):
            raise DataError(f"digit_size {digit_size} must be fractions of the canvas, 0 < low <= high <= 1")
        if not (0 <= self.fragments[0] <= self.fragments[1]):
            raise DataError(f"fragments {fragments} must be a range 0 <= low <= high")
        if not (1 <= self.fragment_cut[0] <= self.fragment_cut[1] <= min(images.shape[1:])):
            raise DataError(f"fragment_cut {fragment_cut} must be a range of cut sides within the digits' side")
        self.noise = float(noise)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self._gain, self._shift = 1.0 / (255.0 * std_t), -mean_t / std_t
        self.epoch = 0
        self.targets = [int(self.pool_labels[i % len(images)]) for i in range(self.length)]
        self.classes = [str(i) for i in range(10)]
        # the bilinear matrices every enlargement needs, [out, in] for in = a digit's side or a cut's
        cuts = range(self.fragment_cut[0], self.fragment_cut[1] + 1)
        sides = {*cuts, *images.shape[1:]}
        self._resize = {(k, m): _resize_matrix(k, m) for k in sides for m in range(1, self.canvas + 1)}
        # ink of every cut of every pool digit: [n, h - ch + 1, w - cw + 1] per cut size (ch, cw)
        windows = np.lib.stride_tricks.sliding_window_view
        self._ink = {(ch, cw): windows(images, (ch, cw), axis=(1, 2)).sum(axis=(-2, -1)) for ch in cuts for cw in cuts}
        self._canvases = None
        if not self.fresh:
            self._canvases = np.stack([self.compose(i, 0)[0] for i in range(self.length)])

    def __len__(self):
        return self.length

    def set_epoch(self, epoch):
        """Placements of a fresh (training) set are redrawn from (seed, epoch, index)."""
        self.epoch = int(epoch)

    def _rng(self, index, epoch):
        return np.random.default_rng([self.seed, self.stream, int(epoch), int(index)])

    def layout(self, index, epoch=None):
        """The draws behind image ``index``: {"digit": pool index, "box": (top, left, h, w),
        "fragments": [(pool index, (row, col, cut_h, cut_w), (top, left, h, w)), ...]}."""
        return self.compose(index, self.epoch if epoch is None else epoch)[1]

    def compose(self, index, epoch):
        """(uint8 canvas [canvas, canvas], layout) of image ``index`` at ``epoch``."""
        rng = self._rng(index, epoch)
        n, side = len(self.pool), self.canvas
        src_h, src_w = self.pool.shape[1:]
        lo, hi = max(1, round(self.digit_size[0] * side)), round(self.digit_size[1] * side)
        cut_lo, cut_hi = self.fragment_cut
        # every uniform draw of this image at once (one call instead of dozens of small ones)
        u = iter(rng.random(4 + self.fragments[1] * 14).tolist())

        def pick(a, b):  # an integer uniform on [a, b]
            return min(a + int(next(u) * (b - a + 1)), b)

        out = np.zeros((side, side), dtype=np.float32)
        d = index % n
        size = pick(lo, hi)
        top, left = pick(0, side - size), pick(0, side - size)
        out[top:top + size, left:left + size] = self._enlarge(self.pool[d], size, size)
        layout = {"digit": d, "box": (top, left, size, size), "fragments": []}

        for _ in range(pick(*self.fragments)):
            other = pick(0, n - 2)
            other += other >= d  # any digit of the pool but this image's own
            ch, cw = pick(cut_lo, cut_hi), pick(cut_lo, cut_hi)
            # a cut with ink: the inkiest of 4 random positions
            ink = self._ink[ch, cw][other]
            r, c = max(((pick(0, src_h - ch), pick(0, src_w - cw)) for _ in range(4)), key=lambda rc: ink[rc])
            scale = (lo + next(u) * (hi - lo)) / src_h
            fh, fw = max(1, round(ch * scale)), max(1, round(cw * scale))
            ft, fl = pick(0, side - fh), pick(0, side - fw)
            piece = self._enlarge(self.pool[other, r:r + ch, c:c + cw], fh, fw)
            np.maximum(out[ft:ft + fh, fl:fl + fw], piece, out=out[ft:ft + fh, fl:fl + fw])
            layout["fragments"].append((other, (r, c, ch, cw), (ft, fl, fh, fw)))

        if self.noise > 0:
            out += rng.standard_normal(out.shape, dtype=np.float32) * np.float32(self.noise)
        return np.rint(np.clip(out, 0.0, 1.0) * 255).astype(np.uint8), layout

    def _enlarge(self, img, out_h, out_w):
        """Bilinear enlargement of a 2-D array to [out_h, out_w] (two small matrix products)."""
        return self._resize[img.shape[0], out_h] @ img @ self._resize[img.shape[1], out_w].T

    def canvas_uint8(self, index):
        """The uint8 canvas [canvas, canvas] of image ``index`` (at the current epoch when fresh)."""
        if self._canvases is not None:
            return self._canvases[index]
        return self.compose(index, self.epoch)[0]

    def __getitem__(self, index):
        img = torch.from_numpy(self.canvas_uint8(index)).unsqueeze(0)
        # (img / 255 - mean) / std per channel, in one op: -mean/std + img * (1 / (255 std))
        return torch.addcmul(self._shift, img, self._gain), self.targets[index]


def build_cluttered_digits(is_train, input_size=64, seed=0, fresh=None, train_repeats=CLUTTER_TRAIN_REPEATS,
                           val_per_digit=CLUTTER_VAL_PER_DIGIT, **composition):
    """The CLUTTERED_DIGITS train or validation set on the fixed digits split.

    Training (``is_train``): images composed from the 1,437 training digits only, ``train_repeats``
    compositions of each per epoch; ``fresh`` (default: True) redraws placements every epoch from
    (seed, epoch, index) (call ``set_epoch``); ``fresh=False`` gives one fixed composition per
    image (placements from CLUTTER_DATA_SEED), for the search split and the criterion batches.
    Validation: ``val_per_digit`` fixed compositions of each of the 360 held-out digits (5,400 by
    default), digits and clutter fragments from the held-out digits only, placements from
    CLUTTER_DATA_SEED (the same set whatever the training seed).
    ``composition`` (digit_size, fragments, fragment_cut, noise) overrides ClutteredDigits' defaults.
    """
    x_tr, y_tr, x_va, y_va = digits_split()
    if is_train:
        fresh = True if fresh is None else bool(fresh)
        return ClutteredDigits(x_tr, y_tr, canvas=input_size, length=len(x_tr) * int(train_repeats),
                               seed=seed if fresh else CLUTTER_DATA_SEED,
                               stream=_STREAM_FRESH if fresh else _STREAM_FIXED_TRAIN, fresh=fresh, **composition)
    return ClutteredDigits(x_va, y_va, canvas=input_size, length=len(x_va) * int(val_per_digit),
                           seed=CLUTTER_DATA_SEED, stream=_STREAM_VAL, fresh=False, **composition)


# --------------------------------------------------------------------------- folders

def _class_folders(root):
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def check_folder_layout(root, data_set="IMAGEFOLDER"):
    """Raise DataError unless ``root`` holds train/ and val/ with the same class folders."""
    layout = f"expected {root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg"
    if not root:
        raise DataError(f"--data-path is required for --data-set {data_set} ({layout.replace('None', 'DIR')})")
    if not os.path.isdir(root):
        raise DataError(f"data path {root} does not exist ({layout})")
    for split in ("train", "val"):
        path = os.path.join(root, split)
        if not os.path.isdir(path):
            raise DataError(f"data path {root} has no {split}/ folder ({layout})")
        if not _class_folders(path):
            raise DataError(f"{path} has no class folders ({layout})")
    train_cls, val_cls = _class_folders(os.path.join(root, "train")), _class_folders(os.path.join(root, "val"))
    if train_cls != val_cls:
        only_train = sorted(set(train_cls) - set(val_cls))[:3]
        only_val = sorted(set(val_cls) - set(train_cls))[:3]
        raise DataError(f"class folders differ between {root}/train and {root}/val "
                        f"({len(train_cls)} vs {len(val_cls)}; only in train: {only_train}, only in val: {only_val})")


class VisibleImageFolder(ImageFolder):
    """ImageFolder whose classes are the visible sub-folders, as check_folder_layout sees them: a
    .thumbs or .ipynb_checkpoints folder is not a class."""

    def find_classes(self, directory):
        classes = _class_folders(directory)
        return classes, {name: i for i, name in enumerate(classes)}


class SafeImageFolder(Dataset):
    """torchvision ImageFolder that survives unreadable images, warning once per file (and per
    loader worker).

    Training (``skip=False``) replaces an unreadable image by the next readable one, so batches
    keep their size. Evaluation (``skip=True``) drops it: ``collate`` leaves it out of the batch,
    so counts and accuracies cover exactly the readable images."""

    def __init__(self, root, transform=None, skip=False):
        try:
            self.inner = VisibleImageFolder(root, transform=transform)
        except (FileNotFoundError, RuntimeError) as e:
            raise DataError(f"{root}: {str(e).splitlines()[0]}") from e
        if len(self.inner) == 0:
            raise DataError(f"{root} holds no images")
        self.classes = self.inner.classes
        self.targets = self.inner.targets
        self.skip = skip
        self._warned = set()

    def __len__(self):
        return len(self.inner)

    def _warn(self, i, e):
        path = self.inner.samples[i][0]
        if path not in self._warned:
            self._warned.add(path)
            logger.warning(f"skipping unreadable image {path}: {e}")

    def __getitem__(self, index):
        for attempt in range(len(self.inner)):
            i = (index + attempt) % len(self.inner)
            path, target = self.inner.samples[i]
            try:
                image = self.inner.loader(path)  # decodes fully (convert to RGB): a broken file fails here
            except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for broken files
                self._warn(i, e)
                if self.skip:
                    return None
                continue
            return self._transform(image, path), target
        raise DataError(f"no readable image in {self.inner.root}")

    def _transform(self, image, path):
        """The transform, redrawn when a random augmentation draws invalid parameters (timm's
        RandAugment posterize occasionally asks for 0 bits): not the file's fault."""
        if self.inner.transform is None:
            return image
        for _ in range(3):
            try:
                return self.inner.transform(image)
            except ValueError as e:
                error = e
        raise DataError(f"the image transform fails on {path}: {clean_message(error)}")

    def collate(self, batch):
        kept = [b for b in batch if b is not None]
        if not kept:
            return torch.empty(0), torch.empty(0, dtype=torch.int64)
        return torch.utils.data.default_collate(kept)


def build_transform(is_train, cfg, mean, std):
    """DeiT's image transforms through timm (RandAugment, random erasing, resize/crop)."""
    if is_train:
        return create_transform(
            input_size=cfg.input_size, is_training=True, color_jitter=cfg.color_jitter,
            auto_augment=cfg.aa if cfg.aa not in (None, "", "none") else None,
            interpolation=cfg.train_interpolation, re_prob=cfg.reprob, re_mode=cfg.remode,
            re_count=cfg.recount, mean=mean, std=std)
    size = int(cfg.input_size / cfg.eval_crop_ratio)
    return transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(cfg.input_size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def data_stats(data_set):
    """(mean, std) used to normalise a data set."""
    if data_set.upper() in ("DIGITS", "CLUTTERED_DIGITS"):
        return DIGITS_MEAN, DIGITS_STD
    return IMAGENET_MEAN, IMAGENET_STD


def num_classes_of(data_set):
    """Classes of a built-in data set (for commands that build no data, e.g. --throughput)."""
    return {"DIGITS": 10, "CLUTTERED_DIGITS": 10, "CIFAR10": 10, "CIFAR100": 100}.get(data_set, 1000)


def build_dataset(is_train, cfg, train_transform=None):
    """Return (dataset, num_classes). ``train_transform=False`` gives the training images
    with evaluation transforms (for the search split and the criterion)."""
    name = cfg.data_set.upper()
    mean, std = data_stats(name)
    if name == "DIGITS":
        x_tr, y_tr, x_va, y_va = digits_split()
        if is_train:
            augment = train_transform is not False
            return DigitsDataset(x_tr, y_tr, cfg.input_size, train=augment,
                                 reprob=cfg.reprob if augment else 0.0), 10
        return DigitsDataset(x_va, y_va, cfg.input_size, train=False), 10
    if name == "CLUTTERED_DIGITS":
        return build_cluttered_digits(is_train, cfg.input_size, seed=cfg.seed,
                                      fresh=is_train and train_transform is not False), 10

    augment = is_train and train_transform is not False
    transform = build_transform(augment, cfg, mean, std)
    if name in ("CIFAR", "CIFAR10", "CIFAR100"):
        cls, ncls = (CIFAR10, 10) if name == "CIFAR10" else (CIFAR100, 100)
        root = cfg.data_path or "./data"
        try:
            ds = cls(root, train=is_train, transform=transform, download=bool(cfg.download))
        except RuntimeError as e:
            raise DataError(f"{cls.__name__} files not found under {root} ({str(e).splitlines()[0]}); "
                            f"pass --download to fetch them") from e
        except OSError as e:  # URLError included: no network, a blocked proxy
            raise DataError(f"could not download {cls.__name__} into {root} ({clean_message(e)}); without "
                            f"internet put the extracted cifar files under --data-path") from e
        return ds, ncls
    if name in ("IMNET", "IMAGEFOLDER"):
        check_folder_layout(cfg.data_path, name)
        root = os.path.join(cfg.data_path, "train" if is_train else "val")
        ds = SafeImageFolder(root, transform=transform, skip=not augment)
        return ds, len(ds.classes)
    raise DataError(f"unknown --data-set {cfg.data_set}; choose one of {', '.join(DATA_SETS)}")


# --------------------------------------------------------------------------- samplers

class RASampler(Sampler):
    """Repeated-augmentation sampler (DeiT): each image appears ``repeats`` times per epoch,
    spread over ranks, and each rank draws ``len(dataset) / world`` samples per epoch."""

    def __init__(self, dataset, num_replicas=None, rank=None, shuffle=True, repeats=3, seed=0):
        self.dataset = dataset
        self.num_replicas = num_replicas if num_replicas is not None else get_world_size()
        self.rank = rank if rank is not None else get_rank()
        self.shuffle = shuffle
        self.repeats = repeats
        self.seed = seed
        self.epoch = 0
        self.num_samples = int(math.ceil(len(dataset) * repeats / self.num_replicas))
        self.total_size = self.num_samples * self.num_replicas
        self.num_selected = int(math.floor(len(dataset) // 256 * 256 / self.num_replicas)) or \
            int(math.ceil(len(dataset) / self.num_replicas))

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        n = len(self.dataset)
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        indices = [i for i in order for _ in range(self.repeats)]
        indices += indices[: self.total_size - len(indices)]
        mine = indices[self.rank:self.total_size:self.num_replicas]
        return iter(mine[: self.num_selected])

    def __len__(self):
        return self.num_selected

    def set_epoch(self, epoch):
        self.epoch = epoch


class ShardSampler(Sampler):
    """Deterministic shard ``rank::world`` without padding, so a distributed evaluation
    counts every image exactly once and its reduced top-1 equals a single-process run."""

    def __init__(self, length, num_replicas=None, rank=None):
        self.length = length
        self.num_replicas = num_replicas if num_replicas is not None else get_world_size()
        self.rank = rank if rank is not None else get_rank()

    def __iter__(self):
        return iter(range(self.rank, self.length, self.num_replicas))

    def __len__(self):
        return len(range(self.rank, self.length, self.num_replicas))


def train_sampler(dataset, cfg, distributed):
    if distributed and cfg.repeated_aug:
        return RASampler(dataset, shuffle=True, repeats=cfg.ra_reps, seed=cfg.seed)
    if distributed:
        return torch.utils.data.DistributedSampler(dataset, shuffle=True, seed=cfg.seed)
    if cfg.repeated_aug:
        return RASampler(dataset, num_replicas=1, rank=0, shuffle=True, repeats=cfg.ra_reps, seed=cfg.seed)
    return _EpochRandomSampler(dataset, cfg.seed)


class _EpochRandomSampler(Sampler):
    """Shuffles with a generator seeded by (seed, epoch): a resumed epoch sees the same order."""

    def __init__(self, dataset, seed):
        self.n = len(dataset)
        self.seed = seed
        self.epoch = 0

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed * 1000003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self):
        return self.n

    def set_epoch(self, epoch):
        self.epoch = epoch


def eval_sampler(dataset, distributed, dist_eval):
    if distributed and dist_eval:
        return ShardSampler(len(dataset))
    return torch.utils.data.SequentialSampler(dataset)


def make_loader(dataset, sampler, batch_size, cfg, drop_last=False):
    """A DataLoader using the data set's own ``collate`` (also through a Subset) when it has one."""
    collate = getattr(dataset, "collate", None) or getattr(getattr(dataset, "dataset", None), "collate", None)
    return torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=batch_size, num_workers=cfg.num_workers,
        pin_memory=cfg.pin_mem, drop_last=drop_last, persistent_workers=False, collate_fn=collate)


# --------------------------------------------------------------------------- search split

def stratified_holdout(targets, size, seed=0):
    """Indices of a stratified hold-out: ``size`` images (int) or a fraction (float < 1)."""
    targets = np.asarray(targets)
    n = len(targets)
    count = int(round(size * n)) if isinstance(size, float) and size < 1 else int(size)
    if count <= 0 or count >= n:
        raise DataError(f"--search-holdout {size} must select between 1 and {n - 1} of the {n} training images")
    idx = np.arange(n)
    classes, counts = np.unique(targets, return_counts=True)
    stratify = targets if (counts.min() >= 2 and count >= len(classes) and n - count >= len(classes)) else None
    _, held = train_test_split(idx, test_size=count, random_state=seed, stratify=stratify)
    return np.sort(held).tolist()


def parse_holdout(text):
    """``--search-holdout``: an image count ("500") or a fraction of the training set ("0.2")."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"--search-holdout must be an image count (e.g. 500) or a fraction in (0, 1) "
                        f"(e.g. 0.2), got {text!r}") from None
    if "." in str(text) or "e" in str(text).lower():
        if not 0 < value < 1:
            raise DataError(f"--search-holdout {text} is a fraction, so it must be in (0, 1); "
                            f"for a number of images give an integer")
        return value
    if value < 1:
        raise DataError(f"--search-holdout must be at least 1 image, got {text}")
    return int(value)


# --------------------------------------------------------------------------- loaders

def build_loaders(cfg, distributed, train=True, val=True):
    """{"train_set", "train", "val_set", "val", "num_classes"} for the asked splits."""
    data = {}
    if train:
        ds_train, ncls = build_dataset(True, cfg)
        sampler = train_sampler(ds_train, cfg, distributed)
        data["train_set"] = ds_train
        data["train"] = make_loader(ds_train, sampler, cfg.batch_size, cfg, drop_last=True)
        if len(data["train"]) == 0:
            raise DataError(f"training set has {len(ds_train)} images, fewer than one batch of "
                            f"{cfg.batch_size} per process; lower --batch-size")
        data["num_classes"] = ncls
    if val:
        ds_val, ncls = build_dataset(False, cfg)
        data["val_set"] = ds_val
        data["val"] = make_loader(ds_val, eval_sampler(ds_val, distributed, cfg.dist_eval),
                                  int(1.5 * cfg.batch_size), cfg)
        data["num_classes"] = ncls
    return data


CRITERION_MIN_BATCH = 16


def criterion_loader(dataset, cfg, num_batches, world_size=1, rank=0):
    """``num_batches`` batches per process from a fixed shuffle of ``dataset`` (un-augmented
    training images). Whole batches are dealt to ranks in turn, so W processes with k batches
    each score exactly the batches that one process with k*W batches scores. Batches hold
    ``max(batch_size, 16)`` images: a dependency estimate needs more than a handful."""
    bs = max(cfg.batch_size, CRITERION_MIN_BATCH)
    if len(dataset) < bs:
        bs = len(dataset)
    g = torch.Generator()
    g.manual_seed(cfg.seed)
    n_batches = max(1, min(num_batches * world_size, len(dataset) // bs))
    chosen = torch.randperm(len(dataset), generator=g)[:n_batches * bs].tolist()
    batches = [chosen[i * bs:(i + 1) * bs] for i in range(n_batches)]
    mine = [i for b in batches[rank::world_size] for i in b]
    subset = torch.utils.data.Subset(dataset, mine)
    return make_loader(subset, torch.utils.data.SequentialSampler(subset), bs, cfg)


def search_split(train_plain, val_set, holdout=None, on_val=False, seed=0):
    """(dataset, description) that search candidates are scored on: a stratified hold-out of
    the (un-augmented) training set, ``holdout`` images or a fraction (default 20%, at most
    10,000), or the validation set with ``on_val`` (the paper's setting; biased)."""
    if on_val:
        return val_set, f"the validation set ({len(val_set)} images; --search-on-val)"
    size = min(10000, max(1, round(0.2 * len(train_plain)))) if holdout is None else holdout
    targets = getattr(train_plain, "targets", None)
    if targets is None:
        targets = [train_plain[i][1] for i in range(len(train_plain))]
    held = stratified_holdout(targets, size, seed=seed)
    return torch.utils.data.Subset(train_plain, held), f"a stratified hold-out of {len(held)} training images"


def split_loader(dataset, cfg, distributed):
    """Loader over a search split, sharded without padding over ranks."""
    sampler = ShardSampler(len(dataset)) if distributed else torch.utils.data.SequentialSampler(dataset)
    return make_loader(dataset, sampler, int(1.5 * cfg.batch_size), cfg)
