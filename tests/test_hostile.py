"""Guards rewards.py against hostile completions (bench.hostile.hostile_corpus, which the bench
times): every reward function of every task and `score` return a number within range and never raise
on power towers, deep parentheses, text far beyond MAX_COMPLETION_CHARS, unbalanced \\boxed{, other
scripts' digits, NUL bytes, huge integers, regex-backtracking bait and the empty string. And every
linear-time call that replaces one of d1's regular-expression calls (bench.hostile.D1_CALLS) returns
what d1's call returns, on thousands of random strings built from the fragments those expressions
read. And the benchmark starts as `python -m bench.rewards` from the repository root."""

import math
import os
import random
import subprocess
import sys

import pytest

import rewards
from bench import hostile

PUZZLE, SOLUTION = "4320004330100004", "4321124334122134"
COLUMNS = {
    "gsm8k": {"answer": "18"},
    "math500": {"answer": "\\frac{1}{2}"},
    "countdown": {"numbers": [9, 9, 9, 9], "target": 24},
    "sudoku": {"puzzle": PUZZLE, "solution": SOLUTION},
    "tiny_sudoku": {"puzzle": PUZZLE, "solution": SOLUTION},
}
HOSTILE = hostile.hostile_corpus(2 * rewards.MAX_COMPLETION_CHARS)    # past the cap, so it is exercised


def reward_range(fn, text):
    """The range a reward function may return on `text`."""
    if fn is rewards.xml_count_reward:
        # d1's count_xml loses 0.001 per trailing character; we ignore text past MAX_COMPLETION_CHARS.
        return -2 * 0.001 * (min(len(text), rewards.MAX_COMPLETION_CHARS) + 1) * 2, 1.0
    return 0.0, 1.0


@pytest.mark.parametrize("task", sorted(COLUMNS))
def test_every_reward_and_score_survive_hostile_text(task):
    columns = COLUMNS[task]
    for name, text in HOSTILE.items():
        for fn, _ in rewards.reward_functions(task):
            values = fn([text], **{k: [v] for k, v in columns.items()})
            low, high = reward_range(fn, text)
            assert len(values) == 1 and math.isfinite(values[0]), (name, fn.__name__, values)
            assert low <= values[0] <= high, (name, fn.__name__, values)
        correct, total = rewards.score(task, text, **columns)
        assert isinstance(correct, int) and isinstance(total, int) and 0 <= correct <= total, \
            (name, correct, total)


def test_hostile_text_is_never_correct():
    for name, text in HOSTILE.items():
        assert rewards.score("countdown", text, numbers=[9, 9, 9, 9], target=24) == (0, 1), name
        assert rewards.countdown_reward([text], numbers=[[9, 9, 9, 9]], target=[24])[0] in (0.0, 0.1), name
        # d1's float() reads digits of any script, so a boxed Arabic-Indic or fullwidth 18 is 18.
        expected = name in ("arabic-indic digits", "fullwidth digits")
        assert rewards.score("gsm8k", text, answer="18") == (int(expected), 1), name


def test_countdown_power_tower_and_bounds_are_refused():
    assert rewards.evaluate_expression("9**9**9**9") is None
    assert rewards.countdown_reward(["<answer>9**9**9</answer>"], numbers=[[9, 9, 9]], target=[24]) == [0.1]
    assert rewards.evaluate_expression("(" * 100_000 + "1" + ")" * 100_000) is None
    assert rewards.evaluate_expression("1" + "*99" * 200) is None       # too many tokens
    assert rewards.evaluate_expression("1" + "*99" * 100) == 99 ** 100   # within every bound


def test_non_string_completion_is_empty_text():
    assert rewards.score("gsm8k", None, answer="18") == (0, 1)
    assert rewards.sudoku_reward([None], puzzle=[PUZZLE], solution=[SOLUTION]) == [0.0]


# --- d1's expressions against the linear calls that replace them -----------------------------------

FRAGMENTS = ["<answer>", "</answer>", "<answer", "<reasoning>", "</reasoning>", "<reasoning>\n",
             "\n</reasoning>\n<answer>\n", "\n</answer>\n", "\n", " ", "  ", "\t", "x", "1", "42", "4321",
             "1234567890123456", "```", "\\boxed{", "{", "}", "=", "+", "-", "*", "/", "(", ")", ".",
             "<|eot_id|>", "<|endoftext|>"]


# the shapes d1's expressions look for, filled and surrounded with random fragments so that both
# matches and near misses are common
SKELETONS = [("<reasoning>\n", "\n</reasoning>\n<answer>\n", "\n</answer>\n"),
             ("<reasoning>", "</reasoning>", "<answer>", "</answer>"), ("<answer>", "```", "```"),
             ("<answer>```", "\n", "```"),
             ("\\boxed{", "}"), ("<answer>", "</answer>"), ("<answer>", "<|eot_id|>"), ("(1 ", "= ", "1")]


def random_text(rng):
    def fragments(most):
        return "".join(rng.choices(FRAGMENTS, k=rng.randrange(most)))
    if rng.random() < 0.3:
        return fragments(24)
    pieces = [piece + fragments(4) for piece in rng.choice(SKELETONS)]
    return (fragments(3) if rng.random() < 0.5 else "") + "".join(pieces)


@pytest.mark.parametrize("name", sorted(hostile.D1_CALLS))
def test_linear_calls_return_what_d1s_expressions_return(name):
    d1_call, ours = hostile.D1_CALLS[name]
    rng = random.Random(0)
    results = []
    for _ in range(3000):
        text = random_text(rng)
        results.append(d1_call(text))
        assert ours(text) == results[-1], repr(text)
    found = sum(bool(r) for r in results)
    assert 30 <= found <= len(results) - 30, f"{name}: the fuzz should both match and miss ({found} matches)"


def test_bench_starts_as_a_module_from_the_root():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-m", "bench.rewards", "--help"], cwd=root, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0 and "--num-completions" in run.stdout, run.stderr
