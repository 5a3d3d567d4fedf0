"""
Every RL method of grpo.py side by side on a tiny task, at matched compute, from the same SFT checkpoints.

Compute is CPU seconds at one thread per run (OMP_NUM_THREADS=1), so that `--jobs` runs can share the cores
without slowing each other. In the order it happens:
  1. sft.py per seed: the checkpoint every method of that seed starts from;
  2. each method's cost per step: a short run from the first seed's checkpoint, the median of its steps'
     training seconds (rollout + update; sft.py's step for the baseline; the first two left out: warm-up),
     times the run's CPU seconds over its wall seconds (other work may share the cores);
  3. every (method, seed) run for round(--cpu-seconds / cost) steps, held-out accuracy at the start, halfway
     and at the end; the baseline is that SFT checkpoint trained on, run_tiny.sh's way, for as long;
  4. a markdown table (final held-out accuracy per seed, mean, per-seed difference to d1, cost per step
     split into rollout and update, the CPU seconds each run used, measured by the OS, evaluation included)
     and a plot of held-out accuracy against the budget spent.
Each run writes a cpu.json when it ends: a rerun skips what has finished (and starts over what had not), so
the batch can be resumed. Run it from the repository root.

    python -m bench.compare --task tiny_sudoku --plot docs/compare_tiny_sudoku.png
    python -m bench.compare --task tiny_countdown --seeds 0 1 2 --cpu-seconds 120 --jobs 2
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import checkpoint as C
import data

# grpo.py's flags of each method beyond the task, seed and checkpoint. The ratio-free objectives (wd1, SPG)
# run at a tenth of GRPO's learning rate: nothing bounds their step (no clip, no KL), and wd1 collapses at
# GRPO's (docs/estimators.md). SPG masks the sampler's blocks: four blocks of the task's completion. JustGRPO
# runs as its authors do, one optimiser step per rollout batch and no KL: its ratio is exactly 1.
METHODS = {
    "d1": [],
    "coupled": ["--estimator", "coupled"],
    "wd1": ["--objective", "wd1", "--lr", "3e-5"],
    "spg": ["--estimator", "spg", "--objective", "spg", "--lr", "3e-5", "--block-length", "{gen_length/4}"],
    "justgrpo": ["--estimator", "ar", "--rollout-order", "left-to-right", "--p-mask-prompt", "0",
                 "--num-iterations", "1", "--beta", "0"],
    "igpo": ["--inpaint-zero-std-groups"],
    "d2": ["--estimator", "stepmerge", "--merge-chunks", "4"],
}
BASELINE = "sft-continued"
CONTINUED_SFT = ["--lr", "5e-4", "--warmup-steps", "0"]  # run_tiny.sh's baseline
CALIBRATION_STEPS = {"grpo": 6, "sft": 30}


def method_flags(method, task):
    gen_length = data.generation_defaults(task)["gen_length"]
    return [str(gen_length // 4) if flag == "{gen_length/4}" else flag for flag in METHODS[method]]


def read_records(folder):
    return C.read_jsonl(os.path.join(folder, C.METRICS_NAME))


def cpu_per_wall(folder):
    """CPU seconds over wall seconds of a finished run (its cpu.json): 1 when nothing else shared its core."""
    with open(os.path.join(folder, "cpu.json")) as f:
        usage = json.load(f)
    return usage["cpu_seconds"] / usage["wall_seconds"]


def training_seconds(record):
    """One step's training time: grpo.py's rollout + update, sft.py's step (neither counts evaluation)."""
    return record["rollout_s"] + record["update_s"] if "rollout_s" in record else record["dt_ms"] / 1000


def run_all(jobs, parallel):
    """Run (command, folder) pairs, `parallel` at a time, each on one thread; write folder/cpu.json with the
    CPU seconds the OS measured for it. Skips a folder that has its cpu.json (a finished run)."""
    pending = [(command, folder) for command, folder in jobs
               if not os.path.exists(os.path.join(folder, "cpu.json"))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    running = {}
    while pending or running:
        while pending and len(running) < parallel:
            command, folder = pending.pop(0)
            os.makedirs(folder, exist_ok=True)
            stale = os.path.join(folder, C.METRICS_NAME)  # of a run stopped before its end: it starts over
            if os.path.exists(stale):
                os.remove(stale)
            log = open(os.path.join(folder, "run.log"), "w")
            process = subprocess.Popen([sys.executable, *command, "--out-dir", folder], stdout=log,
                                       stderr=subprocess.STDOUT, env=env)
            running[process.pid] = (process, folder, log, time.time())
            print(f"start {folder}: {' '.join(command)}", flush=True)
        pid, status, usage = os.wait4(-1, 0)
        if pid not in running:
            continue
        process, folder, log, t0 = running.pop(pid)
        log.close()
        if os.waitstatus_to_exitcode(status) != 0:
            for other, *_ in running.values():
                other.terminate()
            raise SystemExit(f"{folder} failed (exit {os.waitstatus_to_exitcode(status)}): see "
                             f"{os.path.join(folder, 'run.log')}")
        cpu = {"cpu_seconds": usage.ru_utime + usage.ru_stime, "wall_seconds": time.time() - t0}
        with open(os.path.join(folder, "cpu.json"), "w") as f:
            json.dump(cpu, f)
        print(f"done  {folder}: {cpu['cpu_seconds']:.0f} CPU s, {cpu['wall_seconds']:.0f} s", flush=True)


def held_out_curve(records):
    """(share of the run's steps done, held-out %) at each evaluation, the starting point included."""
    last = max(record["step"] for record in records)
    return [(record["step"] / last, 100 * record["eval_accuracy"]) for record in records
            if "eval_accuracy" in record]


def main():
    parser = argparse.ArgumentParser(description="grpo.py's RL methods side by side at matched CPU seconds.")
    parser.add_argument("--task", default="tiny_sudoku", choices=data.TINY_TASKS, help="a tiny task")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one SFT checkpoint each")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                        help="grpo.py methods to run (d1 is the reference of the differences)")
    parser.add_argument("--cpu-seconds", type=float, default=120,
                        help="training compute per run, in CPU seconds at one thread")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--eval-examples", type=int, default=500, help="held-out examples of each evaluation")
    parser.add_argument("--out-dir", default="out/compare", help="runs go to OUT_DIR/TASK/...")
    parser.add_argument("--plot", default=None, help="the PNG to write (default OUT_DIR/TASK/compare.png)")
    args = parser.parse_args()
    if "d1" not in args.methods:
        raise SystemExit("--methods must include d1: the table's differences are to d1")
    if args.jobs < 1 or args.cpu_seconds <= 0:
        raise SystemExit(f"--jobs {args.jobs} and --cpu-seconds {args.cpu_seconds}: both must be positive")
    root = os.path.join(args.out_dir, args.task)
    task = ["--task", args.task]

    # 1. the SFT checkpoints
    sft = {seed: os.path.join(root, f"s{seed}", "sft") for seed in args.seeds}
    run_all([(["sft.py", *task, "--seed", str(seed)], sft[seed]) for seed in args.seeds], args.jobs)

    # 2. cost per step, from the first seed's checkpoint
    first = sft[args.seeds[0]]
    calibration = [(["grpo.py", *task, "--model", first, *method_flags(m, args.task), "--max-steps",
                     str(CALIBRATION_STEPS["grpo"]), "--eval-examples", "0", "--save-every", "0"],
                    os.path.join(root, "calibrate", m)) for m in args.methods]
    calibration.append((["sft.py", *task, "--model", first, *CONTINUED_SFT, "--max-steps",
                         str(CALIBRATION_STEPS["sft"]), "--eval-examples", "0", "--save-every", "0"],
                        os.path.join(root, "calibrate", BASELINE)))
    run_all(calibration, args.jobs)
    steps = {}
    for name in [*args.methods, BASELINE]:
        folder = os.path.join(root, "calibrate", name)
        timed = [training_seconds(r) for r in read_records(folder) if ("rollout_s" in r or "dt_ms" in r)
                 and r["step"] > 2]
        cost = cpu_per_wall(folder) * statistics.median(timed)  # should other work have shared the cores
        steps[name] = max(4, round(args.cpu_seconds / cost))
        print(f"{name}: {cost:.3f} s a step -> {steps[name]} steps", flush=True)

    # 3. every method on every seed, and the baseline
    evaluation = ["--eval-examples", str(args.eval_examples), "--save-every", "0"]
    runs = []
    for seed in args.seeds:
        for m in args.methods:
            runs.append((["grpo.py", *task, "--seed", str(seed), "--model", sft[seed],
                          *method_flags(m, args.task), "--max-steps", str(steps[m]),
                          "--eval-every", str(-(-steps[m] // 2)), *evaluation],
                         os.path.join(root, f"s{seed}", m)))
        runs.append((["sft.py", *task, "--seed", str(seed), "--model", sft[seed], *CONTINUED_SFT,
                      "--max-steps", str(steps[BASELINE]), "--eval-every", str(-(-steps[BASELINE] // 2)),
                      *evaluation], os.path.join(root, f"s{seed}", BASELINE)))
    run_all(runs, args.jobs)

    # 4. the table and the plot
    report(args, root, steps)


def report(args, root, steps):
    def folder(name, seed):
        return os.path.join(root, f"s{seed}", name)

    def final(name, seed):
        return held_out_curve(read_records(folder(name, seed)))[-1][1]

    def cpu(name, seed):
        with open(os.path.join(folder(name, seed), "cpu.json")) as f:
            return json.load(f)["cpu_seconds"]

    def step_costs(name, key):
        """A step's seconds of `key`, in CPU seconds: each run's wall seconds x its CPU / wall seconds."""
        return statistics.mean(record[key] * rate for rate, records in
                               ((cpu_per_wall(folder(name, s)), read_records(folder(name, s))) for s in seeds)
                               for record in records if key in record)

    seeds = args.seeds
    start = {s: held_out_curve(read_records(folder("d1", s)))[0][1] for s in seeds}  # grpo.py's step 0
    lines = ["| run | flags | steps | CPU s a step: rollout + update | CPU s | "
             + " | ".join(f"seed {s}" for s in seeds) + " | mean | against d1, per seed | mean diff |",
             "| --- " * (8 + len(seeds)) + "|",
             "| SFT (start) | | | | | " + " | ".join(f"{start[s]:.1f}" for s in seeds)
             + f" | {statistics.mean(start.values()):.1f} | | |"]
    d1 = {s: final("d1", s) for s in seeds}
    for name in [BASELINE, *args.methods]:
        finals = {s: final(name, s) for s in seeds}
        if name == BASELINE:
            flags = "`sft.py " + " ".join(CONTINUED_SFT) + "`"
            cost = f"{step_costs(name, 'dt_ms') / 1000:.2f}"
        else:
            flags = f"`{' '.join(method_flags(name, args.task))}`" if METHODS[name] else "grpo.py's defaults"
            cost = f"{step_costs(name, 'rollout_s'):.2f} + {step_costs(name, 'update_s'):.2f}"
        diffs = {s: finals[s] - d1[s] for s in seeds}
        against = "" if name == "d1" else " / ".join(f"{diffs[s]:+.1f}" for s in seeds)
        mean_diff = "" if name == "d1" else f"{statistics.mean(diffs.values()):+.1f}"
        lines.append(f"| {name} | {flags} | {steps[name]} | {cost} | "
                     f"{statistics.mean(cpu(name, s) for s in seeds):.0f} | "
                     + " | ".join(f"{finals[s]:.1f}" for s in seeds)
                     + f" | {statistics.mean(finals.values()):.1f} | {against} | {mean_diff} |")
    table = "\n".join(lines)
    with open(os.path.join(root, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is an optional dependency (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, name in enumerate([*args.methods, BASELINE]):
        for j, seed in enumerate(seeds):
            curve = held_out_curve(read_records(folder(name, seed)))
            if curve[0][0] > 0:  # sft.py does not evaluate its starting point: grpo.py's step 0 did
                curve.insert(0, (0.0, start[seed]))
            ax.plot([args.cpu_seconds * share for share, _ in curve], [accuracy for _, accuracy in curve],
                    color=f"C{i % 10}", linestyle=("-", "--", ":", "-.")[j % 4], marker="o", markersize=2.5,
                    label=name if j == 0 else None)
    ax.set(xlabel="training CPU seconds (the budget x the share of the run's steps)",
           ylabel="held-out accuracy (%)",
           title=f"{args.task}: {len(seeds)} seeds (line style), matched CPU seconds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path = args.plot or os.path.join(root, "compare.png")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
