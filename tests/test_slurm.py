"""scripts/slurm_train.sbatch under a real SLURM: a throw-away one-node cluster on this machine.

The module fixture starts munged, slurmctld and slurmd with their key, sockets, state, spool
and logs in a temporary folder and free ports, and stops them by pid afterwards. Through it:
a 2-task CPU training job is requeued after its first checkpoint and must resume and log each
epoch once; the search step then runs through the same script on 2 tasks and must write each
evaluation once and a whole policy file.

Needs the Debian packages slurmd, slurmctld, slurm-client and munge (.ci/run installs them)
and root. Outside CI a machine without them skips with the reason; in CI (CI set) it fails.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings

import pytest

from helpers import ROOT

SCRIPT = os.path.join(ROOT, "scripts", "slurm_train.sbatch")
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "squeue", "scancel", "sinfo")
# the sbatch job runs main.py with the interpreter that runs these tests
TRAIN = ["--model", "vit_pico_patch8_32", "--data-set", "DIGITS", "--data-path", "", "--batch-size", "32",
         "--num_workers", "0", "--log-every", "1000"]
CPU_TASKS = ["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=15"]


def _find(name):
    """A SLURM / munge binary on PATH or in the sbin folders a non-root PATH may lack."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"])
    return shutil.which(name, path=path)


def _cannot_run(reason):
    """No SLURM here: a skip on a developer's machine, a failure in CI (where .ci/run installs it)."""
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        why = os.environ.get("CI_SLURM_INSTALL")
        pytest.fail(f"the SLURM test cannot run in CI: {reason}" + (f" ({why})" if why else ""), pytrace=False)
    pytest.skip(f"{reason}; install them with: apt-get install slurmd slurmctld slurm-client munge")


def _require_slurm():
    missing = [b for b in DAEMONS + CLIENTS if _find(b) is None]
    if missing:
        _cannot_run(f"SLURM / munge binaries not found: {', '.join(missing)}")
    if os.geteuid() != 0:
        _cannot_run("slurmd has to run as root to launch job steps")


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _clean_env(**extra):
    """This process's environment without any launcher or SLURM variables (the tests may run
    inside a SLURM job or under torchrun themselves), plus ``extra``."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items()
           if k not in drop and not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
    env.update(extra)
    return env


def node_hardware():
    """This machine's CPUs as slurmd sees them ("CPUs=2 Boards=1 SocketsPerBoard=1 ..."), so that
    slurmd registers exactly the node slurm.conf describes; plain CPUs=N if slurmd -C fails."""
    res = subprocess.run([_find("slurmd"), "-C"], capture_output=True, text=True, timeout=30)
    fields = re.findall(r"\b((?:CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=\d+)", res.stdout)
    return " ".join(fields) if res.returncode == 0 and fields else f"CPUs={os.cpu_count() or 1}"


def write_slurm_conf(root, node, ctld_port, slurmd_port, hardware="CPUs=1", first_job_id=1):
    """A one-node, one-partition slurm.conf with every path under ``root``; returns its path."""
    for sub in ("state", "spool", "log"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    lines = [
        "ClusterName=pytest",
        f"SlurmctldHost={node}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={root}/munge/munge.socket",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool",
        f"SlurmctldPidFile={root}/slurmctld.pid",
        f"SlurmdPidFile={root}/slurmd.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log",
        f"SlurmdLogFile={root}/log/slurmd.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "MpiDefault=none",
        "MailProg=/bin/true",
        "ReturnToService=2",
        f"FirstJobId={first_job_id}",
        f"NodeName={node} NodeAddr=127.0.0.1 {hardware} State=UNKNOWN",
        f"PartitionName=main Nodes={node} Default=YES MaxTime=INFINITE State=UP",
    ]
    path = os.path.join(root, "slurm.conf")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _pids_with_env(key, value):
    """Pids of processes whose environment holds key=value (this cluster's SLURM_CONF marks every
    daemon, step daemon and task it started, and nothing else)."""
    needle = f"{key}={value}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


class OneNodeSlurm:
    """munged + slurmctld + slurmd on this machine, all state under one temporary folder."""

    def __init__(self):
        self.root = tempfile.mkdtemp(prefix="slurm-")
        os.chmod(self.root, 0o755)  # munged wants every folder above its socket traversable by all
        self.node = socket.gethostname().split(".")[0]  # slurmctld insists on its own short name
        self.procs = {}
        self.conf = write_slurm_conf(self.root, self.node, _free_port(), _free_port(), node_hardware(),
                                     # jobs pick MASTER_PORT = 29500 + id % 1000: differ between runs
                                     first_job_id=int.from_bytes(os.urandom(2), "little") % 900 + 100)
        self.env = _clean_env(SLURM_CONF=self.conf)

    # ------------------------------------------------------------------ start / stop

    def start(self):
        try:
            socket.gethostbyname(self.node)
        except OSError as e:
            raise RuntimeError(f"this machine's name {self.node!r} does not resolve ({e}); jobs take "
                               f"MASTER_ADDR from the node list, so add it to /etc/hosts") from None
        munge_dir = os.path.join(self.root, "munge")
        os.makedirs(munge_dir, mode=0o755)
        key = os.path.join(self.root, "munge.key")
        with open(os.open(key, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
            f.write(os.urandom(1024))
        socket_path = os.path.join(munge_dir, "munge.socket")
        self._spawn("munged", [_find("munged"), "--foreground", f"--key-file={key}", f"--socket={socket_path}",
                               f"--pid-file={self.root}/munged.pid", f"--seed-file={self.root}/munged.seed"])
        self._wait(lambda: os.path.exists(socket_path), 20, "munged did not create its socket")
        self._spawn("slurmctld", [_find("slurmctld"), "-D", "-f", self.conf])
        self._wait(lambda: "is UP" in self.run("scontrol", "ping", check=False).stdout, 60,
                   "slurmctld does not answer scontrol ping")
        self._spawn("slurmd", [_find("slurmd"), "-D", "-f", self.conf, "-N", self.node])
        self._wait(lambda: self.run("sinfo", "-h", "-n", self.node, "-o", "%t", check=False).stdout.strip() == "idle",
                   60, f"node {self.node} did not become idle")

    def _spawn(self, name, cmd):
        out = open(os.path.join(self.root, "log", f"{name}.out"), "w")
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()

    def _wait(self, ready, timeout, what):
        deadline = time.time() + timeout
        while time.time() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited while starting SLURM ({what})\n{self.logs()}")
            if ready():
                return
            time.sleep(0.3)
        raise RuntimeError(f"{what} within {timeout}s\n{self.logs()}")

    def stop(self):
        """Cancel this cluster's jobs, stop its daemons by pid, then end any process still carrying
        this cluster's SLURM_CONF (a job step orphaned by a failed test). Returns those pids."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--user", "root", check=False)
            deadline = time.time() + 60
            while time.time() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        leftovers = _pids_with_env("SLURM_CONF", self.conf)
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)
        return leftovers

    # ------------------------------------------------------------------ using it

    def run(self, *cmd, check=True, cwd=None, env=None, timeout=60):
        res = subprocess.run([_find(cmd[0])] + [str(c) for c in cmd[1:]], env=env or self.env, cwd=cwd,
                             capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, cmd))} failed ({res.returncode}): {res.stderr}\n{self.logs()}")
        return res

    def submit(self, sbatch_options, main_args, cwd=ROOT, **env):
        """sbatch scripts/slurm_train.sbatch; ``env`` goes to the job (sbatch exports it)."""
        res = self.run("sbatch", "--parsable", *sbatch_options, SCRIPT, *main_args, cwd=cwd,
                       env=dict(self.env, PYTHON=sys.executable, PYTHONWARNINGS="ignore", **env))
        return int(res.stdout.strip().split(";")[0])

    def job(self, job_id):
        """scontrol's fields of a job as a dict (JobState, Restarts, ExitCode, ...)."""
        text = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_job(self, job_id, states, timeout, output=None):
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info["JobState"] in states:
                return info
            if info["JobState"] in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                break
            time.sleep(1)
        raise AssertionError(f"job {job_id} is {self.job(job_id)['JobState']}, wanted {states}\n"
                             f"{_tail(output)}\n{self.logs()}")

    def logs(self, lines=25):
        parts = []
        for name in sorted(os.listdir(os.path.join(self.root, "log"))):
            parts.append(f"--- {name}\n{_tail(os.path.join(self.root, 'log', name), lines)}")
        return "\n".join(parts)


def _tail(path, lines=40):
    if not path or not os.path.exists(path):
        return f"({path}: no file)"
    return "\n".join(open(path, errors="replace").read().splitlines()[-lines:])


def _wait_for(predicate, timeout, what, output=None, cluster=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} within {timeout}s\n{_tail(output)}\n{cluster.logs() if cluster else ''}")


@pytest.fixture(scope="module")
def slurm():
    _require_slurm()
    cluster = OneNodeSlurm()
    try:
        problem = None
        try:
            cluster.start()
        except RuntimeError as e:
            problem = str(e)
        if problem:
            pytest.fail(f"could not start a one-node SLURM: {problem}", pytrace=False)
        yield cluster
    finally:
        leftovers = cluster.stop()
        if leftovers:
            warnings.warn(f"killed {len(leftovers)} process(es) the test cluster left behind: {leftovers}")


@pytest.fixture(scope="module")
def trained(slurm, tmp_path_factory):
    """Pretrain through the script with 2 tasks, requeue after the first checkpoint."""
    out = tmp_path_factory.mktemp("slurm_train")
    run_dir, output = out / "run", str(out / "slurm-%j.out")
    log, ckpt = run_dir / "log.jsonl", run_dir / "checkpoint.pth"
    job = slurm.submit(CPU_TASKS + [f"--output={output}"], TRAIN + ["--epochs", "6", "--output_dir", run_dir])
    output = output.replace("%j", str(job))

    # the first epoch's log line follows its checkpoint: from here on a requeue must resume
    _wait_for(lambda: log.exists() and log.read_text().strip(), 240, f"job {job} logged no epoch", output, slurm)
    assert ckpt.exists()
    slurm.run("scontrol", "requeue", job)
    # a requeued job is held back for a while (its BeginTime moves ~2 min ahead): release it now
    _wait_for(lambda: slurm.job(job)["JobState"] == "PENDING", 60, f"job {job} did not go back to PENDING",
              output, slurm)
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    info = slurm.wait_job(job, ("COMPLETED",), 300, output)
    return {"job": job, "info": info, "run_dir": run_dir, "output": output}


@pytest.mark.slow
def test_requeued_training_job_resumes_and_logs_each_epoch_once(trained):
    info, run_dir = trained["info"], trained["run_dir"]
    text = open(trained["output"]).read()
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0", info
    # --open-mode=append: one file holds both runs, each started by the script with 2 tasks
    assert re.findall(r" job \d+ restart (\d+): 2 task\(s\)", text) == ["0", "1"], text
    assert text.count("6 epochs, 2 process(es), device cpu") == 2, text
    resumed = re.findall(r"train: resumed at epoch (\d+)", text)
    assert len(resumed) == 1 and 1 <= int(resumed[0]) < 6, text  # the second run, mid-way
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert epochs == list(range(6)), epochs
    # rank-0 logging: every epoch line once over both runs, none from rank 1
    for e in range(6):
        assert len(re.findall(rf"train epoch {e}: loss", text)) == 1, (e, text)

    import torch
    ckpt = torch.load(run_dir / "checkpoint.pth", weights_only=True, map_location="cpu")
    assert ckpt["epoch"] == 5


@pytest.mark.slow
def test_search_through_the_script_writes_each_evaluation_once(slurm, trained, tmp_path):
    import flops
    import models
    dense_file = trained["run_dir"] / "checkpoint.pth"
    model, _ = models.load_model_file(str(dense_file))
    dense = flops.model_macs(model)["macs"] / 1e9
    target = round(0.7 * dense, 6)
    population, steps = 3, 2

    # submitted from elsewhere: CODE_DIR, OUTPUT_DIR and RESUME come from the environment
    output = str(tmp_path / "slurm-%j.out")
    job = slurm.submit(CPU_TASKS + [f"--output={output}"],
                       TRAIN + ["--eval", "--search", "--search_flops", target, "--search_epoch", steps,
                                "--search_population", population, "--search-pool", 200,
                                "--criterion-batches", 1],
                       cwd=tmp_path, CODE_DIR=ROOT, OUTPUT_DIR=str(tmp_path / "out"), RESUME=str(dense_file))
    output = output.replace("%j", str(job))
    info = slurm.wait_job(job, ("COMPLETED",), 300, output)
    text = open(output).read()
    assert info["ExitCode"] == "0:0", text
    assert re.search(r" job \d+ restart 0: 2 task\(s\)", text), text

    search_dir = tmp_path / "out" / "search"
    records = [json.loads(line) for line in (search_dir / "search_log.jsonl").read_text().splitlines()]
    total = population + steps
    assert [r["step"] for r in records] == list(range(total))  # every evaluation once, in order
    assert len({tuple(r["x"]) for r in records}) == total
    for k in range(1, total + 1):  # rank-0 progress lines: once each
        assert len(re.findall(rf"search \[{k}/{total}\]", text)) == 1, (k, text)
    best = json.loads((search_dir / "best_policy.json").read_text())
    assert best["evaluations"] == total and best["target_gmacs"] == pytest.approx(target)
    assert abs(best["gmacs"] - target) <= 0.02 * target + 1e-9
    assert best["search_acc1"] == max(r["acc1"] for r in records)
    assert not [p.name for p in search_dir.iterdir() if p.name.endswith(".tmp")]


def test_first_host_matches_scontrol(tmp_path):
    """utils' fallback MASTER_ADDR (when the script did not set one) is the host that
    `scontrol show hostnames` lists first, multi-node lists included."""
    if _find("scontrol") is None:
        _cannot_run("scontrol not found")
    import utils
    conf = write_slurm_conf(str(tmp_path), "localhost", 6817, 6818)  # only parsed, no daemons
    for nodelist in ("gpu[07-09,12],cpu1", "node001", "node[1-4]", "a-b[003-005]", "n[2,5-6]",
                     "rack1-n[01-02],rack2-n[01-02]", "gpu10,gpu9"):
        res = subprocess.run([_find("scontrol"), "show", "hostnames", nodelist], capture_output=True, text=True,
                             env=_clean_env(SLURM_CONF=conf), timeout=30)
        assert res.returncode == 0, res.stderr
        assert utils.first_slurm_host(nodelist) == res.stdout.split()[0], nodelist


def test_script_sets_rendezvous_for_two_nodes(tmp_path):
    """What the batch script hands srun on 2 nodes x 4 GPUs, with stand-ins for srun and scontrol
    (no SLURM needed): the first host of the node list, a port from the job id, the CPUs per task,
    the interpreter from PYTHON, and the user's flags after the defaults."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[07-08]" ] && '
                                      'printf "gpu07\\ngpu08\\n"\n')
    (bin_dir / "srun").write_text('#!/bin/sh\nenv | grep -E "^(MASTER_ADDR|MASTER_PORT|OMP_NUM_THREADS)=" '
                                  '| sort > "$RECORD"\nprintf "%s\\n" "$@" >> "$RECORD"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    record = tmp_path / "srun.txt"
    env = _clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", RECORD=str(record),
                     PYTHON="/opt/py/bin/python3", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu[07-08]",
                     SLURM_NTASKS="8", SLURM_CPUS_PER_TASK="10", SLURM_SUBMIT_DIR=ROOT)
    env.pop("OMP_NUM_THREADS", None)
    res = subprocess.run(["bash", SCRIPT, "--epochs", "3", "--output_dir", "/scratch/run"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = record.read_text().splitlines()
    assert lines[:3] == ["MASTER_ADDR=gpu07", "MASTER_PORT=29742", "OMP_NUM_THREADS=10"]
    argv = lines[3:]
    assert argv[:4] == ["--kill-on-bad-exit=1", "--cpus-per-task=10", "/opt/py/bin/python3", "main.py"]
    assert argv[-4:] == ["--epochs", "3", "--output_dir", "/scratch/run"]  # after the defaults: they win
    assert argv[argv.index("--resume") + 1] == "auto"
    assert "master gpu07:29742" in res.stdout
