"""Countdown with 3 numbers: reach a target with + - * /, using each given number exactly once.

d1 trains on the 3-number problems of Jiayi-Pan/Countdown-Tasks-3to4 and tests on its own
`countdown_cd3_test.jsonl` (256 problems, numbers and targets in 1..100). We generate training
problems here instead: draw 3 numbers in 1..100, list every value the exact solver below can reach,
and pick an integer target in 1..100 among them, so every problem is provably solvable.
"""

import itertools
import random
from fractions import Fraction

from data.text_tasks import SYSTEM_PROMPT, make_record, read_jsonl, read_test_file

NUM_NUMBERS = 3
NUMBER_RANGE = (1, 100)            # d1's test set: numbers and targets both in 1..100
TARGET_RANGE = (1, 100)
COUNTDOWN_TEST_FILE = "countdown_cd3_test.jsonl"   # d1's: lines like {"input": "30,100,93", "output": "23"}
DEFAULT_GENERATED_EXAMPLES = 20000

# ---------------------------------------------------------------------------------------------------
# Exact solver


def _divide(x, y):
    """x / y exactly: an int when it divides evenly (ints are much faster than Fractions)."""
    if isinstance(x, int) and isinstance(y, int) and x % y == 0:
        return x // y
    return Fraction(x) / y


def _combine(a, b):
    """(value, expression) results of one operation on two (value, expression) items, both orders
    of the operands; + and * only once, since they commute."""
    (x, ex), (y, ey) = a, b
    yield x + y, f"({ex} + {ey})"
    yield x * y, f"({ex} * {ey})"
    yield x - y, f"({ex} - {ey})"
    yield y - x, f"({ey} - {ex})"
    if y != 0:
        yield _divide(x, y), f"({ex} / {ey})"
    if x != 0:
        yield _divide(y, x), f"({ey} / {ex})"


def reachable_values(numbers):
    """{value: expression} for every value an expression using each number exactly once reaches.

    Exact rational arithmetic (ints and Fractions). Any expression tree over the numbers is built by
    repeatedly replacing two items by one of their combinations, which is what the recursion does.
    """
    def search(items):
        if len(items) == 1:
            return {items[0][0]: items[0][1]}
        found = {}
        for i, j in itertools.combinations(range(len(items)), 2):
            rest = [items[k] for k in range(len(items)) if k not in (i, j)]
            for item in _combine(items[i], items[j]):
                for value, expr in search(rest + [item]).items():
                    found.setdefault(value, expr)
        return found

    values = search([(int(n), str(n)) for n in numbers])
    # A combined expression is wrapped whole in one pair of parentheses (see _combine), and a leaf
    # is a bare number, so a leading "(" always pairs with the final ")": drop that outer pair.
    return {v: (e[1:-1] if e.startswith("(") and e.endswith(")") else e) for v, e in values.items()}


def solve_countdown(numbers, target):
    """An expression using each number once that equals `target` exactly, or None if none exists."""
    return reachable_values(numbers).get(Fraction(target))


def make_countdown_problems(n, seed):
    """n (numbers, target, expression) triples, deterministic in `seed`; each target is reachable
    (the expression proves it) and is an integer in TARGET_RANGE."""
    rng = random.Random(seed)
    problems = []
    while len(problems) < n:
        numbers = [rng.randint(*NUMBER_RANGE) for _ in range(NUM_NUMBERS)]
        reachable = reachable_values(numbers)
        targets = sorted(int(v) for v in reachable
                         if v.denominator == 1 and TARGET_RANGE[0] <= v <= TARGET_RANGE[1])
        if not targets:
            continue
        target = targets[rng.randrange(len(targets))]
        problems.append((numbers, target, reachable[Fraction(target)]))
    return problems


# ---------------------------------------------------------------------------------------------------
# d1's test file


def load_countdown_jsonl(path):
    """(numbers, target) pairs from d1's countdown_cd3_test.jsonl, checked line by line."""
    pairs = []
    for line_number, record in read_jsonl(path):
        try:
            numbers = [int(x) for x in str(record["input"]).split(",")]
            target = int(record["output"])
        except (KeyError, ValueError):
            raise ValueError(f"{path}:{line_number}: expected {{\"input\": \"a,b,c\", \"output\": \"t\"}} "
                             f"with integers, got {record!r}") from None
        pairs.append((numbers, target))
    return pairs


# ---------------------------------------------------------------------------------------------------
# Prompts (d1's, verbatim)

# d1's evaluation prompt (eval/countdown.py). The missing space before "Respond" is d1's.
CTD_SYSTEM_PROMPT = (
    "Using only the provided numbers, create an arithmetic expression that evaluates to exactly the "
    "provided target number. You may use the operations +, -, *, and / as needed, but each number must "
    "be used exactly once. Think step-by-step. After reasoning, provide only your final expression "
    "inside \\boxed{} tags without including an equals sign or the target number. For example: "
    "\\boxed{a + b * c}Respond in the following format:\n<reasoning>\nYour reasoning here\n</reasoning>\n"
    "<answer>\n\\boxed{...}\n</answer>"
)


def countdown_train_prompt(numbers, target):
    """d1's training prompt (diffu-grpo/data_utils.py); the numbers are written as a Python list."""
    return (
        f"{SYSTEM_PROMPT}\nUsing only the numbers {list(numbers)}, create an arithmetic expression that "
        f"evaluates to exactly {target}. You must use all numbers from the list, and each number must be "
        "used exactly once. You may use the operations +, -, *, and / as needed. After reasoning, provide "
        "only your final expression inside <answer></answer> tags without including an equals sign or "
        "the target number. For example, if the numbers are [2, 3, 4] and the target is 5, a valid "
        "answer is: <answer>\n2*4-3\n</answer>"
    )


def countdown_examples(split, *, data_dir, style, limit, seed):
    """Records of d1's Countdown task: `train` generated here, `test` read from d1's jsonl."""
    if split == "train":
        n = DEFAULT_GENERATED_EXAMPLES if limit is None else limit
        problems = make_countdown_problems(n, seed=f"countdown/train/{seed}")
    elif split == "test":
        pairs = read_test_file("countdown", f"{data_dir}/{COUNTDOWN_TEST_FILE}", load_countdown_jsonl, limit)
        problems = [(numbers, target, solve_countdown(numbers, target)) for numbers, target in pairs]
    else:
        raise ValueError(f"countdown has splits 'train' and 'test', got {split!r}")
    records = []
    for numbers, target, expression in problems:
        question = f"Numbers: {list(numbers)}\nTarget: {target}"     # d1's eval wording
        if style == "eval":
            user_content = CTD_SYSTEM_PROMPT + "\n\n" + question
            answer = f"\\boxed{{{expression}}}"
        else:
            user_content = countdown_train_prompt(numbers, target)
            answer = expression
        # The SFT target is the solver's expression (None when the test problem has no solution).
        target_text = None if expression is None else (
            f"<reasoning>\n{expression} = {target}\n</reasoning>\n<answer>\n{answer}\n</answer>\n")
        records.append(make_record(user_content=user_content, style=style, sft_text=target_text,
                                   question=question, ground_truth=[list(numbers), target],
                                   numbers=list(numbers), target=target))
    return records
