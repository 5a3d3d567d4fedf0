"""
Helpers shared by the stage-script tests (test_sft.py, test_grpo.py, test_evaluate.py): running a script
as a subprocess (one process, or two gloo ranks under torch.distributed.run), writing tiny starting
checkpoints, and reading back what the scripts wrote (metrics.jsonl, parameters).

Every script runs from the repository root with OMP_NUM_THREADS=1 and writes only where its arguments
say (the tests pass folders under tmp_path).
"""

import dataclasses
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import model as M  # noqa: E402

RUN_TIMEOUT_S = 300  # a hung collective fails the test instead of hanging the suite
# variables of an enclosing torchrun would turn a one-process run into a rank of someone else's group
DISTRIBUTED_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                         "MASTER_PORT", "TORCHELASTIC_RUN_ID")


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
    """Run `script` (a file in the repository root) with `args`; with expect_ok, fail unless it exits 0."""
    cmd = command(script, args, nproc)
    proc = subprocess.run(cmd, cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    run = Run(cmd, proc.returncode, proc.stdout, proc.stderr)
    if expect_ok:
        assert run.returncode == 0, run.describe()
    return run


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
    tokenizer = M.build_tiny_tokenizer()
    M.save_model(M.build_model("tiny", tokenizer, seed=seed), tokenizer, str(path))
    return str(path)


def digit_checkpoint(path, seed=0):
    """A `tiny` model edited to write the digits 1-4 almost everywhere, in a prompt-dependent random mix.
    A random model's completions score 0 on tiny_sudoku, so every GRPO advantage would be 0; this one fills
    some cells right by chance, so groups have a reward spread and the policy gradient is not zero.
    (Embedding column 0 gets a large constant, so the final norm's output is dominated by that column;
    only the LM head rows of '1'..'4' read it.)"""
    tokenizer = M.build_tiny_tokenizer()
    model = M.build_model("tiny", tokenizer, seed=seed)
    digits = tokenizer.convert_tokens_to_ids(list("1234"))
    with torch.no_grad():
        model.wte.weight[:, 0] += 10.0
        model.ff_out.weight[:, 0] = 0.0
        model.ff_out.weight[digits, 0] = 1.0
    M.save_model(model, tokenizer, str(path))
    return str(path)


# -----------------------------------------------------------------------------
# Reading what a run wrote


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def parameters(path):
    """{name: tensor} of the model a folder holds (a full checkpoint, or an adapter on its base)."""
    return {name: p.detach() for name, p in M.load_model(str(path)).named_parameters()}


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
    return sorted(n for n in os.listdir(out_dir) if n.startswith(M.CHECKPOINT_PREFIX))


# the files of a full model folder in LLaDA's layout, as the stage scripts write it
LLADA_LAYOUT = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
