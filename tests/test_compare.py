"""
Guards bench/compare.py, grpo.py's methods side by side at matched CPU seconds:

- run_all runs its commands `jobs` at a time, each on one thread, writes each folder's cpu.json with the CPU
  seconds the OS measured, skips a folder that has one (a resumed batch), starts over a run that had not
  ended (its metrics.jsonl removed), and stops on a failed run, naming its log;
- SPG's block length is a quarter of the task's completion; a batch without d1, or with no jobs, is refused
  before anything runs;
- end to end on tiny_sudoku (one seed, d1 and wd1, a budget of 0.1 CPU seconds, 20 held-out examples, from a
  3-step SFT checkpoint put where the batch looks for it, so that the batch skips its SFT): the calibration
  runs, each method's steps from its cost, each run evaluated at the start, halfway and at the end, the table
  with a row per run and the differences to d1, and the plot.
"""

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT, read_metrics, run_script

from bench import compare


def test_run_all_one_thread_each_skips_finished_and_names_a_failure(tmp_path):
    write = "import os, sys; open(sys.argv[-1] + '/threads', 'w').write(os.environ['OMP_NUM_THREADS'])"
    jobs = [(["-c", write], str(tmp_path / name)) for name in ("a", "b", "c")]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "metrics.jsonl").write_text('{"step": 1}\n')  # a run stopped before its end
    compare.run_all(jobs, parallel=2)
    assert not (tmp_path / "c" / "metrics.jsonl").exists()  # started over, not appended to
    for name in ("a", "b", "c"):
        assert (tmp_path / name / "threads").read_text() == "1"
        usage = json.loads((tmp_path / name / "cpu.json").read_text())
        assert usage["cpu_seconds"] >= 0 and usage["wall_seconds"] > 0
    (tmp_path / "a" / "threads").unlink()
    compare.run_all(jobs, parallel=2)  # finished: nothing runs again
    assert not (tmp_path / "a" / "threads").exists()
    with pytest.raises(SystemExit, match=r"failed \(exit 3\).*run.log"):
        compare.run_all([(["-c", "raise SystemExit(3)"], str(tmp_path / "bad"))], parallel=2)
    assert not (tmp_path / "bad" / "cpu.json").exists()


def test_spg_masks_four_blocks_of_the_tasks_completion():
    assert compare.method_flags("spg", "tiny_sudoku")[-2:] == ["--block-length", "5"]
    assert compare.method_flags("spg", "tiny_countdown")[-2:] == ["--block-length", "8"]
    assert compare.method_flags("d1", "tiny_countdown") == []


@pytest.mark.parametrize("flags, message", [(["--methods", "wd1"], "must include d1"),
                                           (["--jobs", "0"], "must be positive")])
def test_refuses_what_cannot_run(tmp_path, flags, message):
    run = subprocess.run([sys.executable, "-m", "bench.compare", *flags, "--out-dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and message in run.stderr and "Traceback" not in run.stderr
    assert not any(tmp_path.iterdir())  # refused before anything ran


def cells(line):
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_end_to_end_on_tiny_sudoku(tmp_path):
    sft = tmp_path / "tiny_sudoku" / "s0" / "sft"
    run_script("sft.py", "--task", "tiny_sudoku", "--max-steps", 3, "--batch-size", 8, "--eval-examples", 4,
               "--save-every", 0, "--out-dir", sft)
    (sft / "cpu.json").write_text(json.dumps({"cpu_seconds": 1.0, "wall_seconds": 1.0}))
    plot = tmp_path / "compare.png"
    run = subprocess.run([sys.executable, "-m", "bench.compare", "--task", "tiny_sudoku", "--seeds", "0",
                          "--methods", "d1", "wd1", "--cpu-seconds", "0.1", "--jobs", "2",
                          "--eval-examples", "20", "--out-dir", str(tmp_path), "--plot", str(plot)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    root = tmp_path / "tiny_sudoku"
    for name in ("d1", "wd1", "sft-continued"):
        assert (root / "calibrate" / name / "cpu.json").is_file()
        records = read_metrics(root / "s0" / name)
        # a 0.1-second budget: the fewest steps the batch runs, 4; evaluations halfway and at the end
        assert max(r["step"] for r in records) == 4
        assert [r["step"] for r in records if "eval_accuracy" in r][-2:] == [2, 4]
    assert [r["step"] for r in read_metrics(root / "s0" / "d1") if "eval_accuracy" in r] == [0, 2, 4]
    lines = (root / "table.md").read_text().splitlines()
    header, rows = cells(lines[0]), {cells(line)[0]: cells(line) for line in lines[2:]}
    assert set(rows) == {"SFT (start)", "sft-continued", "d1", "wd1"}
    assert all(len(row) == len(header) for row in rows.values())
    wd1, d1, seed = rows["wd1"], rows["d1"], header.index("seed 0")
    assert wd1[header.index("flags")] == "`--objective wd1 --lr 3e-5`"
    difference = float(wd1[header.index("against d1, per seed")])
    assert difference == pytest.approx(float(wd1[seed]) - float(d1[seed]), abs=0.11)
    assert run.stdout.strip().endswith(f"wrote {plot}") or "no plot" in run.stdout
    if "no plot" not in run.stdout:
        assert os.path.getsize(plot) > 0
