"""Guards rewards.py against hostile completions: every reward function of every task and `score`
must return a finite number within its range, never raise, and never take long, on power towers,
deep parentheses, megabyte strings, unbalanced \\boxed{, other scripts' digits, NUL bytes, huge
integers, regex-backtracking bait and the empty string."""

import math
import time

import pytest

import rewards

PUZZLE, SOLUTION = "4320004330100004", "4321124334122134"
COLUMNS = {
    "gsm8k": {"answer": "18"},
    "math500": {"answer": "\\frac{1}{2}"},
    "countdown": {"numbers": [9, 9, 9, 9], "target": 24},
    "sudoku": {"puzzle": PUZZLE, "solution": SOLUTION},
    "tiny_sudoku": {"puzzle": PUZZLE, "solution": SOLUTION},
}
MEGABYTE = 1_000_000

HOSTILE = {
    "power tower": "<reasoning>\nx\n</reasoning>\n<answer>\n9**9**9**9\n</answer>\n",
    "power tower boxed": "\\boxed{9**9**9**9}",
    "deep parentheses": "<answer>" + "(" * 100_000 + "9*9*9*9" + ")" * 100_000 + "</answer>",
    "deep parentheses unclosed": "\\boxed{" + "(" * 100_000,
    "megabyte": "<answer>" + "x" * MEGABYTE + "</answer>",
    "megabyte of digits and spaces": "1 " * (MEGABYTE // 2) + "= 3",
    "unbalanced boxed": "\\boxed{" * 20_000 + "{" * 1000,
    "nested braces": "\\boxed{" + "{" * 50_000 + "}" * 49_999,
    "arabic-indic digits": "<answer>\u0664\u0663\u0662\u0661" * 4 + "</answer> \\boxed{\u0661\u0668}",
    "fullwidth digits": "<answer>\uff14\uff13\uff12\uff11" * 4 + "</answer> \\boxed{\uff11\uff18}",
    "superscripts": "<answer>\u00b2\u00b3</answer>",
    "nul bytes": "<answer>\x00" + "1\x00" * 1000 + "</answer>\x00\\boxed{\x00}",
    "huge integer": "<answer>" + "9" * 100_000 + "</answer>",
    "huge integer boxed": "\\boxed{" + "9" * 100_000 + "}",
    "huge fraction": "\\boxed{1/" + "7" * 100_000 + "}",
    "answer tag run": "<answer>" * 100_000,
    "answer fragments": "<answer" * 50_000 + "</answer" * 50_000 + "<answer>" + " " * 100_000,
    "format bait": "<reasoning>\n" + "\n</reasoning>\n<answer>\n" * 20_000 + "\n</answer>",
    "soft format bait": "<reasoning>" + "</reasoning>" + " " * 200_000,
    "space runs": " " * MEGABYTE,
    "code fence bait": "<answer>```" + " " * 200_000 + "x" + "```" * 10_000,
    "sixteen digit bait": "<answer>" + "1234567890123456" * 10_000,
    "frac and sqrt": "\\boxed{" + "\\frac" * 20_000 + "\\sqrt" * 20_000 + "}",
    "units": "\\boxed{" + "\\text{ " * 10_000 + "}",
    "boxed with space": "\\boxed " * 10_000,
    "end markers": "<|eot_id|>" * 50_000 + "</answer>",
    "empty": "",
}


def reward_range(fn, text):
    """The range a reward function may return on `text`."""
    if fn is rewards.xml_count_reward:
        # d1's count_xml loses 0.001 per trailing character; we ignore text past MAX_COMPLETION_CHARS.
        return -2 * 0.001 * (min(len(text), rewards.MAX_COMPLETION_CHARS) + 1) * 2, 1.0
    return 0.0, 1.0


@pytest.mark.parametrize("task", sorted(COLUMNS))
def test_every_reward_and_score_survive_hostile_text(task):
    columns = COLUMNS[task]
    slowest = 0.0
    for name, text in HOSTILE.items():
        for fn, _ in rewards.reward_functions(task):
            start = time.perf_counter()
            values = fn([text], **{k: [v] for k, v in columns.items()})
            slowest = max(slowest, time.perf_counter() - start)
            low, high = reward_range(fn, text)
            assert len(values) == 1 and math.isfinite(values[0]), (name, fn.__name__, values)
            assert low <= values[0] <= high, (name, fn.__name__, values)
        start = time.perf_counter()
        correct, total = rewards.score(task, text, **columns)
        slowest = max(slowest, time.perf_counter() - start)
        assert isinstance(correct, int) and isinstance(total, int) and 0 <= correct <= total, (name, correct, total)
    assert slowest < 0.25, f"{task}: a single call took {slowest * 1e3:.0f} ms"


def test_hostile_text_is_never_correct():
    for name, text in HOSTILE.items():
        assert rewards.score("countdown", text, numbers=[9, 9, 9, 9], target=24) == (0, 1), name
        assert rewards.countdown_reward([text], numbers=[[9, 9, 9, 9]], target=[24])[0] in (0.0, 0.1), name
        # d1's float() reads digits of any script, so a boxed Arabic-Indic or fullwidth 18 is 18.
        expected = name in ("arabic-indic digits", "fullwidth digits")
        assert rewards.score("gsm8k", text, answer="18") == (int(expected), 1), name


def test_countdown_power_tower_is_refused_fast():
    start = time.perf_counter()
    assert rewards.evaluate_expression("9**9**9**9") is None
    assert rewards.countdown_reward(["<answer>9**9**9</answer>"], numbers=[[9, 9, 9]], target=[24]) == [0.1]
    assert rewards.evaluate_expression("(" * 100_000 + "1" + ")" * 100_000) is None
    assert rewards.evaluate_expression("1" + "*99" * 200) is None       # too many tokens
    assert time.perf_counter() - start < 0.1


def test_non_string_completion_is_empty_text():
    assert rewards.score("gsm8k", None, answer="18") == (0, 1)
    assert rewards.sudoku_reward([None], puzzle=[PUZZLE], solution=[SOLUTION]) == [0.0]
