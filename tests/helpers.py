"""
Helpers shared by the tests that run scripts: running a script (one process inside the test process,
as __main__; two gloo ranks or two nodes as torchrun subprocesses), writing tiny starting checkpoints,
and reading back what the scripts wrote (metrics.jsonl, parameters).

Every script runs from the repository root (subprocesses with OMP_NUM_THREADS=1) and writes only where its
arguments say (the tests pass folders under tmp_path).
"""

import contextlib
import dataclasses
import io
import json
import math
import os
import re
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import checkpoint as C  # noqa: E402


# a grpo.py run of two tiny steps, no evaluation, no checkpoint
TWO_STEPS = ["--prompts-per-step", 2, "--num-generations", 4, "--eval-examples", 0, "--max-steps", 2,
             "--save-every", 0]
RUN_TIMEOUT_S = 300  # a hung collective fails the test instead of hanging the suite
# variables of an enclosing torchrun would turn a one-process run into a rank of someone else's group
DISTRIBUTED_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                         "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def expected_lr(step, peak, warmup_steps, total_steps, schedule):
    """The learning-rate schedule the stage scripts document, written out: linear warm-up over
    warmup_steps, then constant, linear decay to 0 at total_steps, or cosine decay to 10% of the peak
    there."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    done = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "constant":
        return peak
    if schedule == "linear":
        return peak * (1 - done)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * done)))


def script_env():
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_VARIABLES}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def command(script, args, nproc=1):
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return launcher + [script] + [str(a) for a in args]


@dataclasses.dataclass
class Run:
    cmd: list
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self):
        return self.stdout + self.stderr

    def describe(self):
        return f"`{' '.join(self.cmd)}` exited {self.returncode}; last output:\n{self.output[-4000:]}"


def run_script(script, *args, nproc=1, expect_ok=True):
    """Run `script` (a file in the repository root) with `args`; with expect_ok, fail unless it exits 0. One
    process runs inside this one (no fresh interpreter importing torch for seconds each time), as
    `python script args` would from the root: __main__, stdout and stderr captured, SystemExit turned into an
    exit status; the RNG, the SIGTERM handler and the working directory are restored after. Two ranks run
    under torch.distributed.run."""
    if nproc > 1:
        cmd = command(script, args, nproc)
        proc = subprocess.run(cmd, cwd=ROOT, env=script_env(), capture_output=True, text=True,
                              timeout=RUN_TIMEOUT_S)
        run = Run(cmd, proc.returncode, proc.stdout, proc.stderr)
    else:
        run = run_in_this_process(script, [str(a) for a in args])
    if expect_ok:
        assert run.returncode == 0, run.describe()
    return run


def run_in_this_process(script, args):
    saved = sys.argv, os.getcwd(), torch.get_rng_state(), signal.getsignal(signal.SIGTERM)
    stdout, stderr, returncode = io.StringIO(), io.StringIO(), 0
    sys.argv = [script, *args]
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    except SystemExit as exit:  # as the interpreter treats it: a message is printed and means status 1
        if isinstance(exit.code, str):
            stderr.write(exit.code + "\n")
        returncode = exit.code if isinstance(exit.code, int) else 0 if exit.code is None else 1
    finally:
        sys.argv = saved[0]
        os.chdir(saved[1])
        torch.set_rng_state(saved[2])
        signal.signal(signal.SIGTERM, saved[3])
    return Run([sys.executable, script, *args], returncode, stdout.getvalue(), stderr.getvalue())


def logged_steps(out_dir):
    """The steps of the complete lines of a (live) run's metrics.jsonl."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line)["step"] for line in f if line.endswith("\n")]


def run_with_sigterm(script, *args, out_dir, after_step, nproc=2):
    """Launch `script` under torchrun and send SIGTERM to the launcher (which forwards it to every worker, as
    SLURM's signal would) once step `after_step` is logged; wait for the launcher to exit. Returns the Run."""
    cmd = command(script, args, nproc)
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:  # no pipe to fill up
        proc = subprocess.Popen(cmd, cwd=ROOT, env=script_env(), stdout=stdout, stderr=stderr, text=True)
        try:
            deadline = time.time() + RUN_TIMEOUT_S
            while max(logged_steps(out_dir), default=0) < after_step:
                assert proc.poll() is None, f"the run ended before step {after_step}"
                assert time.time() < deadline, "no step logged in time"
                time.sleep(0.002)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=RUN_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        stdout.seek(0)
        stderr.seek(0)
        return Run(cmd, proc.returncode, stdout.read(), stderr.read())


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_nodes(script, *args):
    """`script` as a 2-node job on this machine: two torchrun launchers of one process each, meeting by c10d
    rendezvous on 127.0.0.1 (what the README's multi-node command does on two hosts). Returns both Runs."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "test"]
    cmd = launcher + [script] + [str(a) for a in args]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    try:
        outputs = [p.communicate(timeout=RUN_TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    runs = [Run(cmd, p.returncode, *out) for p, out in zip(procs, outputs)]
    for run in runs:
        assert run.returncode == 0, run.describe()
    return runs


def assert_stopped_cleanly_by_sigterm(run, out, max_steps):
    """What a preempted run must leave: every rank stopped after the same step (rank 0's message; its final
    barrier would fail if another rank had died), a checkpoint of that step, metrics up to it, no final model,
    no worker traceback (the launcher's own SignalException is torchrun's way of exiting) and no worker that
    torchrun had to SIGKILL after its grace period. Returns the step."""
    match = re.search(r"SIGTERM: stopped after step (\d+) and saved its checkpoint", run.stdout)
    assert match, run.describe()
    stopped = int(match.group(1))
    assert 1 <= stopped < max_steps
    assert checkpoints(out)[-1] == f"{C.CHECKPOINT_PREFIX}{stopped:06d}"
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == list(range(1, stopped + 1))
    assert not (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    assert run.output.count("Traceback") == run.output.count("SignalException: Process"), run.describe()
    assert "forcefully exiting" not in run.output, run.describe()
    return stopped


def assert_clean_error(run, *fragments):
    """A user error: non-zero exit, a message holding every fragment, and no Python traceback."""
    assert run.returncode != 0, run.describe()
    for fragment in fragments:
        assert fragment in run.output, f"{fragment!r} not in the error message; {run.describe()}"
    assert "Traceback" not in run.output, f"a traceback instead of a message; {run.describe()}"


# -----------------------------------------------------------------------------
# Starting checkpoints


def tiny_checkpoint(path, seed=0):
    """The random `tiny` preset saved in LLaDA's layout, with its tokenizer; returns path as a string."""
    tokenizer = C.build_tiny_tokenizer()
    C.save_model(C.build_model("tiny", tokenizer, seed=seed), tokenizer, str(path))
    return str(path)


def digit_checkpoint(path, seed=0):
    """A `tiny` model edited to write the digits 1-4 almost everywhere, in a prompt-dependent random mix.
    A random model's completions score 0 on tiny_sudoku, so every GRPO advantage would be 0; this one fills
    some cells right by chance, so groups have a reward spread and the policy gradient is not zero.
    (Embedding column 0 gets a large constant, so the final norm's output is dominated by that column;
    only the LM head rows of '1'..'4' read it.)"""
    tokenizer = C.build_tiny_tokenizer()
    model = C.build_model("tiny", tokenizer, seed=seed)
    digits = tokenizer.convert_tokens_to_ids(list("1234"))
    with torch.no_grad():
        model.wte.weight[:, 0] += 10.0
        model.ff_out.weight[:, 0] = 0.0
        model.ff_out.weight[digits, 0] = 1.0
    C.save_model(model, tokenizer, str(path))
    return str(path)


# -----------------------------------------------------------------------------
# Reading what a run wrote


def read_metrics(out_dir):
    return C.read_jsonl(os.path.join(out_dir, C.METRICS_NAME))


def parameters(path):
    """{name: tensor} of the model a folder holds (a full checkpoint, or an adapter on its base)."""
    return {name: p.detach() for name, p in C.load_model(str(path)).named_parameters()}


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k].detach() - b[k].detach()).abs().max()) for k in a)


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, (f"{len(different)} of {len(a)} tensors differ, e.g. {different[0]} "
                           f"(max |diff| {max_difference(a, b):.3e})")


def checkpoints(out_dir):
    """The checkpoint-XXXXXX folder names of out_dir, sorted."""
    if not os.path.isdir(out_dir):
        return []
    return sorted(n for n in os.listdir(out_dir) if n.startswith(C.CHECKPOINT_PREFIX))


# the files of a full model folder in LLaDA's layout, as the stage scripts write it
LLADA_LAYOUT = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


# -----------------------------------------------------------------------------
# Which ops ran, in which dtype


class RecordOps(TorchDispatchMode):
    """Records (op, dtype, shape, single) of the first tensor output of every aten op run inside it; single
    says whether the op returned that tensor alone (not in a tuple)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        if isinstance(first, torch.Tensor):
            self.ops.append((func, first.dtype, tuple(first.shape), first is out))
        return out


def assert_estimator_run(out, steps, update_forward_passes):
    """A grpo.py run with another estimator and d1's objective (mu > 1, beta > 0): every record there, the
    first ratio exactly 1 (old, reference and current log-probs read the same estimate), a KL once the policy
    moved, finite losses, and the update's forward passes as counted."""
    records = read_metrics(out)
    assert len(records) == steps
    assert all(r["first_ratio_error"] == 0.0 for r in records)
    assert records[-1]["kl"] > 0 and all(math.isfinite(r["loss"]) for r in records)
    assert all(r["update_forward_passes"] == update_forward_passes for r in records)
    return records
