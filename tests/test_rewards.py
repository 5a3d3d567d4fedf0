"""Guards rewards.py on real-looking model text: d1's reward values and weights for every task
(with and without tags, multi-line), the fixes of d1's bugs (multi-line format regexes, the
backspace `\\boxed` test, against d1's MATH format reward transcribed, eval() on model text), d1's
evaluation parsing (boxed first, then answer tags), MATH answer equivalence, the safe Countdown
evaluator, Sudoku cell counting, tiny_sudoku's rewards, sudoku_valid, and the reward interface
contract."""

from fractions import Fraction

import pytest

import rewards
from rewards import evaluate_expression, is_equiv, reward_functions, score


def total_reward(task, completion, **columns):
    """d1's reward: the weighted sum of the task's reward functions on one completion."""
    return sum(w * fn([completion], **{k: [v] for k, v in columns.items()})[0]
               for fn, w in reward_functions(task))


def each_reward(task, completion, **columns):
    return {fn.__name__: fn([completion], **{k: [v] for k, v in columns.items()})[0]
            for fn, _ in reward_functions(task)}


# --- GSM8K ---------------------------------------------------------------------------------------

GSM8K_PERFECT = ("<reasoning>\nJanet's ducks lay 16 eggs per day. She eats 3 and bakes 4,\n"
                 "so she sells 16 - 7 = 9 eggs at $2 each: 9 * 2 = 18.\n</reasoning>\n"
                 "<answer>\n18\n</answer>\n")


def test_gsm8k_perfect_multiline_completion_gets_d1s_maximum():
    r = each_reward("gsm8k", GSM8K_PERFECT, answer="18")
    assert r == {"xml_count_reward": 1.0, "soft_format_reward": 1.0, "strict_format_reward": 1.0,
                 "integer_answer_reward": 1.0, "gsm8k_correctness_reward": 1.0}
    assert total_reward("gsm8k", GSM8K_PERFECT, answer="18") == pytest.approx(4.0)
    # d1's first strict regex had no DOTALL: multi-line reasoning never matched. Regression:
    assert "\n" in GSM8K_PERFECT.split("</reasoning>")[0][len("<reasoning>\n"):]


def test_gsm8k_llada_style_eval_output():
    # What LLaDA writes after the "<reasoning>" prefill of d1's evaluation prompt.
    text = ("\nShe has 16 - 3 - 4 = 9 eggs left, so she makes 9 * 2 = 18 dollars.\n</reasoning>\n"
            "<answer>\n\\boxed{18}\n</answer><|eot_id|><|endoftext|><|endoftext|>")
    r = each_reward("gsm8k", text, answer="18")
    assert r["strict_format_reward"] == r["soft_format_reward"] == 0.0     # no leading <reasoning>
    assert r["integer_answer_reward"] == 0.0 and r["gsm8k_correctness_reward"] == 0.0  # "\boxed{18}" != "18"
    # d1's count_xml: 3 tags placed; "\n</answer>\n" is absent, so d1 charges the whole text as
    # trailing, and the 36 characters of end tokens after "\n</answer>" once more.
    tail = len("<|eot_id|><|endoftext|><|endoftext|>")
    assert r["xml_count_reward"] == pytest.approx(2 * (3 * 0.125 - 0.001 * len(text) - 0.001 * (tail - 1)))
    assert score("gsm8k", text, answer=18.0) == (1, 1)
    assert score("gsm8k", text, answer=17.0) == (0, 1)


def test_gsm8k_wrong_or_missing_answer():
    wrong = GSM8K_PERFECT.replace("\n18\n", "\n17\n")
    assert each_reward("gsm8k", wrong, answer="18")["gsm8k_correctness_reward"] == 0.0
    assert total_reward("gsm8k", wrong, answer="18") == pytest.approx(2.0)
    assert total_reward("gsm8k", "The answer is 18.", answer="18") == 0.0
    trailing = GSM8K_PERFECT + "Some extra words."
    assert each_reward("gsm8k", trailing, answer="18")["strict_format_reward"] == 0.0
    assert each_reward("gsm8k", trailing, answer="18")["xml_count_reward"] < 1.0
    soft_only = "<reasoning>18</reasoning> <answer>18</answer>"
    r = each_reward("gsm8k", soft_only, answer="18")
    assert ((r["soft_format_reward"], r["strict_format_reward"], r["gsm8k_correctness_reward"])
            == (1.0, 0.0, 1.0))
    assert each_reward("gsm8k", "<answer>\u00b2</answer>", answer="2")["integer_answer_reward"] == 0.0


def test_gsm8k_eval_parsing_boxed_first_then_answer_tags():
    assert score("gsm8k", "<answer>\n42\n</answer>", answer=42.0) == (1, 1)
    assert score("gsm8k", "<answer>so it is 40 + 2 = 42</answer>", answer=42.0) == (1, 1)      # last number
    # d1: the first number
    assert score("gsm8k", "\\boxed{...} then \\boxed{$1,200} <answer>5</answer>", answer=1.0) == (1, 1)
    assert score("gsm8k", "\\boxed{7}<answer>42</answer>", answer=42.0) == (0, 1)              # boxed wins
    assert score("gsm8k", "\\boxed{\n7}<answer>42</answer>", answer=42.0) == (1, 1)       # box spans a line
    assert score("gsm8k", "\\boxed{-3.0}", answer="-3") == (1, 1)


# --- MATH500 ----------------------------------------------------------------------------------------

def test_math_equivalence_normalisation():
    assert is_equiv("\\frac12", "\\frac{1}{2}")
    assert is_equiv("0.5", "\\frac{1}{2}")
    assert is_equiv("\\dfrac{3}{4}", "3/4")
    assert is_equiv("x = 5", "5")
    assert is_equiv("90^\\circ", "90")
    assert is_equiv("\\sqrt3", "\\sqrt{3}")
    assert is_equiv("\\left( 3, 4 \\right)", "(3,4)")
    assert not is_equiv("\\frac{1}{3}", "\\frac{1}{2}")
    assert is_equiv("a/b", "a/b") and not is_equiv("a/b", "\\frac{a}{b}")      # d1 falls back to raw
    assert is_equiv(None, None) and not is_equiv(None, "1")


def test_math500_rewards_and_score():
    text = ("<reasoning>\nThe side is $8\\sqrt{3} \\cdot 2$.\n</reasoning>\n"
            "<answer>\n\\boxed{16\\sqrt{3}}\n</answer>")
    r = each_reward("math500", text, answer="16 \\sqrt{3}")
    assert r == {"math_correctness_reward": 1.0, "boxed_in_answer_reward": 1.0}
    assert total_reward("math500", text, answer="16 \\sqrt{3}") == pytest.approx(3.0)     # d1's 2.0 + 1.0
    assert score("math500", text, answer="16 \\sqrt{3}") == (1, 1)
    assert score("math500", text, answer="2") == (0, 1)
    # a full solution as the answer column: its last \boxed{} is the reference (d1's training data)
    assert each_reward("math500", text, answer="So $\\boxed{16\\sqrt3}$.")["math_correctness_reward"] == 1.0
    assert score("math500", "\\frac{1}{2}", answer="0.5") == (1, 1)            # no box: the whole text
    assert score("math500", "<answer>\n\\frac{1}{2}\n</answer>", answer="0.5") == (0, 1)
    # an unclosed box: the tags
    assert score("math500", "\\boxed{ <answer>\n\\frac{1}{2}\n</answer>", answer="0.5") == (1, 1)


def d1_boxed_in_answer(prompts, completions, answer, step=None, boxed="\\boxed", **kwargs):
    """d1's math500_utils.boxed_in_answer, transcribed (the slow reference). `boxed` is what it looks
    for: d1 wrote "\\boxed" without a raw string, a backspace and "oxed"; the default is the fix."""
    responses = [completion[0]["content"] for completion in completions]
    out = []
    for r in responses:
        reward = 0.0
        try:
            r = r.split("<answer>")[1].split("</answer>")[0]
            reward += 1.0
        except IndexError:
            reward += 0.0
        reward += 1.0 if boxed in r else 0.5
        out.append(reward)
    return out


def d1_boxed_and_answer_tags_format_reward(prompts, completions, answer, step=None, boxed="\\boxed",
                                           **kwargs):
    """d1's reward_func.boxed_and_answer_tags_format_reward, transcribed."""
    boxed_in_answer_rewards = d1_boxed_in_answer(prompts, completions, answer, step=step, boxed=boxed)
    return [b * 0.5 for b in boxed_in_answer_rewards]


D1_BOXED_AS_WRITTEN = "\boxed"      # d1's string: "\b" is a backspace


def d1_format_reward(text, boxed="\\boxed"):
    """d1's MATH format reward of one completion, called as d1's trainer calls it (chat messages)."""
    prompts = [[{"role": "user", "content": "What is the sum of the roots of x^2 - 5x + 6?"}]]
    return d1_boxed_and_answer_tags_format_reward(prompts, [[{"role": "assistant", "content": text}]], ["5"],
                                                  boxed=boxed)[0]


MATH_REASONING = "<reasoning>\nBy Vieta's formulas the roots sum to $-b/a = 5$.\n</reasoning>\n"
MATH_FORMAT_CASES = {    # completion: d1's format reward with the string fixed
    # answer tags with \boxed inside
    MATH_REASONING + "<answer>\n\\boxed{5}\n</answer>": 1.0,
    MATH_REASONING + "<answer>\n\\boxed{5}\n</answer><|eot_id|><|endoftext|><|endoftext|>": 1.0,
    # answer tags without it, or with it outside them
    MATH_REASONING + "<answer>\n5\n</answer>": 0.75,
    "<reasoning>\nSo the sum is $\\boxed{5}$.\n</reasoning>\n<answer>\n5\n</answer>": 0.75,
    "<answer>\n5\n</answer>\nChecking: $\\boxed{5}$": 0.75,
    # no <answer>: the whole completion is searched
    "By Vieta's formulas the roots sum to $\\boxed{5}$.": 0.5,
    "\\boxed{5}\n</answer>": 0.5,
    "By Vieta's formulas the roots sum to 5.": 0.25,
    "": 0.25,
    # several pairs: the text after the first <answer>, up to the next <answer> or </answer>
    "<answer>\n5\n</answer> or rather <answer>\n\\boxed{5}\n</answer>": 0.75,
    "<answer>\n\\boxed{5}\n</answer> or rather <answer>\n5\n</answer>": 1.0,
    "<answer>\n5 <answer>\n\\boxed{5}\n</answer>": 0.75,
    # unclosed: the rest of the text
    MATH_REASONING + "<answer>\n\\boxed{\\frac{10}{2}}": 1.0,
    MATH_REASONING + "<answer>\nthe roots are 2 and 3": 0.75,
}


@pytest.mark.parametrize("text", list(MATH_FORMAT_CASES))
def test_boxed_in_answer_is_d1s_format_reward_with_the_string_fixed(text):
    assert rewards.boxed_in_answer_reward([text]) == [d1_format_reward(text)] == [MATH_FORMAT_CASES[text]]
    # the weighted value in GRPO's reward is d1's boxed_and_answer_tags_format_reward
    weighted = [w * fn([text], answer=["5"])[0] for fn, w in reward_functions("math500")
                if fn is rewards.boxed_in_answer_reward]
    assert weighted == [d1_format_reward(text)]


def test_d1s_backspace_boxed_paid_for_answer_tags_only():
    # Regression: d1's `"\boxed" in r` looks for a backspace, which model text never has.
    assert D1_BOXED_AS_WRITTEN == "\x08oxed"
    for text, fixed in MATH_FORMAT_CASES.items():
        as_written = d1_format_reward(text, boxed=D1_BOXED_AS_WRITTEN)
        assert as_written == (0.75 if "<answer>" in text else 0.25), text
        assert (rewards.boxed_in_answer_reward([text])[0] == as_written) == (fixed in (0.75, 0.25)), text


def test_last_boxed_only_string_cases():
    assert rewards.last_boxed_only_string("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\boxed{\\frac{1}{2}}"
    assert rewards.last_boxed_only_string("\\boxed{never closed") is None
    assert rewards.last_boxed_only_string("no box") == "no box"
    assert rewards.last_boxed_only_string("$\\boxed 5$ and more") == "\\boxed 5"
    assert rewards.boxed_answer("\\fbox{7}") == "\\fbox{7}"


# --- Countdown --------------------------------------------------------------------------------------

def test_safe_evaluator():
    assert evaluate_expression("30 - (100 - 93)") == 23
    assert evaluate_expression("100 / 3 * 3") == 100                       # exact, not 99.999...
    assert evaluate_expression("-(2 - 5) * +4") == 12
    assert evaluate_expression("(1 +\n 2)") == 3                           # newline inside ( ) is Python
    assert evaluate_expression("1 +\n 2") is None
    assert evaluate_expression("7 / 2") == Fraction(7, 2)
    assert evaluate_expression("2.5 * 2") == 5
    for bad in ("9**9**9**9", "7 // 2", "1 / 0", "1 / (3 - 3)", "05 + 1", "2 (3)", "", "()", "1 +",
                "import os", "__import__('os')", "1e5", "(" * 100 + "1" + ")" * 100, "-" * 100 + "1"):
        assert evaluate_expression(bad) is None, bad


def test_countdown_reward_d1_values():
    numbers, target = [30, 100, 93], 23
    good = "<reasoning>\n100 - 93 = 7, 30 - 7 = 23\n</reasoning>\n<answer>\n30 - (100 - 93)\n</answer>"
    assert total_reward("countdown", good, numbers=numbers, target=target) == 1.0
    assert total_reward("countdown", good.replace("30 - (", "30 + ("), numbers=numbers, target=target) == 0.1
    assert total_reward("countdown", "<answer>100 - 93</answer>", numbers=numbers, target=target) == 0.1
    assert total_reward("countdown", "<answer>30**100/93</answer>", numbers=numbers, target=target) == 0.1
    assert total_reward("countdown", "30 - (100 - 93)", numbers=numbers, target=target) == 0.0
    assert total_reward("countdown", "<answer>9**9**9</answer>", numbers=[9, 9, 9], target=24) == 0.1


def test_countdown_eval_parsing():
    numbers, target = [30, 100, 93], 23
    assert score("countdown", "<answer>\n\\boxed{30 - (100 - 93)}\n</answer>", numbers=numbers,
                 target=target) == (1, 1)
    assert score("countdown", "\\boxed{30 - (100 - 93) = 23}", numbers=numbers, target=target) == (1, 1)
    # no box: the whole text
    assert score("countdown", "<answer>30 - (100 - 93)</answer>", numbers=numbers, target=target) == (0, 1)
    assert score("countdown", "\\boxed{93 \\div 93 + 22} no", numbers=numbers, target=target) == (0, 1)
    assert score("countdown", "\\boxed{(100 \\times 93) / 30}", numbers=numbers, target=310) == (1, 1)
    # the example LLaDA got wrong in d1's release: 55 - 53 leaves 49 unused
    assert score("countdown", "<answer>\n\\boxed{55 - 53}\n</answer>", numbers=[49, 55, 53],
                 target=51) == (0, 1)


# --- Sudoku and tiny_sudoku -------------------------------------------------------------------------

PUZZLE, SOLUTION = "4320004330100004", "4321124334122134"     # 8 blanks (from d1's release)


def test_sudoku_reward_fraction_of_empty_cells():
    text = "<reasoning>\nRow 1 needs a 1.\n</reasoning>\n<answer>\n4321124334122134\n</answer>"
    assert total_reward("sudoku", text, puzzle=PUZZLE, solution=SOLUTION) == 1.0
    copied = "<answer>\n4320004330100004\n</answer>"                       # the puzzle copied back
    assert total_reward("sudoku", copied, puzzle=PUZZLE, solution=SOLUTION) == 0.0
    spaced = "<answer>\n4321 1243\n3412 2134\n</answer>"                    # spaces and rows are fine
    assert total_reward("sudoku", spaced, puzzle=PUZZLE, solution=SOLUTION) == 1.0
    two_wrong = "<answer>4321124334122144</answer>"                        # cell 14 is blank and wrong
    assert total_reward("sudoku", two_wrong, puzzle=PUZZLE, solution=SOLUTION) == pytest.approx(7 / 8)
    assert total_reward("sudoku", "4321124334122134", puzzle=PUZZLE, solution=SOLUTION) == 0.0


def test_sudoku_eval_parsing_counts_cells():
    assert score("sudoku", "<answer>\n4321124334122134\n</answer><|eot_id|>", puzzle=PUZZLE,
                 solution=SOLUTION) == (8, 8)
    assert score("sudoku", "<answer>\n```\n4321\n1243\n3412\n2134\n```\n</answer>", puzzle=PUZZLE,
                 solution=SOLUTION) == (8, 8)
    assert score("sudoku", "</answer>\n4321124334122134<|eot_id|>", puzzle=PUZZLE,
                 solution=SOLUTION) == (8, 8)
    assert score("sudoku", "the grid 4321124334122134 solves it", puzzle=PUZZLE,
                 solution=SOLUTION) == (8, 8)
    assert score("sudoku", "<answer>\n4320004330100004\n</answer>", puzzle=PUZZLE,
                 solution=SOLUTION) == (0, 8)
    assert score("sudoku", "<answer>4321</answer>", puzzle=PUZZLE, solution=SOLUTION) == (1, 8)  # 0-padded
    assert score("sudoku", "no grid here", puzzle=PUZZLE, solution=SOLUTION) == (0, 8)


def test_tiny_sudoku_rewards():
    rows = "4321\n1243\n3412\n2134"
    assert each_reward("tiny_sudoku", rows, puzzle=PUZZLE, solution=SOLUTION) == {
        "tiny_sudoku_cells_reward": 1.0, "tiny_sudoku_solved_reward": 1.0}
    one_wrong = "4321\n1243\n3412\n2144"
    assert each_reward("tiny_sudoku", one_wrong, puzzle=PUZZLE, solution=SOLUTION) == {
        "tiny_sudoku_cells_reward": 7 / 8, "tiny_sudoku_solved_reward": 0.0}
    assert total_reward("tiny_sudoku", "4321\n12", puzzle=PUZZLE, solution=SOLUTION) == pytest.approx(3 / 8)
    assert score("tiny_sudoku", rows, puzzle=PUZZLE, solution=SOLUTION) == (1, 1)
    assert score("tiny_sudoku", one_wrong, puzzle=PUZZLE, solution=SOLUTION) == (0, 1)


def test_sudoku_valid_accepts_any_solution_keeping_givens():
    puzzle = "1200340000000000"                       # many solutions
    assert rewards.sudoku_valid("1234\n3412\n2143\n4321", puzzle)
    assert rewards.sudoku_valid("<answer>\n1234341221434321\n</answer>", puzzle)
    assert rewards.sudoku_valid("1234\n3412\n4321\n2143", puzzle)       # a different valid grid
    assert not rewards.sudoku_valid("2134\n3412\n1243\n4321", puzzle)   # changes a given cell
    assert not rewards.sudoku_valid("1234\n3412\n2143\n4312", puzzle)   # columns repeat
    assert not rewards.sudoku_valid("1234\n3412", puzzle)


# --- the interface ----------------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["gsm8k", "math500", "countdown", "sudoku", "tiny_sudoku"])
def test_reward_interface_contract(task):
    columns = {"gsm8k": {"answer": "18"}, "math500": {"answer": "2"},
               "countdown": {"numbers": [1, 2, 3], "target": 6}}.get(task, {"puzzle": PUZZLE,
                                                                           "solution": SOLUTION})
    completions = [GSM8K_PERFECT, "", "<answer>1+2+3</answer>", "4321\n1243\n3412\n2134"]
    for fn, weight in reward_functions(task):
        assert isinstance(weight, float) and weight > 0
        values = fn(completions, question=["ignored"] * 4, **{k: [v] * 4 for k, v in columns.items()})
        assert len(values) == 4 and all(isinstance(v, float) for v in values)
    with pytest.raises(ValueError):
        reward_functions("s1k")
    with pytest.raises(ValueError):
        score("s1k", "text")
