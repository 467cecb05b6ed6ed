"""Shared test helpers: tiny image folders, running main.py in-process or as a subprocess."""
import contextlib
import io
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def threads_for_tests():
    """torch's thread count in the test processes (conftest) and in the ranks they start, which
    must match them for bitwise-equal sums: 1 on a pytest-xdist worker (the workers share the
    cores; spinning thread pools would fight over them), else up to 2."""
    return 1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1)


# flags that make a training run take seconds on 2 cores
FAST = ["--model", "vit_pico_patch8_32", "--batch-size", "32", "--num_workers", "0", "--log-every", "1000"]


def make_image_folder(root, classes=("a", "b", "c"), per_class=(8, 4), size=40, seed=0):
    """train/ and val/ class folders of small random PNGs, each class with its own colour."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), per_class):
        for ci, c in enumerate(classes):
            folder = os.path.join(root, split, c)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                base = np.zeros((size, size, 3), dtype=np.float64)
                base[..., ci % 3] = 180
                img = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(os.path.join(folder, f"{i}.png"))
    return root


def run_cli(argv):
    """Run main.cli in-process; returns (exit code, stdout, stderr)."""
    import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main.cli([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def run_subprocess(cmd, timeout=300, env_extra=None):
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(k, None)
    if env_extra:
        env.update(env_extra)
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def python():
    return sys.executable


def run_and_kill(args, log, lines, timeout=240, poll=0.02):
    """Start ``python main.py ARGS``, SIGKILL it as soon as ``log`` has ``lines`` lines; returns
    the number of lines the log holds after the kill. Fails if the run ends by itself first."""
    import signal
    import time
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "main.py"] + [str(a) for a in args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(log) and len(open(log).read().splitlines()) >= lines:
            break
        time.sleep(poll)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert alive, f"main.py {' '.join(map(str, args))} ended before it could be killed"
    return len(open(log).read().splitlines())


PY = sys.executable


def run_ranks(script, out_dir, world=2, timeout=180):
    """Run ``python script RANK WORLD PORT OUT_DIR`` as ``world`` plain subprocesses (a gloo group
    the script sets up itself); fail with their output if any rank fails; returns each rank's
    ``OUT_DIR/rank{r}.pt``. Plain subprocesses, unlike multiprocessing's spawn, do not re-run
    pytest's entry point in every child: the cost is one interpreter start per rank."""
    import torch
    from utils import free_port
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, os.path.abspath(script), str(r), str(world), str(port), str(out_dir)],
                              env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)
    return [torch.load(os.path.join(str(out_dir), f"rank{r}.pt"), weights_only=True) for r in range(world)]


def block_outputs(model, x):
    """The slow, obvious reference of a timm ViT's forward: every block's output, run by hand."""
    h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    outs = []
    for blk in model.blocks:
        h = blk(h)
        outs.append(h)
    return outs
