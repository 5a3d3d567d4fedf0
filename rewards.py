"""Rewards and answer checking for every task: pure functions, no torch.

GRPO calls `reward_functions(task)`: [(fn, weight), ...], where `fn(completions, **columns)` scores
each completion in [0, 1] (or d1's 0.1 partial credit), every column a list aligned with the
completions (d1's names: `answer`; `numbers`, `target`; `puzzle`, `solution`); the weights carry
d1's scales, so the weighted sum is d1's reward (diffu-grpo/reward_func.py). Evaluation calls
`score(task, completion, **columns) -> (correct, total)`, which parses as d1's evaluation does
(eval/parse_and_get_acc.py: \\boxed{} first, then the answer tags) and reproduces d1's accuracies on
its released generations (evaluate.py --rescore). Both end in the same checkers (`is_equiv`,
`check_countdown`, `sudoku_cells_correct`).

A completion is untrusted text: nothing here calls eval/exec, text past MAX_COMPLETION_CHARS is
ignored, and every parse is linear in the text. d1's regular expressions are used as written; where
Python's re is quadratic on hostile text, one is applied only where it can match, or a parser
replaces it (bench/hostile.py pairs each with d1's call: tests fuzz the two equal, and
`python -m bench.rewards` times both).

Where d1's code does not do what it says, we do what it says: see the README's table of differences from d1.
"""

import itertools
import re
from fractions import Fraction

MAX_COMPLETION_CHARS = 65_536    # far above any generation (512 tokens of LLaDA are ~2-3k chars)
MAX_BOXED_CHARS = 8_192          # a \boxed{...} not closed within this many chars counts as unclosed
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"


def _text(completion):
    """The completion as a bounded string (None becomes "")."""
    return ("" if completion is None else str(completion))[:MAX_COMPLETION_CHARS]


def _group(match):
    return None if match is None else match.group(1)


# ---------------------------------------------------------------------------------------------------
# Answer tags

ANSWER_TAGS = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)    # d1's


def answer_tags(text):
    """ANSWER_TAGS.findall(text), read up to the last </answer>: past it every <answer> fails, each
    after scanning the rest of the text (quadratic in a run of <answer>)."""
    end = text.rfind(ANSWER_CLOSE)
    return ANSWER_TAGS.findall(text, 0, end + len(ANSWER_CLOSE)) if end >= 0 else []


def last_answer_tag_text(text):
    """d1's extract_xml_answer: text.split("<answer>")[-1].split("</answer>")[0].strip()."""
    return text.rpartition(ANSWER_OPEN)[2].partition(ANSWER_CLOSE)[0].strip()


# ---------------------------------------------------------------------------------------------------
# \boxed{} and MATH answer equivalence (Hendrycks et al., as d1's eval/parser_helper.py has them).
# Where d1's code raises on an answer, these raise ValueError, and is_equiv compares the raw strings.

_BRACE = re.compile(r"[{}]")


def last_boxed_only_string(text):
    """The last `\\boxed{...}` (or `\\fbox{...}`) of the text with its braces; the whole text when
    it has neither; None when the last one is never closed. d1's quirks kept: a "\\boxed " (with a
    space) anywhere wins, and runs to the next "$"."""
    if "\\boxed " in text:
        return "\\boxed " + text.rpartition("\\boxed ")[2].partition("$")[0]
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return text
    depth = 0
    for brace in _BRACE.finditer(text, start, start + MAX_BOXED_CHARS):
        depth += 1 if brace.group() == "{" else -1
        if depth == 0:
            return text[start:brace.end()]
    return None


def remove_boxed(boxed):
    """The inside of `\\boxed{...}`; a string that is not of that form comes back unchanged; None
    where d1's version fails an assertion ("\\boxed " not at the start)."""
    if "\\boxed " in boxed:
        return boxed[len("\\boxed "):] if boxed.startswith("\\boxed ") else None
    if boxed.startswith("\\boxed{") and boxed.endswith("}"):
        return boxed[len("\\boxed{"):-1]
    return boxed


def boxed_answer(text):
    """remove_boxed(last_boxed_only_string(text)), or None where d1's pair raises."""
    boxed = last_boxed_only_string(text)
    return None if boxed is None else remove_boxed(boxed)


def _fix_fracs(string):
    """\\frac12 -> \\frac{1}{2}, \\frac1b -> \\frac{1}{b}."""
    parts = string.split("\\frac")
    out = [parts[0]]
    for part in parts[1:]:
        if not part:
            raise ValueError("\\frac at the end")
        if part[0] != "{" and len(part) < 2:
            return string                    # d1 gives up and returns its input
        if part[0] == "{":
            out.append(part)
        else:
            out.append("{" + part[0] + "}" + (part[1:] if part[1] == "{" else "{" + part[1] + "}" + part[2:]))
    return "\\frac".join(out)


def _fix_sqrt(string):
    """\\sqrt3 -> \\sqrt{3}."""
    parts = string.split("\\sqrt")
    for i, part in enumerate(parts[1:], 1):
        if not part:
            raise ValueError("\\sqrt at the end")
        parts[i] = part if part[0] == "{" else "{" + part[0] + "}" + part[1:]
    return "\\sqrt".join(parts)


def _fix_a_slash_b(string):
    """3/4 -> \\frac{3}{4} for plain integers (int() parses; it raises on "a/b", as in d1)."""
    if string.count("/") != 1:
        return string
    a, b = (int(x) for x in string.split("/"))
    return "\\frac{" + str(a) + "}{" + str(b) + "}" if string == f"{a}/{b}" else string


def strip_string(string):
    """d1's MATH answer normalisation."""
    for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"),
                     ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", "")):
        string = string.replace(old, new)
    if string.count("\\text{ ") > 1:
        raise ValueError("several units")    # d1: assert len(splits) == 2
    string = string.partition("\\text{ ")[0].replace("\\%", "")       # units on the right go
    string = string.replace(" .", " 0.").replace("{.", "{0.")
    if not string:
        return string
    if string[0] == ".":
        string = "0" + string
    if string.count("=") == 1 and len(string.partition("=")[0]) <= 2:   # "x = 5" -> "5"
        string = string.partition("=")[2]
    string = _fix_fracs(_fix_sqrt(string).replace(" ", ""))
    return _fix_a_slash_b("\\frac{1}{2}" if string == "0.5" else string)


def is_equiv(answer, reference):
    """MATH answer equivalence: equal after strip_string, or equal raw where that raises (d1)."""
    if answer is None or reference is None:
        return answer is None and reference is None
    answer, reference = str(answer), str(reference)
    try:
        return strip_string(answer) == strip_string(reference)
    except ValueError:
        return answer == reference


def math_reference(answer):
    """The reference as d1's MATH reward reads its `answer` column: the last \\boxed{} of a full
    solution, or the answer itself when it is already bare (the usual MATH-500 case)."""
    answer = str(answer)
    inside = boxed_answer(answer)
    return answer if inside is None else inside


# ---------------------------------------------------------------------------------------------------
# GSM8K

GSM8K_BOXED = re.compile(r"\\boxed{(.*?)}")    # d1's; `.` stops at a newline
_NUMBER, _DOTS = re.compile(r"-?\d+\.?\d*"), re.compile(r"^\.+$")


def gsm8k_boxes(text):
    """GSM8K_BOXED.findall(text), line by line up to each line's last "}": a \\boxed{ with no "}"
    after it on its line fails after scanning the line (quadratic in a run of \\boxed{)."""
    for line in text.split("\n"):
        yield from GSM8K_BOXED.findall(line, 0, line.rfind("}") + 1)


def _float_or_number(text, which):
    """float(text), else the first (which=0) or last (which=-1) number in it, else None."""
    try:
        return float(text)     # float() parses; it never evaluates
    except ValueError:
        numbers = _NUMBER.findall(text)
        return float(numbers[which]) if numbers else None


def gsm8k_number(completion):
    """d1's GSM8K evaluation answer: the first usable \\boxed{} (its first number when it is not a
    plain number), else the first answer tags (their last number)."""
    for content in gsm8k_boxes(completion):
        content = content.strip()
        if content and not _DOTS.match(content):
            number = _float_or_number(content, 0)
            if number is not None:
                return number
    tags = answer_tags(completion)
    return _float_or_number(tags[0].strip(), -1) if tags and tags[0].strip() else None


def _count_xml(text):
    """d1's count_xml: 0.125 per well-placed tag, minus 0.001 per character after </answer>."""
    count = 0.0
    if text.count("<reasoning>\n") == 1:
        count += 0.125
    if text.count("\n</reasoning>\n") == 1:
        count += 0.125
    if text.count("\n<answer>\n") == 1:
        count += 0.125
        count -= len(text.rpartition("\n</answer>\n")[2]) * 0.001
    if text.count("\n</answer>") == 1:
        count += 0.125
        count -= (len(text.rpartition("\n</answer>")[2]) - 1) * 0.001
    return count


def xml_count_reward(completions, **columns):
    """d1's xml count over its maximum 0.5 (weight 0.5); negative when much text follows </answer>."""
    return [2.0 * _count_xml(_text(c)) for c in completions]


# d1's format patterns, with re.DOTALL so that multi-line reasoning matches
STRICT_FORMAT = re.compile(r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$", re.DOTALL)
SOFT_FORMAT = re.compile(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", re.DOTALL)


def strict_format_reward(completions, **columns):
    """1.0 when the whole completion is exactly d1's format (weight 0.5). STRICT_FORMAT is tried
    only on text that ends as it must ($ also matches before a final newline): on other text its
    second .*? scans to the end once per "</reasoning>...<answer>" (quadratic)."""
    texts = [_text(c) for c in completions]
    return [1.0 if t.endswith(("\n</answer>\n", "\n</answer>\n\n")) and STRICT_FORMAT.match(t) else 0.0
            for t in texts]


def soft_format_reward(completions, **columns):
    """1.0 when the completion starts with reasoning tags followed by answer tags (weight 0.5).
    SOFT_FORMAT reads up to the last </answer> only, as answer_tags does and for the same reason."""
    texts = [_text(c) for c in completions]
    return [1.0 if SOFT_FORMAT.match(t, 0, t.rfind(ANSWER_CLOSE) + len(ANSWER_CLOSE)) else 0.0 for t in texts]


def integer_answer_reward(completions, **columns):
    """1.0 when the answer-tag text is a non-negative integer in ASCII digits (weight 0.5); d1's
    str.isdigit also accepts e.g. superscript two, which is not an integer answer."""
    answers = [last_answer_tag_text(_text(c)) for c in completions]
    return [1.0 if a.isascii() and a.isdigit() else 0.0 for a in answers]


def gsm8k_correctness_reward(completions, answer, **columns):
    """1.0 when the answer-tag text equals the reference answer string exactly (weight 2.0): d1's
    `answer` column is the text after '####' (a float ground truth is written as one)."""
    answer = [str(int(a)) if isinstance(a, float) and a.is_integer() else str(a).strip() for a in answer]
    return [1.0 if last_answer_tag_text(_text(c)) == a else 0.0 for c, a in zip(completions, answer)]


# ---------------------------------------------------------------------------------------------------
# MATH500


def math_correctness_reward(completions, answer, **columns):
    """1.0 when the last \\boxed{} answer is equivalent to the reference (weight 2.0). As in d1's
    training reward, a completion without a usable \\boxed{} is compared whole."""
    out = []
    for c, a in zip(completions, answer):
        text = _text(c)
        inside = boxed_answer(text)
        out.append(1.0 if is_equiv(text if inside is None else inside, math_reference(a)) else 0.0)
    return out


def boxed_in_answer_reward(completions, **columns):
    """d1's MATH format reward, boxed_and_answer_tags_format_reward (weight 1.0): half of
    boxed_in_answer's +1 for answer tags plus +1 for a \\boxed inside them (else +0.5), so 1.0 for a
    box in the tags, 0.75 for tags without one, 0.5 for a box without tags, 0.25 for neither.

    d1 tests `"\\boxed" in r` without a raw string (a backspace), which never fires: it paid 0.75 with
    answer tags and 0.25 without. We fix that string only; with no <answer> the whole completion is
    searched, as d1's except branch leaves it.
    """
    out = []
    for c in completions:
        text = _text(c)
        # d1's r.split("<answer>")[1].split("</answer>")[0], which raises when there is no <answer>
        tagged = ANSWER_OPEN in text
        if tagged:
            text = text.partition(ANSWER_OPEN)[2].partition(ANSWER_OPEN)[0].partition(ANSWER_CLOSE)[0]
        out.append(0.5 * ((1.0 if tagged else 0.0) + (1.0 if "\\boxed" in text else 0.5)))
    return out


# ---------------------------------------------------------------------------------------------------
# Countdown: a safe expression evaluator

MAX_EXPRESSION_CHARS = 1024   # the longest expression we parse (d1's are ~10-30 characters)
MAX_TOKENS = 256
MAX_NESTING = 64              # parentheses plus unary signs
MAX_VALUE_BITS = 4096         # |numerator| and denominator of every intermediate value
COUNTDOWN_TOLERANCE = Fraction(1, 10**5)   # d1: abs(result - target) < 1e-5
COUNTDOWN_CORRECT, COUNTDOWN_FORMAT = 1.0, 0.1   # d1's score and format_score

# a number, an operator, inline space (Python skips it), a newline, anything else
_TOKEN = re.compile(r"(\d+\.\d*|\.\d+|\d+)|(\*\*|//|[-+*/()])|([ \t\f])|([\r\n])|(.)", re.ASCII | re.DOTALL)
_APPLY = {"+": Fraction.__add__, "-": Fraction.__sub__, "*": Fraction.__mul__, "/": Fraction.__truediv__}


class _Reject(Exception):
    """The expression is not a valid + - * / expression of numbers, or it breaks a bound."""


def _tokenize(expression):
    """Tokens as Python's tokenizer reads them (what d1's eval() accepted), but ** and // refused."""
    tokens, depth = [], 0
    for number, op, _, newline, other in _TOKEN.findall(expression):
        if other or op in ("**", "//") or (newline and depth == 0):   # Python ends at a newline outside ( )
            raise _Reject
        if number and "." not in number and number[0] == "0" and number.strip("0"):
            raise _Reject                    # Python refuses "05" (but accepts "00" and "05.5")
        depth += (op == "(") - (op == ")")
        if not 0 <= depth <= MAX_NESTING:
            raise _Reject
        if number or op:
            tokens.append(Fraction(number) if number else op)
        if len(tokens) > MAX_TOKENS:
            raise _Reject
    return tokens


def evaluate_expression(expression):
    """The exact value of an arithmetic expression of numbers, + - * / and parentheses (unary + and
    - allowed, as in Python), or None when it is not one, divides by zero, or breaks a bound.

    expr := term (("+" | "-") term)*;  term := factor (("*" | "/") factor)*;
    factor := ("+" | "-") factor | number | "(" expr ")"
    """
    expression = expression.strip()
    if not expression or len(expression) > MAX_EXPRESSION_CHARS:
        return None
    pos = 0

    def take():
        nonlocal pos
        if pos == len(tokens):
            raise _Reject
        pos += 1
        return tokens[pos - 1]

    def binary(operators, operand, nesting):
        value = operand(nesting)
        while pos < len(tokens) and tokens[pos] in operators:
            op, right = take(), operand(nesting)
            if op == "/" and right == 0:
                raise _Reject
            value = _APPLY[op](value, right)
            if (abs(value.numerator).bit_length() > MAX_VALUE_BITS
                    or value.denominator.bit_length() > MAX_VALUE_BITS):
                raise _Reject
        return value

    def expr(nesting):
        return binary(("+", "-"), lambda n: binary(("*", "/"), factor, n), nesting)

    def factor(nesting):
        token = take()
        if nesting > MAX_NESTING or token in (")", "*", "/"):
            raise _Reject
        if token in ("+", "-"):
            value = factor(nesting + 1)
            return value if token == "+" else -value
        if token == "(":
            value = expr(nesting + 1)
            if take() != ")":
                raise _Reject
            return value
        return token

    try:
        tokens = _tokenize(expression)
        value = expr(0)
    except _Reject:
        return None
    return value if pos == len(tokens) else None


_DIGIT_RUN = re.compile(r"\d+")


def uses_numbers_once(expression, numbers):
    """d1's validate_equation: the digit runs of the text (\\d: any script's, as d1) are the given
    numbers, each once; a run int() refuses fails, as d1's try/except makes it."""
    runs = itertools.islice(_DIGIT_RUN.finditer(expression), len(numbers) + 1)   # one too many fails
    try:
        return sorted(int(run.group()) for run in runs) == sorted(int(n) for n in numbers)
    except (TypeError, ValueError):
        return False


def check_countdown(expression, numbers, target):
    """True when the expression uses each number once and equals the target (within d1's 1e-5)."""
    if expression is None or not uses_numbers_once(expression, numbers):
        return False
    value = evaluate_expression(expression)
    try:
        return value is not None and abs(value - Fraction(target)) < COUNTDOWN_TOLERANCE
    except (TypeError, ValueError, OverflowError):
        return False


def countdown_reward(completions, numbers, target, **columns):
    """d1's Countdown reward (weight 1.0): 1.0 for a correct expression in the last answer tags,
    0.1 for an expression there that is wrong, invalid or uses the wrong numbers, 0 for none."""
    out = []
    for c, nums, t in zip(completions, numbers, target):
        tags = answer_tags(_text(c))
        correct = tags and check_countdown(tags[-1].strip(), nums, t)
        out.append(0.0 if not tags else COUNTDOWN_CORRECT if correct else COUNTDOWN_FORMAT)
    return out


COUNTDOWN_EQUATION = re.compile(r"([0-9+\-*/() ]+)=[0-9. ]+")    # d1's: "a + b = t" -> "a + b"
_LEFT_CHARS, _RESULT_CHARS = "0123456789+-*/() ", "0123456789. "


def countdown_equation_left(text):
    """_group(COUNTDOWN_EQUATION.search(text)) by a parser: re retries the greedy run from every
    start and backtracks it each time (quadratic in a long run without "="). A match is a maximal
    run of class characters ("=" is not one) followed by "=" and a result character, so the first
    such "=" ends the leftmost match."""
    equals = text.find("=")
    while equals >= 0:
        if (0 < equals < len(text) - 1 and text[equals - 1] in _LEFT_CHARS
                and text[equals + 1] in _RESULT_CHARS):
            head = text[:equals]
            return head[len(head.rstrip(_LEFT_CHARS)):]
        equals = text.find("=", equals + 1)
    return None


def countdown_expression(completion):
    """d1's Countdown evaluation parse: the last \\boxed{} (else the first answer tags, else the
    whole text), LaTeX operators made Python ones, and "a + b = t" cut to "a + b"."""
    inside = boxed_answer(completion)
    if inside is None:
        tags = answer_tags(completion)
        inside = tags[0].strip() if tags else completion
    inside = inside.replace("\\div", "/").replace("\\times", "*").replace("\\cdot", "*")
    left = countdown_equation_left(inside)
    return left.strip() if left is not None else inside


# ---------------------------------------------------------------------------------------------------
# Sudoku (d1's task) and tiny_sudoku

SUDOKU_CELLS = 16
SUDOKU_EMPTY = "0"


def sudoku_cells_correct(grid, puzzle, solution):
    """(cells of `grid` equal to the solution among the puzzle's empty cells, number of empty
    cells). `grid` is padded with '0' or cut to 16 characters, as d1 does."""
    empty = [i for i in range(min(len(puzzle), SUDOKU_CELLS)) if puzzle[i] == SUDOKU_EMPTY]
    if not grid:
        return 0, len(empty)
    grid = (grid + SUDOKU_EMPTY * SUDOKU_CELLS)[:SUDOKU_CELLS]
    return sum(1 for i in empty if i < len(solution) and grid[i] == solution[i]), len(empty)


def sudoku_reward(completions, puzzle, solution, **columns):
    """d1's Sudoku reward (weight 1.0): the fraction of the puzzle's empty cells that the digits
    of the last answer tags fill correctly."""
    out = []
    for c, p, s in zip(completions, puzzle, solution):
        tags = answer_tags(_text(c))
        # d1 keeps every str.isdigit character, then pads or cuts to 16: the first 16 suffice.
        grid = "".join(itertools.islice(filter(str.isdigit, tags[-1]), SUDOKU_CELLS)) if tags else ""
        correct, empty = sudoku_cells_correct(grid, p, s)
        out.append(correct / empty if grid and empty else 0.0)
    return out


SUDOKU_PATTERNS = tuple(re.compile(p, re.DOTALL) for p in (     # d1's evaluation parse, in its order
    r"<answer>.*?```\s*([\d\s]+)```",                               # a code block in the answer
    r"<answer>(.*?)(?:<\|eot_id\|>|<\|endoftext\|>|</answer>)",     # the answer
    r"</answer>\s*(.*?)(?:<\|eot_id\|>|<\|endoftext\|>|$)",        # the text after it
    r".*?(\d{16})\s*</answer>",                                     # 16 digits before </answer>
    r"\b(\d{16})\b"))                                               # 16 digits alone
_DIGITS_OR_SPACES, _SPACES_RUN, _SPACE = re.compile(r"[\d\s]*"), re.compile(r"\s*"), re.compile(r"\s")


def sudoku_code_block(text):
    """_group(SUDOKU_PATTERNS[0].search(text)) by a parser: re splits a run of spaces between \\s*
    and [\\d\\s]+ every way (quadratic). Only the first <answer> matters (later ones see fewer
    fences); the match is the first fence after it followed by a nonempty run of digits and spaces
    and a fence, the group that run without its leading spaces (or its last one when all are)."""
    start = text.find(ANSWER_OPEN)
    fence = text.find("```", start + len(ANSWER_OPEN)) if start >= 0 else -1
    while fence >= 0:
        run_start = fence + 3
        run_end = _DIGITS_OR_SPACES.match(text, run_start).end()
        if run_end > run_start and text.startswith("```", run_end):
            group_start = _SPACES_RUN.match(text, run_start, run_end).end()
            return text[min(group_start, run_end - 1):run_end]
        fence = text.find("```", fence + 1)
    return None


_SUDOKU_PARSES = (                   # each _group(d1's re.search(pattern, text)), in linear time
    sudoku_code_block,
    # where the search fails at the first <answer> it fails at every later one, after scanning the rest
    lambda t: _group(SUDOKU_PATTERNS[1].match(t, t.find(ANSWER_OPEN))) if ANSWER_OPEN in t else None,
    lambda t: _group(SUDOKU_PATTERNS[2].search(t)),
    # the leading .*? already tries every start, which search would try again from each
    lambda t: _group(SUDOKU_PATTERNS[3].match(t)),
    lambda t: _group(SUDOKU_PATTERNS[4].search(t)))


def sudoku_grid_d1(text):
    """d1's Sudoku evaluation parse: the group of the first pattern that is not blank, without its
    whitespace; "" when there is none."""
    for parse in _SUDOKU_PARSES:
        group = parse(text)
        if group and group.strip():
            return _SPACE.sub("", group.strip())
    return ""


_ASCII_DIGIT = re.compile(r"[0-9]")


def first_digits(text, count=SUDOKU_CELLS):
    """The first `count` ASCII digits of the text, everything else (newlines...) skipped."""
    return "".join(m.group() for m in itertools.islice(_ASCII_DIGIT.finditer(text), count))


def tiny_sudoku_cells_reward(completions, puzzle, solution, **columns):
    """tiny_sudoku: the fraction of the puzzle's blank cells that the completion's first 16 digits
    fill correctly (weight 1.0)."""
    cells = [sudoku_cells_correct(first_digits(_text(c)), p, s)
             for c, p, s in zip(completions, puzzle, solution)]
    return [correct / empty if empty else 0.0 for correct, empty in cells]


def tiny_sudoku_solved_reward(completions, solution, **columns):
    """tiny_sudoku: 1.0 when the completion's first 16 digits are the whole solution (weight 1.0)."""
    return [1.0 if first_digits(_text(c)) == s else 0.0 for c, s in zip(completions, solution)]


_SUDOKU_UNITS = ([[r * 4 + c for c in range(4)] for r in range(4)]                      # rows
                 + [[r * 4 + c for r in range(4)] for c in range(4)]                    # columns
                 + [[(br + r) * 4 + bc + c for r in range(2) for c in range(2)]         # 2x2 boxes
                    for br in (0, 2) for bc in (0, 2)])


def sudoku_valid(completion, puzzle):
    """True when the completion's grid is a complete valid 4x4 Sudoku that keeps the puzzle's given
    cells. The grid is read with d1's parse when the completion has <answer> tags (d1's format),
    else as the first 16 digits (tiny_sudoku's rows). A puzzle with several solutions accepts any."""
    text = _text(completion)
    grid = sudoku_grid_d1(text)[:SUDOKU_CELLS] if ANSWER_OPEN in text else first_digits(text)
    return (len(grid) == SUDOKU_CELLS and all(c in "1234" for c in grid)
            and all(len({grid[i] for i in unit}) == 4 for unit in _SUDOKU_UNITS)
            and len(puzzle) == SUDOKU_CELLS
            and all(p == SUDOKU_EMPTY or p == g for p, g in zip(puzzle, grid)))


# ---------------------------------------------------------------------------------------------------
# The tables: rewards for GRPO, score for evaluation

def reward_functions(task):
    """[(fn, weight), ...] of a task. For d1's tasks, the reward functions d1's diffu_grpo_train.py
    lists per data set, each split into a score and d1's scale as weight, so the weighted sum is
    d1's reward; tiny_sudoku's are this repository's (cells right + solved bonus); tiny_countdown's is
    d1's Countdown reward."""
    table = {
        "gsm8k": [(xml_count_reward, 0.5), (soft_format_reward, 0.5), (strict_format_reward, 0.5),
                  (integer_answer_reward, 0.5), (gsm8k_correctness_reward, 2.0)],
        "math500": [(math_correctness_reward, 2.0), (boxed_in_answer_reward, 1.0)],
        "countdown": [(countdown_reward, 1.0)],
        "tiny_countdown": [(countdown_reward, 1.0)],
        "sudoku": [(sudoku_reward, 1.0)],
        "tiny_sudoku": [(tiny_sudoku_cells_reward, 1.0), (tiny_sudoku_solved_reward, 1.0)],
    }
    if task not in table:
        raise ValueError(f"no reward for task {task!r} (tasks with rewards: {sorted(table)})")
    return table[task]


def score(task, completion, **columns):
    """(correct, total) of one completion, parsed as d1's evaluation parses it: (1 or 0, 1) for
    gsm8k, math500, countdown, tiny_sudoku (solved) and tiny_countdown, d1's (correct cells, empty cells)
    for sudoku. tiny_countdown is read as its GRPO reward reads it (the last answer tags), so training and
    evaluation agree on what is correct. Never raises on any completion text."""
    text = _text(completion)
    if task == "gsm8k":
        number = gsm8k_number(text)
        try:
            reference = (float(str(columns["answer"]).replace(",", "")) if columns["answer"] is not None
                         else None)
        except ValueError:
            reference = None
        return int(number is not None and reference is not None and number == reference), 1
    if task == "math500":
        inside = boxed_answer(text)
        if not inside:
            tags = answer_tags(text)
            inside = tags[0].strip() if tags else inside
        return int(inside is not None and is_equiv(inside, math_reference(columns["answer"]))), 1
    if task == "countdown":
        return int(check_countdown(countdown_expression(text), columns["numbers"], columns["target"])), 1
    if task == "sudoku":
        return sudoku_cells_correct(sudoku_grid_d1(text), columns["puzzle"], columns["solution"])
    if task == "tiny_sudoku":
        return int(first_digits(text) == columns["solution"]), 1
    if task == "tiny_countdown":
        reward = countdown_reward([text], [columns["numbers"]], [columns["target"]])[0]
        return int(reward == COUNTDOWN_CORRECT), 1
    raise ValueError(f"no score for task {task!r}")

