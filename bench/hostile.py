"""Hostile completions for rewards.py, shared by its tests and its benchmark (`python -m bench.rewards`).

`hostile_corpus(n)` is the one set of hostile texts: tests/test_hostile.py checks that every reward
survives it and is never fooled, and the bench times every reward on it. `D1_CALLS` pairs each of
d1's regular-expression calls that Python's re runs in quadratic time on such text with the linear
call rewards.py makes instead: the tests check that each pair agrees on random text, the bench
times both.
"""

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
    **{f"sudoku pattern {i}": (_d1_group(rewards.SUDOKU_PATTERNS[i]), rewards._SUDOKU_PARSES[i])
       for i in (0, 1, 3)},
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
