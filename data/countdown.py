"""Countdown with 3 numbers: reach a target with + - * /, using each given number exactly once.

- `countdown`: d1's task. d1 trains on the 3-number problems of Jiayi-Pan/Countdown-Tasks-3to4 and tests
  on its own `countdown_cd3_test.jsonl` (256 problems, numbers and targets in 1..100). We generate
  training problems here instead: draw 3 numbers in 1..100, list every value the exact solver below can
  reach, and pick an integer target in 1..100 among them, so every problem is provably solvable.
- `tiny_countdown`: the laptop task on d1's free-text path (no canvas: the sampler starts from an
  all-[MASK] completion). Digits 1..9, d1's wording shortened for the character tokenizer, d1's answer
  format, and a coverage split like tiny_sudoku's (see tiny_countdown_examples).
"""

import itertools
import random
from fractions import Fraction

from data.text_tasks import SYSTEM_PROMPT, coverage_split, make_record, read_jsonl, read_test_file
from rewards import evaluate_expression

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


OPERATORS = "+*-/"


def _combine(a, b, operators=OPERATORS):
    """(value, expression) results of one operation (of `operators`) on two (value, expression) items,
    both orders of the operands; + and * only once, since they commute."""
    (x, ex), (y, ey) = a, b
    if "+" in operators:
        yield x + y, f"({ex} + {ey})"
    if "*" in operators:
        yield x * y, f"({ex} * {ey})"
    if "-" in operators:
        yield x - y, f"({ex} - {ey})"
        yield y - x, f"({ey} - {ex})"
    if "/" in operators:
        if y != 0:
            yield _divide(x, y), f"({ex} / {ey})"
        if x != 0:
            yield _divide(y, x), f"({ey} / {ex})"


def reachable_values(numbers, operators=OPERATORS):
    """{value: expression} for every value an expression using each number exactly once (and only the
    given operators) reaches.

    Exact rational arithmetic (ints and Fractions). Any expression tree over the numbers is built by
    repeatedly replacing two items by one of their combinations, which is what the recursion does.
    """
    def search(items):
        if len(items) == 1:
            return {items[0][0]: items[0][1]}
        found = {}
        for i, j in itertools.combinations(range(len(items)), 2):
            rest = [items[k] for k in range(len(items)) if k not in (i, j)]
            for item in _combine(items[i], items[j], operators):
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


# ---------------------------------------------------------------------------------------------------
# tiny_countdown: the laptop task on the free-text path, with a coverage split like tiny_sudoku's

TINY_NUMBER_RANGE = (1, 9)         # single digits: a few characters each for the character tokenizer
TINY_TARGET_RANGE = (1, 20)
# + and - only: with all four operators the tiny preset reached 3% held-out after 300 SFT steps, with
# these 43.5% (measured 2026-12, seed 0)
TINY_OPERATORS = "+-"
TINY_NUM_TEST_TRIPLES = 33         # of the 165 multisets of 3 digits, a fifth held out
TINY_NUM_SFT_TRIPLES = 24          # SFT demonstrations from these training triples only
TINY_COUNTDOWN_DEFAULT_LIMITS = {"sft": 20000, "rl": 20000, "test": 500}
# d1's answer format (its training prompt asks for the expression "inside <answer></answer> tags")
TINY_COUNTDOWN_FORMAT = "Answer: <answer>expression</answer>"


def split_triples(num_test=TINY_NUM_TEST_TRIPLES, seed=0):
    """(train_triples, test_triples): the sorted multisets of 3 numbers in TINY_NUMBER_RANGE, shuffled
    by `seed` and cut in two. Disjoint and deterministic, in shuffled order, so that "the first k training
    triples" is a random sample rather than near neighbours."""
    lo, hi = TINY_NUMBER_RANGE
    triples = list(itertools.combinations_with_replacement(range(lo, hi + 1), NUM_NUMBERS))
    if not 0 < num_test < len(triples):
        raise ValueError(f"num_test must be in 1..{len(triples) - 1}, got {num_test}")
    random.Random(seed).shuffle(triples)
    return triples[num_test:], triples[:num_test]


_TINY_REACHABLE = {}  # (ordered numbers) -> {integer target in range: expression}: 729 entries at most


def tiny_targets(numbers):
    """{target: expression without spaces} of every integer target in TINY_TARGET_RANGE that the numbers,
    in this order, reach with TINY_OPERATORS. One fixed expression per target, the easiest to imitate: the
    first flat one ("a-b+c") over the orders of the numbers, the given order first, else the solver's (with
    parentheses)."""
    key = tuple(numbers)
    if key not in _TINY_REACHABLE:
        lo, hi = TINY_TARGET_RANGE
        found = {}
        for a, b, c in itertools.permutations(key):
            for op1, op2 in itertools.product(TINY_OPERATORS, repeat=2):
                expression = f"{a}{op1}{b}{op2}{c}"
                value = evaluate_expression(expression)
                if value is not None and value.denominator == 1 and lo <= value <= hi:
                    found.setdefault(int(value), expression)
        for value, expression in reachable_values(key, TINY_OPERATORS).items():
            if value.denominator == 1 and lo <= value <= hi:
                found.setdefault(int(value), expression.replace(" ", ""))
        _TINY_REACHABLE[key] = found
    return _TINY_REACHABLE[key]


def make_tiny_countdown_problems(triples, n, seed):
    """n (numbers, target, expression) triples, deterministic in `seed`: a triple of `triples` in a random
    order, then a target drawn uniformly among those it reaches. Draws are independent (problems repeat)."""
    rng = random.Random(seed)
    triples = [t for t in triples if tiny_targets(t)]
    if not triples:
        raise ValueError("no triple reaches a target in range")
    problems = []
    while len(problems) < n:
        numbers = list(triples[rng.randrange(len(triples))])
        rng.shuffle(numbers)
        targets = tiny_targets(numbers)
        target = sorted(targets)[rng.randrange(len(targets))]
        problems.append((numbers, target, targets[target]))
    return problems


def tiny_countdown_examples(split, *, limit, seed, num_sft_triples=TINY_NUM_SFT_TRIPLES):
    """Records of tiny_countdown. Splits: `sft` (problems over the first `num_sft_triples` training
    triples), `rl` (all training triples), `test` (the held-out triples, never seen by either stage).
    Each split draws from its own seed derived from `seed`.

    The prompt is d1's question ("Numbers: [a, b, c]\\nTarget: t") and a one-line answer format; the
    completion is d1's answer format, `<answer>EXPR</answer>`, which d1's Countdown reward scores 1.0.
    """
    triples = coverage_split("tiny_countdown", split, *split_triples(), num_sft_triples, "triples")
    n = TINY_COUNTDOWN_DEFAULT_LIMITS[split] if limit is None else limit
    records = []
    for numbers, target, expression in make_tiny_countdown_problems(triples, n,
                                                                    seed=f"tiny_countdown/{split}/{seed}"):
        question = f"Numbers: {numbers}\nTarget: {target}"     # d1's eval wording
        records.append(make_record(
            user_content=f"{question}\n{TINY_COUNTDOWN_FORMAT}", style="train",
            sft_text=f"<answer>{expression}</answer>", question=question,
            ground_truth=[list(numbers), target], numbers=list(numbers), target=target))
    return records
