"""
Plot a GRPO run from its metrics.jsonl: the mean rollout reward and the held-out greedy accuracy
against the step. matplotlib is an optional dependency (pip install matplotlib).

    python plot.py out/grpo/metrics.jsonl --output out/grpo.png
    python plot.py out/seed0/grpo/metrics.jsonl out/seed1/grpo/metrics.jsonl --output grpo.png
"""

import argparse
import os

parser = argparse.ArgumentParser(
    description="Reward and held-out accuracy against step, from metrics.jsonl files.")
parser.add_argument("metrics", nargs="+", help="metrics.jsonl files written by grpo.py (one line per run)")
parser.add_argument("--output", default="out/grpo.png", help="the PNG to write")
parser.add_argument("--smooth", type=int, default=10, help="moving-average window of the reward, in steps")
args = parser.parse_args()

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    raise SystemExit("plot.py needs matplotlib, an optional dependency: pip install matplotlib") from None

from checkpoint import read_jsonl
from evaluate import model_names

fig, (ax_reward, ax_accuracy) = plt.subplots(1, 2, figsize=(10, 3.6))
folders = [os.path.dirname(os.path.abspath(path)) for path in args.metrics]
labels = model_names(folders)
# runs whose folders share a name (seed0/grpo, seed1/grpo) share a colour and differ in line style
names = [os.path.basename(folder) for folder in folders]
colors = {name: f"C{i % 10}" for i, name in enumerate(dict.fromkeys(names))}
styles = [("-", "--", ":", "-.")[names[:i].count(name) % 4] for i, name in enumerate(names)]
for path, label, name, style in zip(args.metrics, labels, names, styles):
    if not os.path.exists(path):
        raise SystemExit(f"{path} does not exist (grpo.py writes metrics.jsonl into its --out-dir)")
    records = read_jsonl(path)
    evaluated = [(r["step"], 100 * r["eval_accuracy"]) for r in records if "eval_accuracy" in r]
    records = [r for r in records if "reward" in r]
    if not records:
        raise SystemExit(f"{path} has no GRPO records (one JSON object per step with a 'reward')")
    steps = [r["step"] for r in records]
    rewards = [r["reward"] for r in records]
    window = max(1, args.smooth)
    smoothed = [sum(rewards[max(0, i - window + 1):i + 1]) / len(rewards[max(0, i - window + 1):i + 1])
                for i in range(len(rewards))]
    ax_reward.plot(steps, smoothed, color=colors[name], linestyle=style, label=label)
    ax_reward.plot(steps, rewards, color=colors[name], alpha=0.15, linewidth=0.6)
    if evaluated:
        ax_accuracy.plot(*zip(*evaluated), marker="o", markersize=3, color=colors[name], linestyle=style,
                         label=label)
ax_reward.set(xlabel="step", ylabel="mean reward of the rollouts",
              title=f"reward ({args.smooth}-step average)")
ax_accuracy.set(xlabel="step", ylabel="held-out accuracy (%)", title="greedy held-out accuracy")
for ax in (ax_reward, ax_accuracy):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
fig.tight_layout()
os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
fig.savefig(args.output, dpi=120)
print(f"wrote {args.output}")
