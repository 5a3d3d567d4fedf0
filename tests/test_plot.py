"""
Guards plot.py: it draws reward and held-out accuracy from grpo.py's metrics.jsonl when matplotlib is
installed, and otherwise stops with a message that says how to get it (matplotlib is optional).
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_metrics(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(json.dumps({"step": 0, "eval_accuracy": 0.5}) + "\n")
        for step in range(1, 31):
            record = {"step": step, "reward": 1 + step / 30}
            if step % 10 == 0:
                record["eval_accuracy"] = 0.5 + step / 100
            f.write(json.dumps(record) + "\n")


def test_plot(tmp_path):
    runs = [str(tmp_path / seed / "grpo" / "metrics.jsonl") for seed in ("s0", "s1")]
    for run in runs:
        write_metrics(run)
    output = tmp_path / "plot.png"
    done = subprocess.run([sys.executable, "plot.py", *runs, "--output", str(output), "--smooth", "5"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    if importlib.util.find_spec("matplotlib") is None:
        assert done.returncode != 0 and "pip install matplotlib" in done.stderr
        assert not output.exists()
    else:
        assert done.returncode == 0, done.stderr
        assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_refuses_a_file_without_grpo_records(tmp_path):
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed: test_plot checks the message that says so")
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n")
    done = subprocess.run([sys.executable, "plot.py", str(path), "--output", str(tmp_path / "x.png")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "no GRPO records" in done.stderr
