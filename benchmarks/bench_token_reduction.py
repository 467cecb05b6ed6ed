"""What one token-reducing block costs in eager ops and time, today's functions against the slow
reference in tests/test_token_reduction.py (the version they replaced).

    python benchmarks/bench_token_reduction.py [--batch-size 32] [--tokens 197] [--dim 384] [--keep 137]
                                               [--threads 1] [--repeats 21] [--device cpu]

Counts the aten ops (all, and those that are not views: about the kernels launched) that a
TokenReducingBlock's forward dispatches under ``torch.no_grad`` (composite ops such as matmul
show as what they run), then times ``reduce_tokens`` and the whole block with the
old and the new functions interleaved (warm-up first, median of ``--repeats``) under
``torch.inference_mode``. Defaults: a DeiT-S block at 224 px (197 tokens, 384 channels, 6 heads)
keeping 137 of its 196 patch tokens.
"""
import argparse
import collections
import importlib.util
import os
import statistics
import sys
import time

import torch
from timm.models.vision_transformer import Block
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import pruning  # noqa: E402


def reference():
    """The old reduce_tokens and attention_with_class_row, kept verbatim in the test file."""
    spec = importlib.util.spec_from_file_location("token_reference",
                                                  os.path.join(ROOT, "tests", "test_token_reduction.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return {"attention_with_class_row": mod.attention_with_class_row, "reduce_tokens": mod.reduce_tokens}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func] += 1
        return func(*args, **(kwargs or {}))

    def totals(self):
        return sum(self.ops.values()), sum(n for f, n in self.ops.items() if not f.is_view)


def using(functions):
    """Point pruning's token reduction at ``functions`` (a dict of name -> function)."""
    for name, fn in functions.items():
        setattr(pruning, name, fn)


def median_seconds(fns, repeats, sync):
    """Interleaved timing: every repeat runs each function once; returns the median per function."""
    times = [[] for _ in fns]
    for fn in fns:  # warm-up
        fn(), fn()
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--tokens", type=int, default=197, help="tokens entering the block, class token included")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--keep", type=int, default=137, help="patch tokens kept")
    p.add_argument("--fuse", default="mean", choices=pruning.FUSE_MODES)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    new = {"attention_with_class_row": pruning.attention_with_class_row, "reduce_tokens": pruning.reduce_tokens}
    old = reference()

    blk = Block(a.dim, a.heads, mlp_ratio=4.0, qkv_bias=True).to(device).eval()
    pruning.make_reducing(blk, a.keep, 1, a.fuse)
    x = torch.randn(a.batch_size, a.tokens, a.dim, device=device)
    score = torch.softmax(torch.randn(a.batch_size, a.tokens - 1, device=device), dim=1)
    print(f"block: {a.tokens} tokens x {a.dim} channels, {a.heads} heads, keep {a.keep}, fuse {a.fuse}, "
          f"batch {a.batch_size}, {device}, {a.threads} thread(s), torch {torch.__version__}")

    with torch.no_grad():
        for name, functions in (("old", old), ("new", new)):
            using(functions)
            counts = {}
            for what, fn in (("reduce_tokens", lambda: pruning.reduce_tokens(x, score, 1, a.keep, a.fuse)),
                             ("class row", lambda: pruning.attention_with_class_row(blk.attn, x, 1)),
                             ("block", lambda: blk(x))):
                with OpCounter() as c:
                    fn()
                counts[what] = "%d ops (%d not views)" % c.totals()
            print(f"aten ops, {name}: " + "; ".join(f"{k} {v}" for k, v in counts.items()))

    with torch.inference_mode():
        def timed(functions, fn):
            def run():
                using(functions)
                return fn()
            return run

        fns = [lambda fn=f["reduce_tokens"]: fn(x, score, 1, a.keep, a.fuse) for f in (old, new)]
        t = median_seconds(fns + [timed(old, lambda: blk(x)), timed(new, lambda: blk(x))], a.repeats, sync)
        using(new)
    print(f"reduce_tokens: old {t[0] * 1e3:.3f} ms, new {t[1] * 1e3:.3f} ms ({t[0] / t[1]:.2f}x)")
    print(f"whole block:   old {t[2] * 1e3:.3f} ms, new {t[3] * 1e3:.3f} ms ({t[2] / t[3]:.2f}x)")
    print("load average: %.2f %.2f %.2f" % os.getloadavg())


if __name__ == "__main__":
    main()
