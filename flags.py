"""The command line, from flags to a run's settled configuration: the one argument parser (DeiT's
flags plus ours), the per-data-set defaults that --help shows, the original implementation's
settings (--recipe paper), where each flag applies (FLAG_SCOPES: a flag given where it does
nothing is refused or warned about), the choices the library checks its arguments against, and
``settle``, which applies the defaults and the model file's own settings and checks the flags.

Only the standard library is imported at the top, so that ``python main.py --help`` and a bad
flag answer at once; ``settle`` and the checks import the library when they run."""
import argparse
import os
import re
import sys
import tempfile

# the choices of seven flags, defined here once: the library's modules import them from this
# module, which imports nothing heavy (so --help stays fast)
CRITERIA = ("hsic", "magnitude", "random", "taylor")
KERNELS = ("scaled", "original")
BANDWIDTHS = ("multi", "median")
MAGNITUDES = ("activation", "contribution", "taylor")
SEARCH_OBJECTIVES = ("acc", "loss", "kl")
CONVENTIONS = ("exact", "original")
FUSE_MODES = ("mean", "weighted")

# The defaults that depend on the data set, in one table: a flag left at None takes its data set's
# value (settle), and --help shows them from here (``--data-set X --help``: X's alone). IMAGE is
# DeiT's ImageNet recipe and holds for IMNET, IMAGEFOLDER and CIFAR; DIGITS is a short from-scratch
# recipe for 2 CPU cores; CLUTTERED_DIGITS (one digit among clutter on a 64 px canvas, mostly
# background tokens) takes about 10 min on 2 cores.
DATA_SET_DEFAULTS = {
    "IMAGE": dict(model="deit_base_patch16_224", input_size=224, epochs=300, batch_size=64, lr=5e-4,
                  warmup_epochs=5, min_lr=1e-5, weight_decay=0.05, drop_path=0.1,
                  aa="rand-m9-mstd0.5-inc1", smoothing=0.1, reprob=0.25, mixup=0.8, cutmix=1.0,
                  repeated_aug=True, model_ema=True, num_workers=10, finetune_epochs=30, finetune_lr=5e-5,
                  search_epoch=100, search_population=100, criterion_batches=4, search_pool=10000, throughput_batch=64),
    "DIGITS": dict(model="vit_nano_patch4_32", input_size=32, epochs=30, batch_size=64, lr=1e-2,
                   warmup_epochs=2, min_lr=1e-5, weight_decay=0.05, drop_path=0.0,
                   aa="none", smoothing=0.1, reprob=0.0, mixup=0.0, cutmix=0.0,
                   repeated_aug=False, model_ema=False, num_workers=0, finetune_epochs=15, finetune_lr=2e-3,
                   search_epoch=30, search_population=20, criterion_batches=4, search_pool=1000, throughput_batch=256),
}
DATA_SET_DEFAULTS["CLUTTERED_DIGITS"] = dict(DATA_SET_DEFAULTS["DIGITS"], model="vit_nano_d6_patch8_64", input_size=64,
                                             warmup_epochs=1, finetune_epochs=6)
DATA_SETS = ("DIGITS", "CLUTTERED_DIGITS", "IMNET", "IMAGEFOLDER", "CIFAR", "CIFAR10", "CIFAR100")


HELP_EPILOG = ("Per-data-set defaults: IMNET's hold for IMAGEFOLDER and CIFAR too; python main.py --data-set X --help "
               "shows X's alone.")


def data_set_defaults(data_set):
    """The row of DATA_SET_DEFAULTS that ``data_set`` (a --data-set value) takes."""
    return DATA_SET_DEFAULTS.get(data_set, DATA_SET_DEFAULTS["IMAGE"])


def defaults_help(key, data_set=None):
    """What --help says of a per-data-set default: '(IMNET: 300, DIGITS: 30)' from the table, or
    '(default 0.05)' when every data set has the same, or '(default on X: v)' for ``data_set``."""
    def text(value):
        return "on" if value is True else "off" if value is False else str(value)
    if data_set:
        return f"(default on {data_set}: {text(data_set_defaults(data_set)[key])})"
    values = {"IMNET" if name == "IMAGE" else name: row[key] for name, row in DATA_SET_DEFAULTS.items()}
    if len({repr(v) for v in values.values()}) == 1:
        return f"(default {text(next(iter(values.values())))})"
    return "(" + ", ".join(f"{name}: {text(v)}" for name, v in values.items()) + ")"


def given_data_set(argv):
    """The --data-set named on a command line, upper-cased, or None (read before parsing, so that
    ``--data-set X --help`` can show X's defaults)."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        for flag in ("--data-set", "--data_set"):
            if arg == flag and i + 1 < len(argv):
                value = argv[i + 1]
            elif arg.startswith(flag + "="):
                value = arg[len(flag) + 1:]
            else:
                continue
            value = value.upper()
            return "CIFAR100" if value == "CIFAR" else value if value in DATA_SETS else None
    return None


def ranged(kind, ok, words):
    """An argparse type: a ``kind`` value that passes ``ok``; the parser rejects any other as
    '--flag must be <words>' before anything heavy is imported."""
    def parse(text):
        value = kind(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {words}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names it in "invalid int value"
    return parse


POSITIVE, COUNT = ranged(int, lambda v: v > 0, "positive"), ranged(int, lambda v: v >= 0, ">= 0")
FRACTION, RATE = ranged(float, lambda v: 0 < v < 1, "in (0, 1)"), ranged(float, lambda v: 0 <= v < 1, "in [0, 1)")
WEIGHT, GMACS = ranged(float, lambda v: 0 <= v <= 1, "in [0, 1]"), ranged(float, lambda v: v > 0, "positive GMACs")
SHARE, RATE_OF = ranged(float, lambda v: 0 < v <= 1, "in (0, 1]"), ranged(float, lambda v: v > 0, "positive")
NONNEG = ranged(float, lambda v: v >= 0, ">= 0")
SPEEDUP = ranged(float, lambda v: v > 1, "above 1 (a speed-up over the dense model)")


def reductions(text):
    try:
        values = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        values = []
    if not values or not all(0 < r < 1 for r in values):
        raise argparse.ArgumentTypeError(f"must be comma-separated fractions in (0, 1), got {text}")
    return values


def speedups(text):
    try:
        values = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        values = []
    if not values or not all(v > 1 for v in values):
        raise argparse.ArgumentTypeError(f"must be comma-separated speed-ups above 1, got {text}")
    return values


class FlagError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    """Answers a bad flag in one line, like every other bad input, instead of 60 lines of usage."""

    def error(self, message):
        flags = re.match(r"argument (\S+): ", message)
        if flags:  # 'argument --search_epoch/--search-epoch: x' -> '--search-epoch x'
            names = flags.group(1).split("/")
            message = next((n for n in names if "_" not in n), names[0]) + " " + message[flags.end():]
        raise FlagError(f"{message} (python main.py --help lists the flags)")



def get_args_parser(data_set=None):
    """The one parser (DeiT's flags plus ours), to be used through ``parents=``. ``data_set`` only
    changes what --help says of the per-data-set defaults (DATA_SET_DEFAULTS)."""
    def dd(key):
        return defaults_help(key, data_set)

    p = argparse.ArgumentParser("Multi-dimensional ViT compression (DeiT-style training, HSIC criterion, "
                                "GP-EI policy search, physical pruning)", add_help=False)
    p.add_argument("--batch-size", "--batch_size", type=POSITIVE,
                   help="per-process batch size " + dd("batch_size"))
    p.add_argument("--epochs", type=POSITIVE, help="training epochs " + dd("epochs"))

    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="NAME", help="timm ViT/DeiT name or a preset (vit_nano_patch4_32, "
                   "deit_nano_distilled_patch4_32, vit_pico_patch8_32) " + dd("model"))
    g.add_argument("--input-size", "--input_size", type=POSITIVE, help="image size " + dd("input_size"))
    g.add_argument("--drop", type=RATE, default=0.0, help="dropout rate")
    g.add_argument("--drop-path", "--drop_path", type=RATE, help="stochastic depth rate " + dd("drop_path"))
    g.add_argument("--pretrained", action="store_true", help="start from timm's pretrained weights (needs internet)")
    g.add_argument("--model-ema", action="store_true", default=None, help="keep an EMA of weights " + dd("model_ema"))
    g.add_argument("--no-model-ema", dest="model_ema", action="store_false")
    g.add_argument("--model-ema-decay", type=FRACTION, default=0.99996)
    g.add_argument("--model-ema-force-cpu", action="store_true")

    g = p.add_argument_group("optimizer and schedule")
    g.add_argument("--opt", default="adamw", help="timm optimizer name")
    g.add_argument("--opt-eps", type=RATE_OF, default=1e-8)
    g.add_argument("--opt-betas", type=float, nargs="+")
    g.add_argument("--clip-grad", type=RATE_OF, help="gradient norm clip (off by default)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=NONNEG, help=dd("weight_decay"))
    g.add_argument("--sched", default="cosine", help="timm scheduler name")
    g.add_argument("--lr", type=RATE_OF, help="base learning rate for a global batch of 512, scaled linearly "
                   + dd("lr"))
    g.add_argument("--unscale-lr", action="store_true", help="do not scale --lr by the global batch size")
    g.add_argument("--warmup-lr", type=NONNEG, default=1e-6)
    g.add_argument("--min-lr", type=NONNEG, help=dd("min_lr"))
    g.add_argument("--warmup-epochs", type=COUNT, help=dd("warmup_epochs"))
    g.add_argument("--cooldown-epochs", type=COUNT, default=0, help="epochs at --min-lr after the schedule's "
                   "--epochs (or --finetune-epochs), added to them, as timm's train.py runs them (default 0: DeiT "
                   "parses its 10 but its loop stops at --epochs)")
    g.add_argument("--decay-epochs", type=float, default=30)
    g.add_argument("--decay-rate", "--dr", type=float, default=0.1)

    g = p.add_argument_group("augmentation (DeiT recipe)")
    g.add_argument("--color-jitter", type=float, default=0.3)
    g.add_argument("--aa", help="RandAugment policy, 'none' to turn off " + dd("aa"))
    g.add_argument("--smoothing", type=RATE, help="label smoothing " + dd("smoothing"))
    g.add_argument("--train-interpolation", default="bicubic")
    g.add_argument("--repeated-aug", action="store_true", default=None,
                   help="repeated augmentation sampler " + dd("repeated_aug"))
    g.add_argument("--no-repeated-aug", dest="repeated_aug", action="store_false")
    g.add_argument("--ra-reps", type=POSITIVE, default=3)
    g.add_argument("--reprob", type=WEIGHT, help="random erasing probability " + dd("reprob"))
    g.add_argument("--remode", default="pixel")
    g.add_argument("--recount", type=int, default=1)
    g.add_argument("--mixup", type=NONNEG, help="mixup alpha " + dd("mixup"))
    g.add_argument("--cutmix", type=NONNEG, help="cutmix alpha " + dd("cutmix"))
    g.add_argument("--cutmix-minmax", type=float, nargs="+")
    g.add_argument("--mixup-prob", type=WEIGHT, default=1.0)
    g.add_argument("--mixup-switch-prob", type=WEIGHT, default=0.5)
    g.add_argument("--mixup-mode", default="batch")
    g.add_argument("--eval-crop-ratio", type=SHARE, default=0.875)

    g = p.add_argument_group("distillation")
    g.add_argument("--teacher-model", default="regnety_160", help="teacher for pretraining distillation")
    g.add_argument("--teacher-path", default="", help="teacher weights file (or a model file of this tool)")
    g.add_argument("--distillation-type", choices=["none", "soft", "hard"],
                   help="pretrain: none; prune+finetune: soft, from the dense model")
    g.add_argument("--distillation-alpha", type=WEIGHT, default=0.5)
    g.add_argument("--distillation-tau", type=RATE_OF, default=1.0)

    g = p.add_argument_group("data and run")
    g.add_argument("--data-path", "--data_path", help="data root (train/ and val/)")
    g.add_argument("--data-set", "--data_set", type=str.upper,
                   choices=DATA_SETS,
                   help="DIGITS (embedded; the default without --data-path), CLUTTERED_DIGITS (embedded, harder: "
                        "a digit among clutter), IMNET (the default with --data-path, as in DeiT), IMAGEFOLDER, "
                        "CIFAR10, CIFAR/CIFAR100")
    g.add_argument("--download", action="store_true", help="download CIFAR if it is not under --data-path")
    g.add_argument("--output_dir", "--output-dir", default="",
                   help="where checkpoints and logs go (empty: nothing saved)")
    g.add_argument("--device", help="cuda when available, else cpu")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--finetune", default="", help="initialise from a file or URL (mismatched head dropped)")
    g.add_argument("--resume", default="", help="checkpoint to resume, evaluate or compress (this tool's, DeiT's, "
                   "timm's, .safetensors, a state dict); 'auto' = output_dir/checkpoint.pth; without it a training "
                   "in a used folder starts afresh, keeping the old run as checkpoint.previous.pth etc.")
    # DeiT flags parsed so that DeiT command lines run, and ignored: hidden from --help, warned about
    # in one line when given (FLAG_SCOPES "deit")
    g.add_argument("--start_epoch", "--start-epoch", type=int, default=0, help=argparse.SUPPRESS)
    g.add_argument("--eval", action="store_true", help="evaluate only")
    g.add_argument("--throughput", action="store_true", help="measure images/s, GMACs and params, then exit")
    g.add_argument("--compile", nargs="?", const="default", default=False, metavar="MODE",
                   choices=("default", "reduce-overhead", "max-autotune"),
                   help="torch.compile the model for --throughput, in torch.compile's MODE: default (when MODE is "
                        "left out), reduce-overhead (CUDA graphs) or max-autotune")
    g.add_argument("--cuda-graph", action="store_true",
                   help="--throughput of the eager forward captured once in a CUDA graph and replayed (CUDA only)")
    g.add_argument("--throughput-baseline", default="", metavar="FILE",
                   help="with --throughput: also measure the model in FILE (e.g. the dense one) in the same run and "
                        "report the speed-up over it at --throughput-batch and at batch 1, beside the GMACs ratio")
    g.add_argument("--export", default="", metavar="FILE.onnx|FILE.pt2",
                   help="export the --resume model, in the format its suffix names: .onnx (dynamic batch, input "
                        "'input', output 'logits'; verified in ONNX Runtime against PyTorch) or .pt2 (a torch.export "
                        "program with a dynamic batch, loaded with torch.export.load; verified the same way), and "
                        "write FILE.json (preprocessing, classes, verification) for deployers")
    g.add_argument("--throughput-batch", type=POSITIVE,
                   help="batch for --throughput and the pipeline's speed table " + dd("throughput_batch"))
    g.add_argument("--dist-eval", "--dist_eval", action="store_true",
                   help="shard evaluation over ranks (exact: every image counted once)")
    g.add_argument("--num_workers", "--num-workers", type=COUNT, help="data loader workers " + dd("num_workers"))
    g.add_argument("--pin-mem", action="store_true", default=None, help="pin loader memory (default: on with CUDA)")
    g.add_argument("--no-pin-mem", dest="pin_mem", action="store_false")
    g.add_argument("--world_size", type=int, default=1, help=argparse.SUPPRESS)  # DeiT's, ignored (see --start_epoch)
    g.add_argument("--dist_url", default="env://")
    g.add_argument("--local-rank", "--local_rank", type=int, default=-1,
                   help="passed by legacy launchers; the environment is used otherwise")
    g.add_argument("--amp", action="store_true", default=True, help="mixed precision on CUDA (default)")
    g.add_argument("--no-amp", dest="amp", action="store_false")
    g.add_argument("--amp-dtype", choices=("bfloat16", "float16"), default="bfloat16",
                   help="the half dtype of mixed precision on CUDA: autocast in training and evaluation (float16 adds "
                        "loss scaling), the weights of --throughput and the pipeline's speed table (default bfloat16)")
    g.add_argument("--log-every", type=POSITIVE, default=20, help="log every N steps")
    g.add_argument("--max-steps", type=POSITIVE, help="cap steps per epoch (smoke tests)")

    g = p.add_argument_group("dependency criterion (ranking heads and neurons)")
    g.add_argument("--criterion", choices=CRITERIA, help="how components are ranked (default taylor: first-order "
                   "|activation x gradient|, which ranked best in our study, see README; hsic: the paper's "
                   "dependency criterion, the default with --hsic-kernel original; magnitude: weight norms; random)")
    g.add_argument("--criterion-batches", type=POSITIVE, help="training batches (per process) the criterion averages "
                   "over " + dd("criterion_batches") + "; a criterion batch holds max(--batch-size, 16) images")
    g.add_argument("--head-lambda", type=float, default=0.1, help="weight of head redundancy")
    g.add_argument("--neuron-alpha", type=float, default=0.1, help="weight of neuron relevance vs |activation|")
    g.add_argument("--head-alpha", type=WEIGHT, default=1.0, help="weight of head dependency vs the head's "
                   "contribution size (1 = dependency only, the paper's)")
    g.add_argument("--neuron-magnitude", default="activation", choices=MAGNITUDES, help="size term mixed with "
                   "dependency: mean |activation| (the paper's, neurons only), contribution (|activation| x fc2 "
                   "column norm; heads: output through proj) or taylor (|activation x gradient|)")
    g.add_argument("--no-head-normalize", dest="head_normalize", action="store_false", help="unnormalised head "
                   "HSIC, as in the paper's formula (default: normalised; implied by --hsic-kernel original)")
    g.add_argument("--hsic-kernel", default="scaled", choices=KERNELS, help="scaled (default: standardised "
                   "features, distances scaled by feature length); original: the original code's kernel and scores "
                   "exactly (raw features, bandwidths 1-16, one augmented batch in train mode, unnormalised heads)")
    g.add_argument("--hsic-bandwidth", choices=BANDWIDTHS,
                   help="Gaussian kernel bandwidth rule (default: the criterion's, see README)")

    g = p.add_argument_group("search (GP expected improvement over per-block keep ratios)")
    g.add_argument("--search", action="store_true", help="search a pruning policy under a FLOPs budget")
    g.add_argument("--search_flops", "--search-flops", type=GMACS,
                   help="target GMACs (multiply-accumulates, the paper's FLOPs: DeiT-S dense = 4.6)")
    g.add_argument("--search-reduction", type=FRACTION,
                   help="target as a fraction of GMACs removed, e.g. 0.4 (instead of --search_flops)")
    g.add_argument("--search-speedup", type=SPEEDUP, help="target as a speed-up over the dense model, e.g. 2.0, "
                   "predicted by a latency table measured on the device (--latency-table); the best model's speed-up "
                   "is measured at the end")
    g.add_argument("--search-latency-ms", type=RATE_OF, help="target in ms per batch of --latency-batch images on the "
                   "latency table's device (instead of a speed-up)")
    g.add_argument("--latency-table", metavar="FILE", help="the latency table of a latency budget (python latency.py "
                   "--out FILE on the target machine, or measured here and written to FILE when it does not exist); "
                   "default output_dir/latency/latency-DEVICE-DTYPE-bBATCH-eager.json, measured on this run's device. "
                   "prune+finetune reports predicted and measured speed-ups with it")
    g.add_argument("--latency-batch", type=POSITIVE, help="batch the latency table is measured at (default "
                   "--batch-size)")
    g.add_argument("--search_epoch", "--search-epoch", type=COUNT,
                   help="EI iterations after the initial population " + dd("search_epoch"))
    g.add_argument("--search_population", "--search-population", type=POSITIVE,
                   help="initial random feasible policies " + dd("search_population"))
    g.add_argument("--search-max-ratio", type=FRACTION, default=0.5, help="upper bound of every removal ratio")
    g.add_argument("--search-tol", type=FRACTION, default=0.02, help="relative FLOPs tolerance of a feasible policy")
    g.add_argument("--search-mode", default="ei", choices=["ei", "random"], help="ei, or the random-search baseline")
    g.add_argument("--search-objective", default="acc", choices=SEARCH_OBJECTIVES, help="what a candidate scores "
                   "on the search split: top-1 (acc), -cross entropy (loss) or -KL(dense || candidate) (kl)")
    g.add_argument("--search-pool", type=POSITIVE,
                   help="fresh feasible candidates scored by EI per step " + dd("search_pool"))
    g.add_argument("--search-holdout", help="search split held out of the training set: a number of images (500) "
                   "or a fraction in (0, 1) (0.2); default 20%% of the training set, at most 10000 images")
    g.add_argument("--search-on-val", action="store_true",
                   help="score candidates on the validation set (the paper's setting; biased)")
    g.add_argument("--flops-convention", default="exact", choices=CONVENTIONS, help="what --search_flops / "
                   "--search-reduction count: exact (every MAC; DeiT-S 4.60) or original (the original code's "
                   "block-only count with int() rounding; DeiT-S 4.54, so 1.84 = its 60%% fewer)")
    g.add_argument("--round-to", type=POSITIVE, help="keep neuron counts at multiples of N (default on CUDA 64, "
                   "the widths GPU matrix units like, 8 for the small presets; elsewhere 8, fast on CPUs, and 1 with "
                   "--flops-convention original; 1 = exact ratios); refused when N "
                   "is not below the narrowest MLP's width, which it would keep whole")
    g.add_argument("--fuse", default="mean", choices=FUSE_MODES, help="how dropped tokens are fused")

    g = p.add_argument_group("prune + finetune")
    g.add_argument("--prune_finetune", "--prune-finetune", action="store_true",
                   help="prune the --resume model by a policy and finetune it with distillation")
    g.add_argument("--neuron_pruning", "--neuron-pruning", action="store_true",
                   help="prune MLP neurons (with none of the three flags: all dimensions)")
    g.add_argument("--head_pruning", "--head-pruning", action="store_true", help="prune attention heads")
    g.add_argument("--token_pruning", "--token-pruning", action="store_true",
                   help="reduce tokens (ranked by class-token attention; without a class token, e.g. SigLIP, by "
                        "the attention each token receives, averaged over queries and heads)")
    g.add_argument("--neuron_sparsity", "--neuron-sparsity", type=RATE,
                   help="uniform fraction of neurons removed per block (instead of a searched policy)")
    g.add_argument("--head_sparsity", "--head-sparsity", type=RATE, help="uniform fraction of heads removed per block")
    g.add_argument("--token_sparsity", "--token-sparsity", type=RATE,
                   help="token-removal rate r (keep (1-r)^k at the k-th reduction)")
    g.add_argument("--policy", default="", help="policy JSON or a published policy name (hou2022-deit-s, "
                   "hou2022-deit-b); default: output_dir/search/best_policy.json")
    g.add_argument("--recipe", default="ours", choices=["ours", "paper"], help="ours: --finetune-epochs/"
                   "--finetune-lr with soft distillation from the dense model; paper: the original's settings (300 "
                   "epochs, lr 5e-4, DeiT augmentation, no distillation) for every flag left at its default")
    g.add_argument("--finetune-epochs", type=COUNT,
                   help="finetuning epochs " + dd("finetune_epochs") + "; 0 = prune only, no finetuning")
    g.add_argument("--finetune-lr", type=RATE_OF, help="finetuning base lr " + dd("finetune_lr"))

    g = p.add_argument_group("pipeline")
    g.add_argument("--pipeline", action="store_true",
                   help="pretrain, search and prune+finetune in one run, then print a dense-vs-compressed table")
    g.add_argument("--pipeline-reductions", default="0.4,0.6", type=reductions,
                   help="comma-separated FLOPs reductions to search and finetune, e.g. 0.4,0.6")
    g.add_argument("--pipeline-speedups", type=speedups, default=[],
                   help="comma-separated speed-ups to search and finetune as well, e.g. 2.0, on one latency table "
                        "measured on this run's device (see --latency-table)")
    return p


def paper_settings():
    """The original implementation's prune + finetune settings (a new dict each call), keyed by
    main.py's argument names. Its prune_finetune step simply continued with its training defaults
    (DeiT's recipe): 300 epochs, AdamW, base lr 5e-4 scaled by global batch / 512 (8 GPUs x 128 =
    1e-3), cosine schedule stepped per epoch with 5 warm-up epochs from 1e-6 down to 1e-5, weight
    decay 0.05, RandAugment, random erasing, mixup / cutmix, label smoothing, repeated
    augmentation, drop-path 0.1, model EMA (kept, never evaluated), mixed precision, NO
    distillation (its distillation-for-finetuning code is commented out), training mode on.
    Its cooldown_epochs of 10 only lengthened the scheduler's nominal length (its loop ran 300
    epochs), so they are not here. It evaluated on ImageNet val after every epoch and printed the best so far."""
    return {
        "finetune_epochs": 300, "finetune_lr": 5e-4, "unscale_lr": False, "opt": "adamw", "opt_eps": 1e-8,
        "opt_betas": None, "weight_decay": 0.05, "clip_grad": None, "sched": "cosine", "warmup_epochs": 5,
        "warmup_lr": 1e-6, "min_lr": 1e-5, "smoothing": 0.1, "mixup": 0.8,
        "cutmix": 1.0, "cutmix_minmax": None, "mixup_prob": 1.0, "mixup_switch_prob": 0.5,
        "mixup_mode": "batch", "aa": "rand-m9-mstd0.5-inc1", "color_jitter": 0.4,
        "train_interpolation": "bicubic", "reprob": 0.25, "remode": "pixel", "recount": 1,
        "repeated_aug": True, "drop": 0.0, "drop_path": 0.1, "model_ema": True, "model_ema_decay": 0.99996,
        "distillation_type": "none", "amp": True,
    }


# ----------------------------------------------------------------------------- which flags apply where

# Where each flag acts: every flag of get_args_parser() maps to the scopes (below) that must all hold
# for it to do something; check_flags_apply refuses or warns about a flag given outside one of its
# scopes. A flag counts as given when it differs from what it parses to when left out.
FLAG_SCOPES = {
    # the run itself
    "model": ("run",), "input_size": ("run",), "data_set": ("run",), "output_dir": ("run",), "device": ("run",),
    "seed": ("run",), "batch_size": ("run",), "num_workers": ("run",), "pin_mem": ("run",), "dist_eval": ("run",),
    "dist_url": ("run",), "local_rank": ("run",), "log_every": ("run",),
    "world_size": ("deit",), "start_epoch": ("deit",), "cooldown_epochs": ("recipe",),
    "data_path": ("file_data",), "download": ("cifar",), "eval_crop_ratio": ("image_eval",),
    "amp": ("cuda",), "amp_dtype": ("cuda",), "resume": ("one_step",),
    # the modes
    "export": ("own_mode",), "pipeline": ("own_mode",), "search": ("own_mode",), "prune_finetune": ("own_mode",),
    "throughput": ("own_mode",), "eval": ("eval_mode",),
    # building the model and the training recipe (pretraining and finetuning)
    "pretrained": ("builds",), "drop": ("builds",), "drop_path": ("builds_or_finetunes",), "finetune": ("builds",),
    "epochs": ("pretrain_recipe",), "lr": ("pretrain_recipe",),
    "opt": ("recipe",), "opt_eps": ("recipe",), "opt_betas": ("recipe",), "clip_grad": ("recipe",),
    "momentum": ("recipe",), "weight_decay": ("recipe",), "sched": ("recipe",), "unscale_lr": ("recipe",),
    "warmup_lr": ("recipe",), "min_lr": ("recipe",), "warmup_epochs": ("recipe",), "max_steps": ("recipe",),
    "decay_epochs": ("step_sched",), "decay_rate": ("decay_sched",),
    "model_ema": ("recipe",), "model_ema_decay": ("ema",), "model_ema_force_cpu": ("ema",),
    "smoothing": ("recipe",), "mixup": ("recipe",), "cutmix": ("recipe",), "cutmix_minmax": ("recipe",),
    "mixup_prob": ("mixing",), "mixup_switch_prob": ("mixing",), "mixup_mode": ("mixing",),
    "color_jitter": ("image_aug",), "aa": ("image_aug",), "train_interpolation": ("image_aug",),
    "reprob": ("erasing_data",), "remode": ("erasing",), "recount": ("erasing",),
    "repeated_aug": ("recipe",), "ra_reps": ("repeated",),
    "distillation_type": ("recipe",), "distillation_alpha": ("distils",), "distillation_tau": ("soft",),
    "teacher_model": ("teacher",), "teacher_path": ("pretrains",),
    # the criterion
    "criterion": ("ranks",), "hsic_kernel": ("ranks",), "criterion_batches": ("ranks", "batch_criterion"),
    **{key: ("ranks", "hsic", "scaled_kernel") for key in ("head_lambda", "neuron_alpha", "head_alpha",
                                                           "neuron_magnitude", "head_normalize", "hsic_bandwidth")},
    # search, prune+finetune, pipeline, speed
    **{key: ("search_run",) for key in ("search_flops", "search_reduction", "search_speedup", "search_latency_ms")},
    **{key: ("search",) for key in ("search_epoch", "search_population", "search_max_ratio", "search_tol",
                                    "search_mode", "search_objective", "search_holdout", "search_on_val")},
    "search_pool": ("search", "ei"), "latency_table": ("latency",), "latency_batch": ("latency",),
    "flops_convention": ("slices",), "round_to": ("slices",), "fuse": ("slices",),
    "neuron_pruning": ("compresses",), "head_pruning": ("compresses",), "token_pruning": ("compresses",),
    **{key: ("prune_run",) for key in ("neuron_sparsity", "head_sparsity", "token_sparsity", "policy")},
    "recipe": ("finetune",), "finetune_epochs": ("finetune",), "finetune_lr": ("finetune",),
    "pipeline_reductions": ("pipeline",), "pipeline_speedups": ("pipeline",),
    "throughput_batch": ("speed",), "compile": ("throughput",), "cuda_graph": ("throughput",),
    "throughput_baseline": ("throughput",),
}

EMBEDDED = ("DIGITS", "CLUTTERED_DIGITS")
MEASURES = ("eval", "search", "throughput", "export")  # modes whose command line may be a training one (DeiT's --eval)


# the modes, in the order main() looks for their flags; without any of them a run trains
MODE_FLAGS = ("export", "pipeline", "search", "prune_finetune", "throughput", "eval")


def run_mode(cfg):
    """The mode main() runs: the first of MODE_FLAGS given, else "train"."""
    return next((name for name in MODE_FLAGS if getattr(cfg, name)), "train")


def flag_scopes():
    """{scope: (refuse or warn, holds(args, cfg, mode), where the flag applies)} of FLAG_SCOPES. The
    method's choices of what to make (a mode, a budget, a policy, a criterion's own knobs, a
    --throughput runtime) are refused outside their scope; settings a command line carries from one
    step to the next are warned about. The training recipe is accepted by the modes that only
    measure, whose command line may be the training one plus --eval (DeiT's, the seed's search)."""
    def training(args, cfg, mode, on):
        return mode in MEASURES or on

    def distils(cfg, mode, kinds, finetune_kinds):
        return (mode in ("train", "pipeline") and cfg.distillation_type in kinds) or \
            (mode in ("prune_finetune", "pipeline") and cfg.distillation_type in finetune_kinds)

    slicing = ("search", "prune_finetune", "pipeline")
    return {
        "run": ("warn", lambda a, c, m: True, "every mode"),
        "recipe": ("warn", lambda a, c, m: True, "training (and rides along on the command lines that measure)"),
        "deit": ("warn", lambda a, c, m: False, "nothing in this tool, which parses it so that DeiT's command lines "
                 "run (the launcher sets the world size, a resumed run starts at its checkpoint's epoch)"),
        "file_data": ("warn", lambda a, c, m: c.data_set not in EMBEDDED, "data sets read from files; {data_set} "
                      "is embedded"),
        "cifar": ("warn", lambda a, c, m: c.data_set in ("CIFAR10", "CIFAR100"), "--data-set CIFAR10 or CIFAR100"),
        "image_eval": ("warn", lambda a, c, m: c.data_set not in EMBEDDED or m == "export",
                       "the evaluation transforms of image data sets (and --export's metadata); {data_set} has its "
                       "own"),
        "cuda": ("warn", lambda a, c, m: c.device.startswith("cuda"), "mixed precision on CUDA, and this run is on "
                 "{device}"),
        "one_step": ("warn", lambda a, c, m: m != "pipeline" or a.resume == "auto", "one step at a time: --pipeline "
                     "pretrains its own dense model into output_dir/dense and continues it when rerun"),
        "own_mode": ("refuse", lambda a, c, m: False, "its own run, not to this --{mode} run: give one of --export, "
                     "--pipeline, --search, --prune_finetune, --throughput, --eval per command"),
        "eval_mode": ("warn", lambda a, c, m: m in ("eval", "search"), "evaluation (with --search: the seed's "
                      "search command), not to this --{mode} run"),
        "builds": ("warn", lambda a, c, m: m in MEASURES or m == "pipeline" or not c.resume,
                   "a model built from --model; the --resume model keeps its own"),
        "builds_or_finetunes": ("warn", lambda a, c, m: m in MEASURES or m in ("pipeline", "prune_finetune")
                                or not c.resume, "a model built from --model and to prune+finetune's compressed "
                                "model; the --resume model of this --{mode} run keeps its own"),
        "pretrain_recipe": ("warn", lambda a, c, m: m != "prune_finetune", "pretraining; prune+finetune trains for "
                            "--finetune-epochs at --finetune-lr"),
        "step_sched": ("warn", lambda a, c, m: training(a, c, m, c.sched in ("step", "wsd", "rsqrt")),
                       "--sched step, wsd or rsqrt, not {sched}"),
        "decay_sched": ("warn", lambda a, c, m: training(a, c, m, c.sched in ("step", "multistep", "plateau", "poly")),
                        "--sched step, multistep, plateau or poly, not {sched}"),
        "ema": ("warn", lambda a, c, m: training(a, c, m, c.model_ema), "training with an EMA of the weights "
                "(--model-ema)"),
        "mixing": ("warn", lambda a, c, m: training(a, c, m, c.mixup > 0 or c.cutmix > 0 or c.cutmix_minmax),
                   "mixup or cutmix (--mixup or --cutmix above 0)"),
        "image_aug": ("warn", lambda a, c, m: training(a, c, m, c.data_set not in EMBEDDED), "the augmentation of "
                      "image data sets; {data_set} draws its own"),
        "erasing_data": ("warn", lambda a, c, m: training(a, c, m, c.data_set != "CLUTTERED_DIGITS"),
                         "data sets other than CLUTTERED_DIGITS, which draws its own clutter"),
        "erasing": ("warn", lambda a, c, m: training(a, c, m, c.data_set not in EMBEDDED and c.reprob > 0),
                    "random erasing on image data sets (--reprob above 0)"),
        "repeated": ("warn", lambda a, c, m: training(a, c, m, c.repeated_aug), "repeated augmentation "
                     "(--repeated-aug)"),
        "distils": ("warn", lambda a, c, m: training(a, c, m, distils(c, m, ("soft", "hard"), (None, "soft", "hard"))),
                    "training with distillation (pretraining: --distillation-type soft or hard; prune+finetune: "
                    "unless none)"),
        "soft": ("warn", lambda a, c, m: training(a, c, m, distils(c, m, ("soft",), (None, "soft"))),
                 "soft distillation"),
        "teacher": ("warn", lambda a, c, m: training(a, c, m, distils(c, m, ("soft", "hard"), ())),
                    "pretraining with --distillation-type soft or hard; prune+finetune distils from the dense model"),
        "pretrains": ("warn", lambda a, c, m: training(a, c, m, m in ("train", "pipeline")),
                      "pretraining; prune+finetune distils from the dense model"),
        "ranks": ("warn", lambda a, c, m: m in slicing, "ranking heads and neurons (--search, --prune_finetune, "
                  "--pipeline)"),
        "batch_criterion": ("refuse", lambda a, c, m: c.criterion in ("hsic", "taylor"), "the criteria that read "
                            "batches (hsic, taylor), not --criterion {criterion}"),
        "hsic": ("refuse", lambda a, c, m: c.criterion == "hsic", "--criterion hsic, not {criterion}{default}"),
        "scaled_kernel": ("refuse", lambda a, c, m: c.hsic_kernel != "original", "the scaled HSIC kernel: "
                          "--hsic-kernel original is the original's criterion in full, with its own settings"),
        "slices": ("warn", lambda a, c, m: m in slicing, "compressing (--search, --prune_finetune, --pipeline)"),
        "compresses": ("refuse", lambda a, c, m: m in slicing, "compressing (--search, --prune_finetune, --pipeline)"),
        "search_run": ("refuse", lambda a, c, m: m == "search", "--search (--pipeline searches the budgets of "
                       "--pipeline-reductions and --pipeline-speedups)"),
        "search": ("warn", lambda a, c, m: m in ("search", "pipeline"), "searching (--search, --pipeline)"),
        "ei": ("warn", lambda a, c, m: c.search_mode == "ei", "--search-mode ei, not random"),
        "latency": ("refuse", lambda a, c, m: c.search_speedup is not None or c.search_latency_ms is not None or
                    bool(c.pipeline_speedups) or c.prune_finetune, "a latency budget and --prune_finetune's speed "
                    "report"),
        "prune_run": ("refuse", lambda a, c, m: m == "prune_finetune", "--prune_finetune (--pipeline prunes by the "
                      "policies it searched)"),
        "finetune": ("warn", lambda a, c, m: m in ("prune_finetune", "pipeline"), "prune+finetune (--prune_finetune, "
                     "--pipeline)"),
        "pipeline": ("refuse", lambda a, c, m: m == "pipeline", "--pipeline"),
        "speed": ("warn", lambda a, c, m: m in ("throughput", "pipeline"), "--throughput and --pipeline's speed "
                  "table"),
        "throughput": ("refuse", lambda a, c, m: m == "throughput", "--throughput measurements"),
    }


def given_flags(args, parser):
    """[(dest, the flag as --help first names it)] of the flags whose value differs from what it
    parses to when left out ('' and None are the same: --data-path '' is no data path); of a pair
    such as --model-ema / --no-model-ema, the one given."""
    untouched, seen, found = vars(parser.parse_args([])), set(), []
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if action.dest in seen or action.dest not in untouched or value == untouched[action.dest] or \
                (value in ("", None) and untouched[action.dest] in ("", None)):
            continue
        seen.add(action.dest)
        pair = [a for a in parser._actions if a.dest == action.dest and a.nargs == 0 and a.const == value]
        found.append((action.dest, (pair or [action])[0].option_strings[0]))
    return found


def flag_problems(args, cfg):
    """(refusals, warnings): one line for each flag given outside a scope of FLAG_SCOPES, the first
    failing scope deciding whether it is refused or warned about."""
    mode, scopes = run_mode(cfg), flag_scopes()
    words = dict(mode=mode, data_set=cfg.data_set, device=cfg.device, sched=cfg.sched, criterion=cfg.criterion,
                 default=" (the default)" if args.criterion is None else "")
    hint = {"hsic": "add --criterion hsic or drop", "batch_criterion": "add --criterion hsic or taylor or drop",
            "pipeline": "add --pipeline or drop", "throughput": "add --throughput or drop"}
    refusals, warnings = [], []
    for dest, flag in given_flags(args, get_args_parser()):
        for scope in FLAG_SCOPES.get(dest, ()):
            action, holds, where = scopes[scope]
            if (scope == "own_mode" and dest == mode) or holds(args, cfg, mode):
                continue
            where = where.format(**words)
            if action == "refuse":
                refusals.append(f"{flag} applies to {where}; {hint.get(scope, 'drop')} {flag}")
            else:
                warnings.append(f"{flag} is not used: it applies to {where}")
            break
    return refusals, warnings


# ----------------------------------------------------------------------------- the settled configuration

def settle(args):
    """The run's configuration, settled once: recipe defaults, the --resume (or --finetune) file's
    own model and input size, every check of the flags. Returns (cfg, contents of that file, or None
    when it was not read);
    nothing assigns to the configuration after this."""
    import datasets
    import models
    import torch
    import utils
    cfg = argparse.Namespace(**vars(args))
    if cfg.data_set is None:
        cfg.data_set = "IMNET" if cfg.data_path else "DIGITS"
    cfg.data_set = "CIFAR100" if cfg.data_set == "CIFAR" else cfg.data_set
    recipe = data_set_defaults(cfg.data_set)
    if cfg.output_dir and os.path.exists(cfg.output_dir) and not os.path.isdir(cfg.output_dir):
        raise utils.UserError(f"--output_dir {cfg.output_dir} is a file, not a folder")
    cfg.resume, ckpt, info = resume_path(cfg), None, {}
    if cfg.resume:
        ckpt = models.read_model_file(cfg.resume)
        info = models.inspect_checkpoint(ckpt, cfg.resume)
        for key in ("model", "input_size"):
            if info[key] is not None and getattr(args, key) is not None and getattr(args, key) != info[key] \
                    and info["arch"] is not None:
                raise utils.UserError(f"{cfg.resume} holds a model with {key} {info[key]}, not {getattr(args, key)}; "
                                f"leave out --{key.replace('_', '-')} to use the file's")
            if info[key] is not None and getattr(args, key) is None:
                setattr(cfg, key, info[key])
    if (cfg.finetune and not cfg.resume and os.path.exists(cfg.finetune)
            and (args.model is None or args.input_size is None)):
        ckpt = models.read_model_file(cfg.finetune)  # a file, or a Hugging Face folder
        info = models.inspect_checkpoint(ckpt, cfg.finetune)
        cfg.model = cfg.model or info["model"]  # this tool's file (or one naming its model): no --model needed
        cfg.input_size = cfg.input_size or (info["input_size"] if cfg.model == info["model"] else None)
    if cfg.recipe == "paper":  # the original's settings, for every flag the user left at its default
        # what each flag parses to when it is not given: get_default would answer --no-model-ema's True
        # for model_ema, which parses to None when neither --model-ema nor --no-model-ema is given
        untouched = vars(get_args_parser().parse_args([]))
        for key, value in paper_settings().items():
            if getattr(args, key) == untouched[key]:
                setattr(cfg, key, value)
    if cfg.criterion is None:  # the paper's setting (--hsic-kernel original) ranks with its HSIC criterion
        cfg.criterion = "hsic" if cfg.hsic_kernel == "original" else "taylor"
    elif cfg.hsic_kernel == "original" and cfg.criterion != "hsic":
        raise utils.UserError(f"--hsic-kernel original is the HSIC criterion's kernel; it does not apply to "
                              f"--criterion {cfg.criterion}")
    if cfg.criterion_batches is None and cfg.hsic_kernel == "original":
        cfg.criterion_batches = 1  # the original ranks on one batch
    if cfg.input_size is None and cfg.model is not None and cfg.model != recipe["model"]:
        cfg.input_size = models.native_input_size(cfg.model)
    for key in recipe:
        if getattr(cfg, key, None) is None:
            setattr(cfg, key, recipe[key])
    if args.num_workers is None:  # DeiT's 10 loader workers, but never more than this machine's CPUs
        cfg.num_workers = min(cfg.num_workers, os.cpu_count() or 1)
    cfg.device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sizes = (info.get("arch") or {}).get("model_kwargs") if info.get("model") == cfg.model else None
    cfg.round_to = cfg.round_to or round_to_default(cfg, sizes)
    cfg.pin_mem = cfg.device.startswith("cuda") if cfg.pin_mem is None else cfg.pin_mem
    cfg.search_holdout = datasets.parse_holdout(cfg.search_holdout)
    check_config(cfg)
    check_flags_apply(args, cfg)
    return cfg, ckpt


def round_to_default(cfg, sizes=None):
    """--round-to left out: 64 on CUDA (GPU matrix units like such widths), unless the model's MLPs
    are narrower than 8 x 64 (a small preset, or ``sizes``, the model file's own keywords: a
    converted Hugging Face model's); otherwise 8 (fast on CPUs), 1 with --flops-convention original
    (the original's exact widths)."""
    import models
    sizes = models.PRESETS.get(cfg.model) or sizes or {}
    small = "embed_dim" in sizes and sizes["embed_dim"] * sizes.get("mlp_ratio", 4.0) < 8 * 64
    if cfg.device.startswith("cuda") and not small:
        return 64
    return 1 if cfg.flops_convention == "original" else 8


def round_to_note(args, cfg):
    """The warning for a model rebuilt in the original's convention but at GPU widths, or None."""
    slices = cfg.search or cfg.prune_finetune or cfg.pipeline
    if slices and args.round_to is None and cfg.flops_convention == "original" and cfg.round_to > 1:
        return (f"--flops-convention original on {cfg.device}: MLP widths are kept at multiples of {cfg.round_to} "
                f"(GPU-friendly shapes), not the original's exact widths; --round-to 1 gives those")
    return None


def resume_path(cfg):
    """--resume, with 'auto' = output_dir/checkpoint.pth: optional when training, required otherwise."""
    import utils
    if cfg.resume != "auto":
        return cfg.resume
    path = os.path.join(cfg.output_dir, "checkpoint.pth") if cfg.output_dir else ""
    if path and os.path.exists(path):
        return path
    if cfg.eval or cfg.search or cfg.prune_finetune or cfg.throughput:
        raise utils.UserError(f"--resume auto found no checkpoint ({path or 'no --output_dir given'}); "
                        f"train first or pass --resume FILE")
    return ""


RUN_MARKERS = ("run.json", "checkpoint.pth", "args.json")  # what this tool leaves in a run's folder


def check_output_dir_nesting(output_dir):
    """Refuse a user's --output_dir inside another run's folder (a parent holding one of
    RUN_MARKERS): that run's resumable steps, checkpoints and summaries would mix with this one's.
    The folders the tool lays out itself (a pipeline's dense/, reduceNN/, a run's search/ and
    prune_finetune/) are derived contexts, which never come through here."""
    import utils
    here = os.path.abspath(output_dir)
    parent = os.path.dirname(here)
    while parent and parent != here:
        found = [m for m in RUN_MARKERS if os.path.isfile(os.path.join(parent, m))]
        if found:
            raise utils.UserError(f"--output_dir {output_dir} is inside another run's folder {parent} (it holds "
                                  f"{found[0]}); pass a folder outside it")
        here, parent = parent, os.path.dirname(parent)


def check_config(cfg):
    import torch
    import utils
    if cfg.device.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise utils.UserError(f"--device {cfg.device}: use cpu, cuda or cuda:N")
    if cfg.output_dir:  # the user's own folder only: derived step contexts do not pass here
        check_output_dir_nesting(cfg.output_dir)
    if cfg.output_dir:  # every rank checks: a folder it cannot write fails here, not in the first checkpoint
        try:
            os.makedirs(cfg.output_dir, exist_ok=True)
            tempfile.TemporaryFile(dir=cfg.output_dir).close()
        except OSError as e:
            raise utils.UserError(f"--output_dir {cfg.output_dir} cannot be written ({e.strerror or e})")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise utils.UserError(f"--device {cfg.device} asked for but CUDA is not available")
    trains = not (cfg.eval or cfg.search or cfg.throughput) or cfg.prune_finetune or cfg.pipeline
    if trains and (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise utils.UserError(f"mixup/cutmix need an even --batch-size, got {cfg.batch_size} "
                              "(or pass --mixup 0 --cutmix 0)")
    if cfg.pipeline and not cfg.output_dir:
        raise utils.UserError("--pipeline needs --output_dir")
    budgets = [flag for flag, value in (("--search_flops", cfg.search_flops),
                                        ("--search-reduction", cfg.search_reduction),
                                        ("--search-speedup", cfg.search_speedup),
                                        ("--search-latency-ms", cfg.search_latency_ms)) if value is not None]
    if len(budgets) > 1:
        raise utils.UserError(f"give one budget, not {' and '.join(budgets)}")
    latency_budget = cfg.search_speedup is not None or cfg.search_latency_ms is not None or cfg.pipeline_speedups
    if (cfg.latency_table or cfg.latency_batch) and not (latency_budget or cfg.prune_finetune):
        raise utils.UserError("--latency-table and --latency-batch apply to a latency budget (--search-speedup, "
                              "--search-latency-ms, --pipeline-speedups) and to --prune_finetune's speed report")

def check_flags_apply(args, cfg):
    """Refuses the first flag given where it does nothing and contradicts the run (UserError, one
    line), and warns about the others on stderr, one line each, from rank 0 alone."""
    import utils
    refusals, warnings = flag_problems(args, cfg)
    if refusals:
        raise utils.UserError(refusals[0])
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
        for line in warnings:
            print(f"warning: {line}", file=sys.stderr)


def check_speed_flags(cfg, device):
    """The flags of --throughput alone, refused in one line before any work: --cuda-graph and
    --throughput-baseline need --throughput, --cuda-graph a CUDA device and no --compile."""
    import engine
    import utils
    for flag, given in (("--cuda-graph", cfg.cuda_graph), ("--throughput-baseline", cfg.throughput_baseline)):
        if given and not cfg.throughput:
            raise utils.UserError(f"{flag} applies to --throughput measurements; add --throughput or drop {flag}")
    if cfg.cuda_graph:
        engine.runtime_name(cfg.compile, cfg.cuda_graph)  # refuses --compile with it
        engine.check_cuda_graph(device)
