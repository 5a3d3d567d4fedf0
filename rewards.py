"""Rewards and answer checking for every task: pure functions, no torch.

Two users, one set of checkers:

- diffu-GRPO calls `reward_functions(task)`: a list of (fn, weight); each
  `fn(completions, **columns) -> list[float]`, completions a list of strings and every column a list
  aligned with them (the columns d1 names: gsm8k/math500 `answer`, countdown `numbers` and
  `target`, sudoku `puzzle` and `solution`). The caller sums weight * fn. Each fn returns a score
  in [0, 1] (or d1's own 0.1 partial credit) and the weight carries d1's scale, so the weighted sum
  is d1's reward. These read answers the way d1's GRPO rewards do (diffu-grpo/reward_func.py): from
  the `<answer>` tags its training prompts ask for.
- evaluation calls `score(task, completion, **columns) -> (correct, total)`, which reads answers the
  way d1's evaluation parser does (eval/parse_and_get_acc.py): the \\boxed{} answer its evaluation
  prompts ask for first, then the answer tags. On d1's released LLaDA generations it reproduces
  d1's published accuracies exactly (see evaluate.py --rescore).

Both paths end in the same checkers (`is_equiv`, `check_countdown`, `sudoku_cells_correct`). GSM8K
differs as it does in d1: the training reward wants the answer-tag text to equal the answer string,
evaluation compares the parsed number.

A completion is untrusted text. Nothing here calls eval/exec: Countdown expressions go through a
small parser with exact Fractions and hard bounds. Every parser is written to run in time linear in
the text (no regex that can backtrack over the whole text once per candidate position), and text
beyond MAX_COMPLETION_CHARS is ignored, so a reward costs well under 10 ms on any input
(`python rewards.py --bench` measures it).

Where d1's code does not do what it says, we do what it says and say so at the spot:
- d1's first format regexes lacked re.DOTALL, so multi-line reasoning never matched;
- the `\\boxed` test of d1's boxed_in_answer is written `"\\boxed"` without a raw string, so it
  looks for a backspace character and never fires;
- d1's Countdown check evaluates model text with eval() (`9**9**9**9` hangs training);
- GSM8K's integer reward uses str.isdigit, which accepts superscripts and other scripts' digits.
"""

import argparse
import gc
import itertools
import math
import random
import re
import sys
import time
from fractions import Fraction

MAX_COMPLETION_CHARS = 65_536    # far above any generation (512 tokens of LLaDA are ~2-3k chars)
MAX_BOXED_CHARS = 8_192          # a \boxed{...} not closed within this many chars counts as unclosed

ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
EOT_MARKERS = ("<|eot_id|>", "<|endoftext|>")   # LLaDA's end tokens, left in decoded generations


def _text(completion):
    """The completion as a bounded string (None becomes "")."""
    if not isinstance(completion, str):
        completion = "" if completion is None else str(completion)
    return completion[:MAX_COMPLETION_CHARS]


# ---------------------------------------------------------------------------------------------------
# Answer tags, found with str.find so that a run of unclosed tags costs one pass, not one per tag


def last_answer_tag_text(text):
    """text.split("<answer>")[-1].split("</answer>")[0].strip(), d1's extract_xml_answer: the text
    after the last <answer> (the whole text when there is none) up to a </answer>."""
    return text.rpartition(ANSWER_OPEN)[2].partition(ANSWER_CLOSE)[0].strip()


def answer_tag_contents(text):
    """The contents of every <answer>...</answer> pair, left to right, non-overlapping: what
    re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL) returns."""
    contents, pos = [], 0
    while True:
        start = text.find(ANSWER_OPEN, pos)
        if start < 0:
            return contents
        end = text.find(ANSWER_CLOSE, start + len(ANSWER_OPEN))
        if end < 0:       # no later <answer> can be closed either
            return contents
        contents.append(text[start + len(ANSWER_OPEN):end])
        pos = end + len(ANSWER_CLOSE)


def first_answer_tag(text):
    """The first <answer>...</answer> content (re.search of the same pattern), or None."""
    start = text.find(ANSWER_OPEN)
    if start < 0:
        return None
    end = text.find(ANSWER_CLOSE, start + len(ANSWER_OPEN))
    return None if end < 0 else text[start + len(ANSWER_OPEN):end]


def last_answer_tag(text):
    """The last <answer>...</answer> content (d1's findall(...)[-1]), or None."""
    contents = answer_tag_contents(text)
    return contents[-1] if contents else None


# ---------------------------------------------------------------------------------------------------
# \boxed{} (the MATH normalisation of Hendrycks et al., as d1's eval/parser_helper.py uses it)

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
        if brace.group() == "{":
            depth += 1
        else:
            depth -= 1
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
    """\\frac12 -> \\frac{1}{2}, \\frac1b -> \\frac{1}{b}; None where d1's version raises."""
    parts = string.split("\\frac")
    out = [parts[0]]
    for part in parts[1:]:
        out.append("\\frac")
        if not part:
            return None                      # d1: IndexError on substr[0]
        if part[0] == "{":
            out.append(part)
        elif len(part) < 2:
            return string                    # d1 gives up and returns its input
        elif part[1] != "{":
            out.append("{" + part[0] + "}{" + part[1] + "}" + part[2:])
        else:
            out.append("{" + part[0] + "}" + part[1:])
    return "".join(out)


def _fix_sqrt(string):
    """\\sqrt3 -> \\sqrt{3}; None where d1's version raises (a \\sqrt at the very end)."""
    if "\\sqrt" not in string:
        return string
    parts = string.split("\\sqrt")
    out = [parts[0]]
    for part in parts[1:]:
        if not part:
            return None
        out.append("\\sqrt" + part if part[0] == "{" else "\\sqrt{" + part[0] + "}" + part[1:])
    return "".join(out)


def _fix_a_slash_b(string):
    """3/4 -> \\frac{3}{4} for plain integers; None where d1's int() raises."""
    if string.count("/") != 1:
        return string
    a, _, b = string.partition("/")
    try:
        a, b = int(a), int(b)                # int() is safe: it parses, it does not evaluate
    except ValueError:
        return None
    return "\\frac{" + str(a) + "}{" + str(b) + "}" if string == f"{a}/{b}" else string


def strip_string(string):
    """The MATH answer normalisation (d1's strip_string), or None where d1's raises (its is_equiv
    then falls back to comparing the raw strings)."""
    for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"),
                     ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", "")):
        string = string.replace(old, new)
    if "\\text{ " in string:                 # units on the right
        if string.count("\\text{ ") != 1:
            return None                      # d1: assert len(splits) == 2
        string = string.partition("\\text{ ")[0]
    string = string.replace("\\%", "")
    string = string.replace(" .", " 0.").replace("{.", "{0.")
    if not string:
        return string
    if string[0] == ".":
        string = "0" + string
    if string.count("=") == 1 and len(string.partition("=")[0]) <= 2:   # "x = 5" -> "5"
        string = string.partition("=")[2]
    string = _fix_sqrt(string)
    if string is None:
        return None
    string = _fix_fracs(string.replace(" ", ""))
    if string is None:
        return None
    if string == "0.5":
        string = "\\frac{1}{2}"
    return _fix_a_slash_b(string)


def is_equiv(answer, reference):
    """MATH answer equivalence: equal after strip_string, or equal raw when that fails (d1)."""
    if answer is None or reference is None:
        return answer is None and reference is None
    answer, reference = str(answer), str(reference)
    a, b = strip_string(answer), strip_string(reference)
    if a is None or b is None:
        return answer == reference
    return a == b


def math_reference(answer):
    """The reference answer as d1's MATH reward reads its `answer` column: the last \\boxed{} of a
    full solution, or the answer itself when it is already bare (the usual MATH-500 case)."""
    answer = str(answer)
    inside = boxed_answer(answer)
    return answer if inside is None else inside


# ---------------------------------------------------------------------------------------------------
# GSM8K

_NUMBER = re.compile(r"-?\d+\.?\d*")


def _boxed_contents_gsm8k(text):
    """Each `\\boxed{...}` content up to the first "}" on the same line, left to right: what
    re.findall(r"\\\\boxed{(.*?)}", text) yields, found in one pass (the next "}" and the next
    newline are cached, so unclosed boxes cost nothing extra)."""
    pos, next_close, next_newline = 0, -1, -1
    while True:
        start = text.find("\\boxed{", pos)
        if start < 0:
            return
        inner = start + len("\\boxed{")
        if next_close < inner:
            next_close = text.find("}", inner)
            if next_close < 0:
                return
        if next_newline < inner:
            next_newline = text.find("\n", inner)
            if next_newline < 0:
                next_newline = len(text)
        if next_close < next_newline:
            yield text[inner:next_close]
            pos = next_close + 1
        else:
            pos = start + 1


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
    for content in _boxed_contents_gsm8k(completion):
        content = content.strip()
        if content and content.strip(".") != "":        # skip "", "..." and other runs of dots
            number = _float_or_number(content, 0)
            if number is not None:
                return number
    tagged = first_answer_tag(completion)
    if tagged is not None and tagged.strip():
        return _float_or_number(tagged.strip(), -1)
    return None


def _gsm8k_answer_text(answer):
    """d1's GSM8K `answer` column is the text after '####'; a float ground truth is written as one."""
    if isinstance(answer, float) and answer.is_integer():
        return str(int(answer))
    return str(answer).strip()


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
    """d1's xml count as a fraction of its maximum 0.5 (weight 0.5 restores d1's value).
    Negative when much text follows </answer>."""
    return [2.0 * _count_xml(_text(c)) for c in completions]


_STRICT_HEAD, _STRICT_MIDDLE, _STRICT_TAIL = "<reasoning>\n", "\n</reasoning>\n<answer>\n", "\n</answer>\n"


def _strict_format(text):
    """re.match(r"^<reasoning>\\n.*?\\n</reasoning>\\n<answer>\\n.*?\\n</answer>\\n$", text, re.DOTALL).

    The pattern's intent is the whole completion in d1's format, reasoning and answer each on their
    own lines, possibly several: `.` must cross newlines (DOTALL, which d1's first version lacked,
    so multi-line reasoning never matched). `$` also matches before one final newline. Decided
    with str methods, in one pass, instead of a lazy regex that backtracks on hostile text.
    """
    if not text.startswith(_STRICT_HEAD):
        return False
    if text.endswith(_STRICT_TAIL):
        core = text[len(_STRICT_HEAD):len(text) - len(_STRICT_TAIL)]
        if _STRICT_MIDDLE in core:
            return True
    if text.endswith(_STRICT_TAIL + "\n"):
        core = text[len(_STRICT_HEAD):len(text) - len(_STRICT_TAIL) - 1]
        return _STRICT_MIDDLE in core
    return False


_SOFT_JOIN = re.compile(r"</reasoning>\s*<answer>")


def _soft_format(text):
    """re.match(r"<reasoning>.*?</reasoning>\\s*<answer>.*?</answer>", text, re.DOTALL): starts with
    <reasoning>, then </reasoning>, whitespace, <answer>, and later a </answer> (DOTALL as above)."""
    if not text.startswith("<reasoning>"):
        return False
    join = _SOFT_JOIN.search(text, len("<reasoning>"))
    return join is not None and text.find(ANSWER_CLOSE, join.end()) >= 0


def strict_format_reward(completions, **columns):
    """1.0 when the whole completion is exactly d1's format (weight 0.5)."""
    return [1.0 if _strict_format(_text(c)) else 0.0 for c in completions]


def soft_format_reward(completions, **columns):
    """1.0 when the completion starts with reasoning tags followed by answer tags (weight 0.5)."""
    return [1.0 if _soft_format(_text(c)) else 0.0 for c in completions]


def integer_answer_reward(completions, **columns):
    """1.0 when the answer-tag text is a non-negative integer in ASCII digits (weight 0.5).
    (d1 uses str.isdigit, which also accepts e.g. superscript two; that is not an integer answer.)"""
    out = []
    for c in completions:
        answer = last_answer_tag_text(_text(c))
        out.append(1.0 if answer.isascii() and answer.isdigit() else 0.0)
    return out


def gsm8k_correctness_reward(completions, answer, **columns):
    """1.0 when the answer-tag text equals the reference answer string exactly (weight 2.0)."""
    return [1.0 if last_answer_tag_text(_text(c)) == _gsm8k_answer_text(a) else 0.0
            for c, a in zip(completions, answer)]


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
    """1.0 when a \\boxed answer sits inside the first answer tags (weight 0.5).

    d1's boxed_in_answer means this: +1 for answer tags, +1 for a boxed answer inside them (else
    +0.5), then halves it. But its test `"\\boxed" in r` is not a raw string: it looks for a
    backspace character, so every completion got 0.75 with answer tags and 0.25 without, whatever
    it boxed. We reward what the name says: a boxed answer inside the answer tags.
    """
    out = []
    for c in completions:
        text = _text(c)
        # d1's r.split("<answer>")[1].split("</answer>")[0]: after the first <answer>, up to the
        # next <answer> or </answer>.
        start = text.find(ANSWER_OPEN)
        if start < 0:
            out.append(0.0)
            continue
        inside = text[start + len(ANSWER_OPEN):].partition(ANSWER_OPEN)[0].partition(ANSWER_CLOSE)[0]
        out.append(1.0 if "\\boxed" in inside else 0.0)
    return out


# ---------------------------------------------------------------------------------------------------
# Countdown: a safe expression evaluator

MAX_EXPRESSION_CHARS = 1024   # the longest expression we parse (d1's are ~10-30 characters)
MAX_TOKENS = 256
MAX_NESTING = 64              # parentheses plus unary signs
MAX_VALUE_BITS = 4096         # |numerator| and denominator of every intermediate value
COUNTDOWN_TOLERANCE = Fraction(1, 10**5)   # d1: abs(result - target) < 1e-5
COUNTDOWN_CORRECT, COUNTDOWN_FORMAT = 1.0, 0.1   # d1's score and format_score

_TOKEN = re.compile(r"(\d+\.\d*|\.\d+|\d+)|(\*\*|//|[-+*/()])", re.ASCII)
_INLINE_SPACE = " \t\f"       # Python's tokenizer skips these anywhere; newlines only inside ( )


class _Reject(Exception):
    """The expression is not a valid + - * / expression of integers (or breaks a bound)."""


def _tokenize(expression):
    """Tokens of an expression, following Python's rules for what d1's eval() accepted, except that
    ** and // are refused: the task allows + - * / only."""
    tokens, pos, depth = [], 0, 0
    while pos < len(expression):
        char = expression[pos]
        if char in _INLINE_SPACE:
            pos += 1
            continue
        if char in "\r\n":
            if depth == 0:                   # a newline outside parentheses ends a Python expression
                raise _Reject
            pos += 1
            continue
        match = _TOKEN.match(expression, pos)
        if match is None:
            raise _Reject
        number, op = match.group(1), match.group(2)
        if number is not None:
            if "." not in number and len(number) > 1 and number[0] == "0" and number.strip("0"):
                raise _Reject                # Python refuses "05" (but accepts "00" and "05.5")
            tokens.append(Fraction(number))
        else:
            if op in ("**", "//"):
                raise _Reject
            depth += op == "("
            depth -= op == ")"
            if not 0 <= depth <= MAX_NESTING:
                raise _Reject
            tokens.append(op)
        if len(tokens) > MAX_TOKENS:
            raise _Reject
        pos = match.end()
    return tokens


def _bounded(value):
    if abs(value.numerator).bit_length() > MAX_VALUE_BITS or value.denominator.bit_length() > MAX_VALUE_BITS:
        raise _Reject
    return value


def evaluate_expression(expression):
    """The exact value of an arithmetic expression of numbers, + - * / and parentheses (unary + and
    - allowed, as in Python), or None when it is not one, divides by zero, or breaks a bound."""
    expression = expression.strip()
    if not expression or len(expression) > MAX_EXPRESSION_CHARS:
        return None
    try:
        tokens = _tokenize(expression)
    except _Reject:
        return None
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take():
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    # expr := term (("+" | "-") term)* ; term := factor (("*" | "/") factor)* ;
    # factor := ("+" | "-") factor | number | "(" expr ")"
    def expr(nesting):
        value = term(nesting)
        while peek() in ("+", "-"):
            value = _bounded(value + term(nesting) if take() == "+" else value - term(nesting))
        return value

    def term(nesting):
        value = factor(nesting)
        while peek() in ("*", "/"):
            if take() == "*":
                value = _bounded(value * factor(nesting))
            else:
                divisor = factor(nesting)
                if divisor == 0:
                    raise _Reject
                value = _bounded(value / divisor)
        return value

    def factor(nesting):
        if nesting > MAX_NESTING:
            raise _Reject
        token = peek()
        if token is None:
            raise _Reject
        take()
        if token in ("+", "-"):
            value = factor(nesting + 1)
            return value if token == "+" else -value
        if token == "(":
            value = expr(nesting + 1)
            if peek() != ")":
                raise _Reject
            take()
            return value
        if isinstance(token, Fraction):
            return token
        raise _Reject

    try:
        value = expr(0)
    except _Reject:
        return None
    return value if pos == len(tokens) else None


_DIGIT_RUN = re.compile(r"\d+")


def uses_numbers_once(expression, numbers):
    """d1's validate_equation: the multiset of digit runs in the text equals the given numbers.
    (Its \\d also matches other scripts' digits, and int() reads them; kept. A run too long for
    int() fails, as d1's try/except makes it.)"""
    found = []
    for run in _DIGIT_RUN.finditer(expression):
        if len(found) == len(numbers):
            return False                     # more numbers than given: stop before reading them all
        try:
            found.append(int(run.group()))
        except ValueError:
            return False
    try:
        return sorted(found) == sorted(int(n) for n in numbers)
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
        tagged = last_answer_tag(_text(c))
        if tagged is None:
            out.append(0.0)
        else:
            out.append(COUNTDOWN_CORRECT if check_countdown(tagged.strip(), nums, t) else COUNTDOWN_FORMAT)
    return out


_LATEX_OPERATORS = (("\\div", "/"), ("\\times", "*"), ("\\cdot", "*"))
_LEFT_CHARS = "0123456789+-*/() "
_RESULT_CHARS = "0123456789. "


def _left_of_equals(text):
    """The group of re.search(r"([0-9+\\-*/() ]+)=[0-9. ]+", text), or None, in linear time.

    The class excludes "=", so a match is a maximal run of class characters directly followed by
    "=" and one of [0-9. ]: the first "=" with a class character before it and a result character
    after it ends the leftmost match, whose run is found by stripping the class from the left part."""
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
        tagged = first_answer_tag(completion)
        inside = tagged.strip() if tagged is not None else completion
    for latex, python in _LATEX_OPERATORS:
        inside = inside.replace(latex, python)
    left = _left_of_equals(inside)
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
        tagged = last_answer_tag(_text(c))
        # d1 keeps every str.isdigit character, then pads or cuts to 16: the first 16 suffice.
        grid = "" if tagged is None else "".join(itertools.islice(filter(str.isdigit, tagged), SUDOKU_CELLS))
        correct, empty = sudoku_cells_correct(grid, p, s)
        out.append(correct / empty if grid and empty else 0.0)
    return out


_DIGITS_OR_SPACES = re.compile(r"[\d\s]*")
_SPACES_RUN = re.compile(r"\s*")
_SPACES = re.compile(r"\s")
_SIXTEEN_OR_MORE_DIGITS = re.compile(r"\d{16,}")
_WORD_CHAR = re.compile(r"\w")


def _sixteen_digits_before_close(text):
    """re.search(r"(\\d{16})\\s*</answer>", text).group(1), or None. Only the last 16 digits of a
    run can be followed by spaces, so only run ends are tried (re tries every position)."""
    for run in _SIXTEEN_OR_MORE_DIGITS.finditer(text):
        if text.startswith(ANSWER_CLOSE, _SPACES_RUN.match(text, run.end()).end()):
            return text[run.end() - 16:run.end()]
    return None


def _sixteen_digits_alone(text):
    """re.search(r"\\b(\\d{16})\\b", text).group(1), or None: a run of exactly 16 digits with no
    word character on either side."""
    for run in _SIXTEEN_OR_MORE_DIGITS.finditer(text):
        if (run.end() - run.start() == 16 and not (run.start() and _WORD_CHAR.match(text, run.start() - 1))
                and not _WORD_CHAR.match(text, run.end())):
            return run.group()
    return None


def _sudoku_code_block(text):
    """re.search(r"<answer>.*?```\\s*([\\d\\s]+)```", text, re.DOTALL).group(1), linear time.

    Only the first <answer> matters (a later one sees a subset of the same fences). The match is the
    first fence after it followed by a nonempty run of digits and spaces and a closing fence; the
    group is that run without its leading spaces (\\s* is greedy), or its last character when the
    run is all spaces. (Python's re takes time quadratic in such a run; this takes one pass.)"""
    start = text.find(ANSWER_OPEN)
    if start < 0:
        return None
    fence = text.find("```", start + len(ANSWER_OPEN))
    while fence >= 0:
        run_start = fence + 3
        run_end = _DIGITS_OR_SPACES.match(text, run_start).end()
        if run_end > run_start and text.startswith("```", run_end):
            group_start = _SPACES_RUN.match(text, run_start, run_end).end()
            return text[min(group_start, run_end - 1):run_end]
        fence = text.find("```", fence + 1)
    return None


def _first_marker(text, start, markers):
    """The index of the earliest of `markers` at or after `start`, or -1."""
    found = [i for i in (text.find(m, start) for m in markers) if i >= 0]
    return min(found) if found else -1


def _answer_until_end(text):
    """re.search(r"<answer>(.*?)(?:<\\|eot_id\\|>|<\\|endoftext\\|>|</answer>)", text, re.DOTALL).group(1)."""
    start = text.find(ANSWER_OPEN)
    if start < 0:
        return None
    end = _first_marker(text, start + len(ANSWER_OPEN), EOT_MARKERS + (ANSWER_CLOSE,))
    return None if end < 0 else text[start + len(ANSWER_OPEN):end]


def _after_answer(text):
    """re.search(r"</answer>\\s*(.*?)(?:<\\|eot_id\\|>|<\\|endoftext\\|>|$)", text, re.DOTALL).group(1):
    after the first </answer> and its spaces, up to an end marker or the end ($ also stops before a
    final newline)."""
    start = text.find(ANSWER_CLOSE)
    if start < 0:
        return None
    inner = _SPACES_RUN.match(text, start + len(ANSWER_CLOSE)).end()
    end = _first_marker(text, inner, EOT_MARKERS)
    if end < 0:
        end = len(text) - 1 if text.endswith("\n") and inner <= len(text) - 1 else len(text)
    return text[inner:end]


# d1's five patterns (eval/parse_and_get_acc.py), in its order.
_SUDOKU_PATTERNS = (_sudoku_code_block, _answer_until_end, _after_answer,
                    _sixteen_digits_before_close, _sixteen_digits_alone)


def sudoku_grid_d1(text):
    """d1's Sudoku evaluation parse: the first of five patterns whose group is not blank wins (a code
    block in the answer, the answer tags, the text after </answer>, 16 digits before </answer>, 16
    digits alone); whitespace is then removed. "" when none matches."""
    for pattern in _SUDOKU_PATTERNS:
        group = pattern(text)
        if group and group.strip():
            return _SPACES.sub("", group.strip())
    return ""


_ASCII_DIGIT = re.compile(r"[0-9]")


def first_digits(text, count=SUDOKU_CELLS):
    """The first `count` ASCII digits of the text, everything else (newlines...) skipped."""
    digits = []
    for match in _ASCII_DIGIT.finditer(text):
        digits.append(match.group())
        if len(digits) == count:
            break
    return "".join(digits)


def tiny_sudoku_cells_reward(completions, puzzle, solution, **columns):
    """tiny_sudoku: the fraction of the puzzle's blank cells that the completion's first 16 digits
    fill correctly (weight 1.0)."""
    out = []
    for c, p, s in zip(completions, puzzle, solution):
        correct, empty = sudoku_cells_correct(first_digits(_text(c)), p, s)
        out.append(correct / empty if empty else 0.0)
    return out


def tiny_sudoku_solved_reward(completions, solution, **columns):
    """tiny_sudoku: 1.0 when the completion's first 16 digits are the whole solution (weight 1.0)."""
    return [1.0 if first_digits(_text(c)) == s else 0.0 for c, s in zip(completions, solution)]


_SUDOKU_UNITS = ([[r * 4 + c for c in range(4)] for r in range(4)]                      # rows
                 + [[r * 4 + c for r in range(4)] for c in range(4)]                    # columns
                 + [[(br + r) * 4 + bc + c for r in range(2) for c in range(2)]         # 2x2 boxes
                    for br in (0, 2) for bc in (0, 2)])


def _is_solution_grid(grid):
    """16 digits 1-4 with every row, column and box holding each digit once."""
    if len(grid) != SUDOKU_CELLS or any(c not in "1234" for c in grid):
        return False
    return all(len({grid[i] for i in unit}) == 4 for unit in _SUDOKU_UNITS)


def sudoku_valid(completion, puzzle):
    """True when the completion's grid is a complete valid 4x4 Sudoku that keeps the puzzle's given
    cells. The grid is read with d1's parse when the completion has <answer> tags (d1's format),
    else as the first 16 digits (tiny_sudoku's rows). A puzzle with several solutions accepts any."""
    text = _text(completion)
    grid = sudoku_grid_d1(text)[:SUDOKU_CELLS] if ANSWER_OPEN in text else first_digits(text)
    return (_is_solution_grid(grid) and len(puzzle) == SUDOKU_CELLS
            and all(p == SUDOKU_EMPTY or p == g for p, g in zip(puzzle, grid)))


# ---------------------------------------------------------------------------------------------------
# The tables: rewards for GRPO, score for evaluation

def reward_functions(task):
    """[(fn, weight), ...] of a task. For d1's tasks, the reward functions d1's diffu_grpo_train.py
    lists per data set, each split into a score and d1's scale as weight, so the weighted sum is
    d1's reward; tiny_sudoku's are this repository's (cells right + solved bonus)."""
    table = {
        "gsm8k": [(xml_count_reward, 0.5), (soft_format_reward, 0.5), (strict_format_reward, 0.5),
                  (integer_answer_reward, 0.5), (gsm8k_correctness_reward, 2.0)],
        "math500": [(math_correctness_reward, 2.0), (boxed_in_answer_reward, 0.5)],
        "countdown": [(countdown_reward, 1.0)],
        "sudoku": [(sudoku_reward, 1.0)],
        "tiny_sudoku": [(tiny_sudoku_cells_reward, 1.0), (tiny_sudoku_solved_reward, 1.0)],
    }
    if task not in table:
        raise ValueError(f"no reward for task {task!r} (tasks with rewards: {sorted(table)})")
    return table[task]


def score(task, completion, **columns):
    """(correct, total) of one completion, parsed as d1's evaluation parses it.

    gsm8k, math500, countdown: (1 or 0, 1). sudoku: (correct cells, empty cells), d1's cell
    accuracy. tiny_sudoku: (1 if solved else 0, 1). Never raises on any completion text.
    """
    text = _text(completion)
    if task == "gsm8k":
        number = gsm8k_number(text)
        reference = columns["answer"]
        try:
            reference = float(str(reference).replace(",", "")) if reference is not None else None
        except ValueError:
            reference = None
        return int(number is not None and reference is not None and number == reference), 1
    if task == "math500":
        inside = boxed_answer(text)
        if not inside:
            tagged = first_answer_tag(text)
            inside = tagged.strip() if tagged is not None else inside
        return int(inside is not None and is_equiv(inside, math_reference(columns["answer"]))), 1
    if task == "countdown":
        return int(check_countdown(countdown_expression(text), columns["numbers"], columns["target"])), 1
    if task == "sudoku":
        return sudoku_cells_correct(sudoku_grid_d1(text), columns["puzzle"], columns["solution"])
    if task == "tiny_sudoku":
        return int(first_digits(text) == columns["solution"]), 1
    raise ValueError(f"no score for task {task!r}")


# ---------------------------------------------------------------------------------------------------
# python rewards.py --bench: hostile text, timed

BENCH_COLUMNS = {
    "gsm8k": {"answer": "18"},
    "math500": {"answer": "\\frac{1}{2}"},
    "countdown": {"numbers": [9, 9, 9], "target": 24},
    "sudoku": {"puzzle": "4320004330100004", "solution": "4321124334122134"},
    "tiny_sudoku": {"puzzle": "4320004330100004", "solution": "4321124334122134"},
}


def hostile_texts(rng, size):
    """One hostile completion of roughly `size` characters, of a random kind."""
    kind = rng.randrange(14)
    if kind == 0:
        return "<reasoning>\nx\n</reasoning>\n<answer>\n9**9**9**9\n</answer>\n"
    if kind == 1:
        return "<answer>" + "(" * size + "9*9*9" + ")" * rng.randrange(size + 1) + "</answer>"
    if kind == 2:
        return "\\boxed{" * (size // 7) + rng.choice(["", "}", "{}"])
    if kind == 3:
        chunk = "".join(rng.choice("\u0660\u0661\u0662\uff11\uff12\u00b2 <>/answer{}") for _ in range(64))
        return chunk * (size // 64 + 1)
    if kind == 4:
        return "<answer>\x00" + "1\x00" * (size // 2) + "</answer>"
    if kind == 5:
        return "\\boxed{" + "9" * size + "}" + "<answer>" + "1" * size + "</answer>"
    if kind == 6:
        return "<answer>" * (size // 8) + " " * rng.randrange(size + 1)
    if kind == 7:
        return "<reasoning>\n" + "\n</reasoning>\n<answer>\n" * (size // 24) + "\n</answer>"
    if kind == 8:
        return "{" * (size // 2) + "\\boxed{" + "{" * (size // 2)
    if kind == 9:
        return "</reasoning>" + " " * size + "<answer" + "```" * (size // 3)
    if kind == 10:
        return "\\frac" * (size // 5) + "\\sqrt" * (size // 5) + "1/" + "2" * size
    if kind == 11:
        return "1 " * (size // 2) + "= 3" + "</answer>" + "1234" * (size // 4)
    if kind == 12:
        return "\\text{ " * (size // 7) + "<|eot_id|>" + "\\boxed " * (size // 7)
    return ""


def bench(num_completions=100_000, seed=0):
    """Time every reward function and `score` of every task on hostile completions.

    Returns the slowest single call as (seconds, task, function, length), that call re-timed (best
    of 5, to tell a slow input from a scheduler or collector hiccup), the 99.9th percentile of all
    call times, and the total time. The garbage collector is paused while timing.
    """
    rng = random.Random(seed)
    big = [hostile_texts(rng, 1_000_000) for _ in range(16)] + ["9" * 100_000, "(" * 100_000]
    texts = []
    for i in range(num_completions):
        if i % 5000 == 0:
            texts.append(big[(i // 5000) % len(big)])
        else:
            texts.append(hostile_texts(rng, rng.choice([10, 100, 1000, 5000])))

    def call(task, fn, batched, text):
        if batched:
            fn([text], **{k: [v] for k, v in BENCH_COLUMNS[task].items()})
        else:
            fn(task, text, **BENCH_COLUMNS[task])

    times, slowest = [], (0.0, "", "", 0)
    worst_call = None
    gc.collect()
    gc.disable()
    total_start = time.perf_counter()
    try:
        for task in BENCH_COLUMNS:
            calls = [(fn.__name__, fn, True) for fn, _ in reward_functions(task)] + [("score", score, False)]
            for name, fn, batched in calls:
                for text in texts:
                    start = time.perf_counter()
                    call(task, fn, batched, text)
                    elapsed = time.perf_counter() - start
                    times.append(elapsed)
                    if elapsed > slowest[0]:
                        slowest, worst_call = (elapsed, task, name, len(text)), (task, fn, batched, text)
        total = time.perf_counter() - total_start
        retimed = []
        for _ in range(5):
            start = time.perf_counter()
            call(*worst_call)
            retimed.append(time.perf_counter() - start)
    finally:
        gc.enable()
    times.sort()
    return slowest, min(retimed), times[int(0.999 * (len(times) - 1))], total


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", action="store_true", help="time every reward on hostile text")
    parser.add_argument("--num-completions", type=int, default=100_000, help="hostile completions to time")
    args = parser.parse_args()
    if not args.bench:
        parser.error("nothing to do: pass --bench")
    (seconds, task, name, length), retimed, p999, total = bench(args.num_completions)
    print(f"slowest single call: {seconds * 1e3:.2f} ms ({task} {name}, {length} chars; re-timed "
          f"{retimed * 1e3:.2f} ms); 99.9th percentile {p999 * 1e3:.3f} ms; total {total:.1f} s for "
          f"{args.num_completions} completions x every reward and score of {len(BENCH_COLUMNS)} tasks")
    sys.exit(0 if math.isfinite(seconds) else 1)
