"""Hostile completions for rewards.py, and its benchmark (`python rewards.py --bench`).

`hostile_corpus(n)` is the one set of hostile texts: tests/test_hostile.py checks that every reward
survives it and is never fooled, and the bench times every reward on it. `D1_CALLS` pairs each of
d1's regular-expression calls that Python's re runs in quadratic time on such text with the linear
call rewards.py makes instead: the tests check that each pair agrees on random text, the bench
times both.
"""

import gc
import random
import time

import rewards


def _d1_match(pattern):
    """d1's format reward of one text, as 1.0 or 0.0."""
    return lambda text: float(pattern.match(text) is not None)


def _one(reward):
    return lambda text: reward([text])[0]


def _d1_group(pattern):
    return lambda text: rewards._group(pattern.search(text))


D1_CALLS = {       # name: (d1's call, the call rewards.py makes)
    "answer tags": (rewards.ANSWER_TAGS.findall, rewards.answer_tags),
    "strict format": (_d1_match(rewards.STRICT_FORMAT), _one(rewards.strict_format_reward)),
    "soft format": (_d1_match(rewards.SOFT_FORMAT), _one(rewards.soft_format_reward)),
    "gsm8k boxed": (rewards.GSM8K_BOXED.findall, lambda text: list(rewards.gsm8k_boxes(text))),
    "countdown equation": (_d1_group(rewards.COUNTDOWN_EQUATION), rewards.countdown_equation_left),
    **{f"sudoku pattern {i}": (_d1_group(rewards.SUDOKU_PATTERNS[i]), rewards._SUDOKU_PARSES[i]) for i in (0, 1, 3)},
}


def hostile_corpus(n):
    """Completions of about n characters (a few fixed) made to hang, crash or fool a careless
    parser; several are the worst case of one of d1's expressions."""
    return {
        "power tower": "<reasoning>\nx\n</reasoning>\n<answer>\n9**9**9**9\n</answer>\n",
        "power tower boxed": "\\boxed{9**9**9**9}",
        "deep parentheses": "<answer>" + "(" * n + "9*9*9*9" + ")" * n + "</answer>",
        "deep parentheses unclosed": "\\boxed{" + "(" * n,
        "long answer": "<answer>" + "x" * n + "</answer>",
        "digits and spaces": "1 " * (n // 2) + "= 3",
        "digits and spaces, no result": "1 " * (n // 2) + "=x",
        "boxed run": "\\boxed{" * (n // 7),
        "unbalanced boxed": "\\boxed{" * (n // 8) + "{" * (n // 8),
        "nested braces": "\\boxed{" + "{" * (n // 2) + "}" * (n // 2 - 1),
        "arabic-indic digits": "<answer>\u0664\u0663\u0662\u0661" * 4 + "</answer> \\boxed{\u0661\u0668}",
        "fullwidth digits": "<answer>\uff14\uff13\uff12\uff11" * 4 + "</answer> \\boxed{\uff11\uff18}",
        "superscripts": "<answer>\u00b2\u00b3</answer>",
        "mixed scripts": "\u0660\u0661\u0662\uff11\uff12\u00b2 <>/answer{}" * (n // 16),
        "nul bytes": "<answer>\x00" + "1\x00" * (n // 2) + "</answer>\x00\\boxed{\x00}",
        "huge integer": "<answer>" + "9" * n + "</answer>",
        "huge integer boxed": "\\boxed{" + "9" * n + "}",
        "huge fraction": "\\boxed{1/" + "7" * n + "}",
        "answer tag run": "<answer>" * (n // 8),
        "answer fragments": "<answer" * (n // 14) + "</answer" * (n // 16) + "<answer>" + " " * n,
        "format bait": "<reasoning>\n" + "\n</reasoning>\n<answer>\n" * (n // 24) + "\n</answer>",
        "format bait, right end": "<reasoning>\n" + "\n</reasoning>\n<answer>\n" * (n // 24) + "</answer>\n",
        "soft format bait": "<reasoning>" + "</reasoning><answer>" * (n // 20),
        "soft format spaces": "<reasoning>" + ("</reasoning>" + " " * 50) * (n // 62),
        "space runs": " " * n,
        "code fence bait": "<answer>```" + " " * n + "x" + "```" * (n // 30),
        "sixteen digit bait": "<answer>" + "1234567890123456" * (n // 16),
        "frac and sqrt": "\\boxed{" + "\\frac" * (n // 10) + "\\sqrt" * (n // 10) + "}",
        "units": "\\boxed{" + "\\text{ " * (n // 7) + "}",
        "boxed with space": "\\boxed " * (n // 7),
        "end markers": "<|eot_id|>" * (n // 10) + "</answer>",
        "empty": "",
    }


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
    sizes = (1024, 2048, 4096)
    print(f"d1's expression calls against ours: the slowest over the hostile corpus, ms, at {sizes} characters")
    for name, (d1, ours) in bench_d1_calls(sizes).items():
        print(f"  {name:32} d1 " + " ".join(f"{t * 1e3:8.2f}" for t in d1) + f" ({d1[-1] / d1[0]:3.0f}x)"
              f" | ours " + " ".join(f"{t * 1e3:5.2f}" for t in ours) + f" ({ours[-1] / ours[0]:3.0f}x)")
    (seconds, task, name, length), retimed, p999, total = bench_rewards(num_completions)
    print(f"slowest single reward call: {seconds * 1e3:.2f} ms ({task} {name}, {length} chars; re-timed "
          f"{retimed * 1e3:.2f} ms); 99.9th percentile {p999 * 1e3:.3f} ms; total {total:.1f} s for "
          f"{num_completions} completions x every reward and score of {len(BENCH_COLUMNS)} tasks")
