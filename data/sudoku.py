"""4x4 Sudoku: every solution grid, an exact solver, a unique-solution puzzle generator, and the
two tasks built on them.

- `sudoku`: d1's task. Its prompts (d1's diffu-grpo/data_utils.py for training, eval/sudoku.py for
  evaluation) write the puzzle as a 16-character string, '0' for an empty cell. The test split is
  d1's own `4x4_test_sudoku.csv` (500 puzzles, all with 8 blanks; 124 of them have more than one
  solution, so d1's cell accuracy against the stored solution can never reach 100%). d1 trains on
  its `4x4_sudoku_unique_puzzles.csv`; we generate unique-solution puzzles instead.
- `tiny_sudoku`: the laptop task of this repository. A compact prompt (the puzzle as four
  rows of four digits, nothing else) for a ~200k-parameter character-level model, and a coverage
  split: SFT demonstrations come from only the first 16 training grids, GRPO prompts from all 240
  training grids, the test from 48 grids that neither stage sees.

A grid is a 16-character string read left to right, top to bottom. A 4x4 Sudoku has 288 solution
grids, few enough to list: the solver below simply intersects, for each given cell, the set of grids
that agree with it.
"""

import csv
import random

from data.text_tasks import coverage_split, make_record, read_test_file

# ---------------------------------------------------------------------------------------------------
# Grids

SIZE = 4                          # rows, columns and digits
BOX = 2                           # a box is 2x2
NUM_CELLS = SIZE * SIZE           # 16
DIGITS = "1234"
EMPTY = "0"                       # d1 writes an empty cell as '0'
NUM_GRIDS = 288                   # the number of 4x4 Sudoku solution grids (a known count; asserted)


def _units():
    """The 12 units (4 rows, 4 columns, 4 boxes), each as a tuple of cell indices."""
    rows = [tuple(r * SIZE + c for c in range(SIZE)) for r in range(SIZE)]
    cols = [tuple(r * SIZE + c for r in range(SIZE)) for c in range(SIZE)]
    boxes = [tuple((br + r) * SIZE + bc + c for r in range(BOX) for c in range(BOX))
             for br in range(0, SIZE, BOX) for bc in range(0, SIZE, BOX)]
    return rows + cols + boxes


UNITS = _units()
PEERS = [sorted({j for unit in UNITS if i in unit for j in unit} - {i}) for i in range(NUM_CELLS)]


def is_solution_grid(grid):
    """True when `grid` is 16 digits 1-4 with every row, column and box a permutation of 1234."""
    if not isinstance(grid, str) or len(grid) != NUM_CELLS or any(c not in DIGITS for c in grid):
        return False
    return all({grid[i] for i in unit} == set(DIGITS) for unit in UNITS)


def all_grids():
    """All 288 valid 4x4 solution grids, sorted, found by plain backtracking over the cells."""
    grids, cells = [], [EMPTY] * NUM_CELLS

    def fill(i):
        if i == NUM_CELLS:
            grids.append("".join(cells))
            return
        used = {cells[j] for j in PEERS[i]}
        for d in DIGITS:
            if d not in used:
                cells[i] = d
                fill(i + 1)
        cells[i] = EMPTY

    fill(0)
    assert len(grids) == NUM_GRIDS, len(grids)
    return sorted(grids)


_GRIDS = all_grids()
# _AGREE[i][d]: a bitset (a Python int, bit k for grid k) of the grids with digit d at cell i.
_AGREE = [{d: sum(1 << k for k, g in enumerate(_GRIDS) if g[i] == d) for d in DIGITS}
          for i in range(NUM_CELLS)]
_ALL = (1 << NUM_GRIDS) - 1


def split_grids(num_test=48, seed=0):
    """(train_grids, test_grids): a fixed random permutation of the 288 grids cut in two.

    Disjoint, deterministic in `seed`, in shuffled order, so that "the first k training grids" is a
    random sample rather than k near-identical lexicographic neighbours.
    """
    if not 0 < num_test < NUM_GRIDS:
        raise ValueError(f"num_test must be in 1..{NUM_GRIDS - 1}, got {num_test}")
    grids = list(_GRIDS)
    random.Random(seed).shuffle(grids)
    return grids[num_test:], grids[:num_test]


# ---------------------------------------------------------------------------------------------------
# Solver and puzzle generator


def check_puzzle(puzzle):
    if not isinstance(puzzle, str) or len(puzzle) != NUM_CELLS or any(c not in "01234" for c in puzzle):
        raise ValueError(f"a puzzle is 16 characters from 0-4 ('0' = empty), got {puzzle!r}")


def solutions(puzzle):
    """Every solution grid of `puzzle` (a 16-character string, '0' = empty), sorted."""
    check_puzzle(puzzle)
    agree = _ALL
    for i, c in enumerate(puzzle):
        if c != EMPTY:
            agree &= _AGREE[i][c]
    return [g for k, g in enumerate(_GRIDS) if agree >> k & 1]


def count_solutions(puzzle, limit=2):
    """The number of solutions of `puzzle`, capped at `limit` (2 answers "is it unique?")."""
    return min(len(solutions(puzzle)), limit)


def make_puzzles(grids, n, min_blanks, max_blanks, seed):
    """n (puzzle, solution) pairs with a UNIQUE solution, deterministic in `seed`.

    Each draw picks a grid from `grids`, a number of blanks uniform in [min_blanks, max_blanks] and
    which cells to blank; draws whose puzzle has several solutions are thrown away and redrawn.
    Draws are independent, so a puzzle may repeat when few distinct ones exist.
    """
    if not grids:
        raise ValueError("make_puzzles needs at least one grid")
    if not 1 <= min_blanks <= max_blanks <= NUM_CELLS - 4:
        # A 4x4 Sudoku needs at least 4 givens to have a unique solution.
        raise ValueError(f"need 1 <= min_blanks <= max_blanks <= 12, got {min_blanks}, {max_blanks}")
    for g in grids:
        if not is_solution_grid(g):
            raise ValueError(f"not a valid solution grid: {g!r}")
    rng = random.Random(seed)
    pairs = []
    while len(pairs) < n:
        grid = grids[rng.randrange(len(grids))]
        blanks = set(rng.sample(range(NUM_CELLS), rng.randint(min_blanks, max_blanks)))
        puzzle = "".join(EMPTY if i in blanks else c for i, c in enumerate(grid))
        if count_solutions(puzzle) == 1:
            pairs.append((puzzle, grid))
    return pairs


# ---------------------------------------------------------------------------------------------------
# d1's Sudoku task

# d1's prompt, verbatim (diffu-grpo/data_utils.py, eval/sudoku.py); a trailing backslash joins two lines
SUDOKU_SYSTEM_PROMPT = """
Please solve the following 4x4 Sudoku puzzle. The puzzle is provided as a 16-character string \
reading left-to-right, top-to-bottom, where '0' represents empty cells.

Rules:
- Fill empty cells with digits 1-4
- Each row must contain digits 1-4 exactly once
- Each column must contain digits 1-4 exactly once
- Each 2x2 box must contain digits 1-4 exactly once

Important: Your solution must be a COMPLETE 16-character string with only the digits 1-4, \
representing your final solved grid.

Respond in this exact format:
<reasoning>
Your step-by-step solving process
</reasoning>
<answer>
[16-character solution string with no spaces or separators]
</answer>
"""

SUDOKU_TEST_FILE = "4x4_test_sudoku.csv"          # d1's dataset/ file name
SUDOKU_TRAIN_BLANKS = (6, 10)                      # around d1's test puzzles, which all have 8 blanks
# more than the 2188 x 16 = 35,008 prompts of the 8B recipe's Sudoku run, so that no puzzle comes twice
DEFAULT_GENERATED_EXAMPLES = 40000


def rows_text(grid):
    """The 16-character grid as 4 rows of 4 digits joined by newlines."""
    return "\n".join(grid[r * SIZE:(r + 1) * SIZE] for r in range(SIZE))


def load_sudoku_csv(path):
    """(puzzle, solution) pairs from d1's CSV (header `Puzzle,Solution`), checked line by line."""
    pairs = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["Puzzle", "Solution"]:
            raise ValueError(f"{path}:1: expected the header 'Puzzle,Solution', got {header!r}")
        for row in reader:
            line = reader.line_num
            if len(row) != 2:
                raise ValueError(f"{path}:{line}: expected 2 columns (Puzzle,Solution), got {row!r}")
            puzzle, solution = row[0].strip(), row[1].strip()
            try:
                check_puzzle(puzzle)
            except ValueError as err:
                raise ValueError(f"{path}:{line}: {err}") from None
            if not is_solution_grid(solution) or any(p != EMPTY and p != s for p, s in zip(puzzle, solution)):
                raise ValueError(f"{path}:{line}: {solution!r} is not a solution of the puzzle {puzzle!r}")
            pairs.append((puzzle, solution))
    return pairs


def sudoku_examples(split, *, data_dir, style, limit, seed):
    """Records of d1's Sudoku task: `train` generated here, `test` read from d1's CSV."""
    if split == "train":
        lo, hi = SUDOKU_TRAIN_BLANKS
        n = DEFAULT_GENERATED_EXAMPLES if limit is None else limit
        pairs = make_puzzles(_GRIDS, n, lo, hi, seed=f"sudoku/train/{seed}")
    elif split == "test":
        pairs = read_test_file("sudoku", f"{data_dir}/{SUDOKU_TEST_FILE}", load_sudoku_csv, limit)
    else:
        raise ValueError(f"sudoku has splits 'train' and 'test', got {split!r}")
    records = []
    for puzzle, solution in pairs:
        question = f"Solve the following Sudoku puzzle: {puzzle}\n"   # d1's wording (eval/sudoku.py)
        # An SFT target built from the data only: the solved grid as rows, then d1's answer format.
        target = f"<reasoning>\n{rows_text(solution)}\n</reasoning>\n<answer>\n{solution}\n</answer>\n"
        records.append(make_record(
            user_content=SUDOKU_SYSTEM_PROMPT + "\n\n" + question, style=style, sft_text=target,
            question=question, ground_truth=solution, puzzle=puzzle, solution=solution))
    return records


# ---------------------------------------------------------------------------------------------------
# tiny_sudoku: the laptop task, with a coverage split (demonstrations from a few grids, RL prompts from all)

TINY_SUDOKU_BLANKS = (6, 10)
CANVAS_BLANK = "_"  # a canvas character the sampler must fill (one token of the character tokenizer)
TINY_NUM_SFT_GRIDS = 16
TINY_DEFAULT_LIMITS = {"sft": 20000, "rl": 20000, "test": 500}


def tiny_sudoku_examples(split, *, limit, seed, num_sft_grids=TINY_NUM_SFT_GRIDS):
    """Records of tiny_sudoku. Splits: `sft` (puzzles from the first `num_sft_grids` training grids),
    `rl` (all 240 training grids), `test` (the 48 held-out grids). Each split draws from its own
    seed derived from `seed`, so the three never share a random stream.

    The prompt is the bare puzzle as 4 rows of digits ('0' = blank), no system prompt, no prefill;
    the completion is the solution as 4 rows. The task is infilling: the "canvas" is the completion with
    the given cells already written and the blanks as CANVAS_BLANK, so the sampler fills only the blanks
    and GRPO's actions are the blank cells alone.
    """
    grids = coverage_split("tiny_sudoku", split, *split_grids(), num_sft_grids, "grids")
    n = TINY_DEFAULT_LIMITS[split] if limit is None else limit
    lo, hi = TINY_SUDOKU_BLANKS
    records = []
    for puzzle, solution in make_puzzles(grids, n, lo, hi, seed=f"tiny_sudoku/{split}/{seed}"):
        question = rows_text(puzzle)
        records.append(make_record(
            user_content=question, style="train", sft_text=rows_text(solution),
            question=question, ground_truth=solution, puzzle=puzzle, solution=solution))
        records[-1]["canvas"] = question.replace(EMPTY, CANVAS_BLANK)  # data.tiny_sudoku_canvas
    return records
