"""The rewards benchmark: d1's regular-expression calls against the linear calls rewards.py makes
(bench/hostile.py's D1_CALLS) on the hostile corpus at growing lengths, then every reward function
and `score` of every task on many hostile completions: the slowest call, the 99.9th percentile and
the total time.

    python -m bench.rewards                           # from the repository root
    python -m bench.rewards --num-completions 1000    # a quicker second part
"""

import argparse
import gc
import random
import time

import rewards
from bench.hostile import D1_CALLS, hostile_corpus


def best_time(fn, *args, repeats=3):
    """The fastest of `repeats` calls, in seconds (the others met the scheduler or the collector)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return min(times)


def bench_d1_calls(sizes):
    """{name: (d1's, ours)}: the slowest call over the corpus at each size, d1's then ours."""
    corpora = [list(hostile_corpus(n).values()) for n in sizes]
    return {name: tuple([max(best_time(fn, text) for text in corpus) for corpus in corpora] for fn in pair)
            for name, pair in D1_CALLS.items()}


BENCH_COLUMNS = {
    "gsm8k": {"answer": "18"},
    "math500": {"answer": "\\frac{1}{2}"},
    "countdown": {"numbers": [9, 9, 9], "target": 24},
    "sudoku": {"puzzle": "4320004330100004", "solution": "4321124334122134"},
    "tiny_sudoku": {"puzzle": "4320004330100004", "solution": "4321124334122134"},
}


def _call(task, fn, text):
    """One reward function (on a batch of one) or `score` on one completion."""
    if fn is rewards.score:
        return fn(task, text, **BENCH_COLUMNS[task])
    return fn([text], **{k: [v] for k, v in BENCH_COLUMNS[task].items()})


def bench_rewards(num_completions, seed=0):
    """Every reward function and `score` of every task on `num_completions` corpus texts (every
    5000th of a megabyte, the rest of 10 to 5000 characters): the slowest call as (seconds, task,
    function, length), that call re-timed (best of 3), the 99.9th percentile and the total time."""
    rng = random.Random(seed)
    corpora = {n: list(hostile_corpus(n).values()) for n in (10, 100, 1000, 5000, 1_000_000)}
    texts = [rng.choice(corpora[1_000_000 if i % 5000 == 0 else rng.choice([10, 100, 1000, 5000])])
             for i in range(num_completions)]
    times, slowest, total = [], (0.0,), time.perf_counter()
    gc.collect()
    gc.disable()        # a collection would land on one call at random
    try:
        for task in BENCH_COLUMNS:
            for fn in [fn for fn, _ in rewards.reward_functions(task)] + [rewards.score]:
                for text in texts:
                    times.append(best_time(_call, task, fn, text, repeats=1))
                    if times[-1] > slowest[0]:
                        slowest = (times[-1], task, fn, text)
        total = time.perf_counter() - total
        seconds, task, fn, text = slowest
        retimed = best_time(_call, task, fn, text)
    finally:
        gc.enable()
    times.sort()
    return (seconds, task, fn.__name__, len(text)), retimed, times[int(0.999 * (len(times) - 1))], total


def bench(num_completions):
    """Print both parts: d1's calls against ours, then every reward on `num_completions` texts."""
    sizes = (1024, 2048, 4096)
    print(f"d1's expression calls against ours: the slowest over the hostile corpus, ms, at {sizes} "
          "characters")
    for name, (d1, ours) in bench_d1_calls(sizes).items():
        print(f"  {name:32} d1 " + " ".join(f"{t * 1e3:8.2f}" for t in d1) + f" ({d1[-1] / d1[0]:3.0f}x)"
              f" | ours " + " ".join(f"{t * 1e3:5.2f}" for t in ours) + f" ({ours[-1] / ours[0]:3.0f}x)")
    (seconds, task, name, length), retimed, p999, total = bench_rewards(num_completions)
    print(f"slowest single reward call: {seconds * 1e3:.2f} ms ({task} {name}, {length} chars; re-timed "
          f"{retimed * 1e3:.2f} ms); 99.9th percentile {p999 * 1e3:.3f} ms; total {total:.1f} s for "
          f"{num_completions} completions x every reward and score of {len(BENCH_COLUMNS)} tasks")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.rewards", description=__doc__.splitlines()[0])
    parser.add_argument("--num-completions", type=int, default=100_000, help="hostile completions to time")
    args = parser.parse_args()
    bench(args.num_completions)
