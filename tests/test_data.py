"""Guards the tasks in data/: the 288 Sudoku grids and the train/test grid split, the exact solver
and unique-solution puzzles, the Countdown generator and solver, tiny_sudoku's coverage split, the
loaders of every file format (tiny files written here; parquet only with pyarrow), their errors
(malformed line named by file and line, missing file naming the prepare command), d1's prompt
wordings, the uniform record, and prepare's offline message."""

import itertools
import json
import random
from fractions import Fraction

import pytest
import torch

import data
import rewards
from data import TASKS, load_examples
from data.countdown import load_countdown_jsonl, make_countdown_problems, solve_countdown
from data.prepare import prepare
from data.sudoku import (all_grids, count_solutions, is_solution_grid, load_sudoku_csv, make_puzzles,
                         split_grids)

RECORD_KEYS = {"prompt", "prefill", "completion", "question", "ground_truth"}


def slow_count_solutions(puzzle, limit=2):
    """An independent solver: plain backtracking with row/column/box checks."""
    cells = list(puzzle)

    def ok(i, d):
        r, c = divmod(i, 4)
        box = [(r // 2 * 2 + a) * 4 + c // 2 * 2 + b for a in range(2) for b in range(2)]
        peers = [r * 4 + k for k in range(4)] + [k * 4 + c for k in range(4)] + box
        return all(cells[j] != d for j in peers if j != i)

    def count(i):
        if i == 16:
            return 1
        if cells[i] != "0":
            return count(i + 1) if ok(i, cells[i]) else 0
        total = 0
        for d in "1234":
            if ok(i, d):
                cells[i] = d
                total += count(i + 1)
                cells[i] = "0"
                if total >= limit:
                    break
        return total

    return min(count(0), limit)


# --- Sudoku ----------------------------------------------------------------------------------------

def test_all_grids_are_288_distinct_valid_grids():
    grids = all_grids()
    assert len(grids) == 288 == len(set(grids))
    assert all(is_solution_grid(g) for g in grids)
    assert not is_solution_grid("1234123412341234")      # rows fine, columns not


def test_split_grids_disjoint_complete_deterministic():
    train, test = split_grids()
    assert (len(train), len(test)) == (240, 48)
    assert not set(train) & set(test)
    assert sorted(train + test) == all_grids()
    assert split_grids() == (train, test)
    assert split_grids(seed=1) != (train, test)


def test_count_solutions_agrees_with_backtracking():
    rng = random.Random(0)
    grids = all_grids()
    for _ in range(150):
        grid = rng.choice(grids)
        blanks = set(rng.sample(range(16), rng.randint(0, 16)))
        puzzle = "".join("0" if i in blanks else c for i, c in enumerate(grid))
        assert count_solutions(puzzle) == slow_count_solutions(puzzle)
    assert count_solutions("0" * 16, limit=1000) == 288
    assert count_solutions("1100" + "0" * 12) == 0                 # contradictory givens
    with pytest.raises(ValueError):
        count_solutions("12345")


def test_make_puzzles_unique_deterministic_within_blank_range():
    train, _ = split_grids()
    pairs = make_puzzles(train, 120, 6, 10, seed=3)
    assert pairs == make_puzzles(train, 120, 6, 10, seed=3)
    assert pairs != make_puzzles(train, 120, 6, 10, seed=4)
    for puzzle, solution in pairs:
        assert solution in train
        assert 6 <= puzzle.count("0") <= 10
        assert all(p in ("0", s) for p, s in zip(puzzle, solution))
        assert slow_count_solutions(puzzle) == 1


def test_d1_sudoku_csv_loader_and_bad_row(tmp_path):
    good = tmp_path / "4x4_test_sudoku.csv"
    good.write_text("Puzzle,Solution\n3102200002100320,3142243142131324\n0140432014020000,2143432114323214\n")
    assert load_sudoku_csv(good) == [("3102200002100320", "3142243142131324"),
                                     ("0140432014020000", "2143432114323214")]
    records = load_examples("sudoku", "test", data_dir=str(tmp_path), style="eval")
    assert records[0]["question"] == "Solve the following Sudoku puzzle: 3102200002100320\n"
    assert records[0]["prefill"] == "<reasoning>"
    bad = tmp_path / "bad.csv"
    bad.write_text("Puzzle,Solution\n3102200002100320,3142243142131324\n3102200002100320,1111222233334444\n")
    with pytest.raises(ValueError, match=r"bad\.csv:3"):
        load_sudoku_csv(bad)


# --- tiny_sudoku -----------------------------------------------------------------------------------

def test_tiny_sudoku_coverage_split():
    train, test = split_grids()
    sft = load_examples("tiny_sudoku", "sft", limit=300)
    rl = load_examples("tiny_sudoku", "rl", limit=300)
    held_out = load_examples("tiny_sudoku", "test", limit=100)
    assert {r["solution"] for r in sft} <= set(train[:16])
    assert len({r["solution"] for r in rl} - set(train[:16])) > 50      # RL sees far more grids
    assert {r["solution"] for r in rl} <= set(train)
    assert {r["solution"] for r in held_out} <= set(test)
    assert {r["puzzle"] for r in sft} != {r["puzzle"] for r in rl}
    assert ({r["solution"] for r in load_examples("tiny_sudoku", "sft", limit=300, num_sft_grids=2)}
            <= set(train[:2]))


def test_tiny_sudoku_record_format_and_determinism():
    records = load_examples("tiny_sudoku", "test", limit=50, seed=5)
    assert records == load_examples("tiny_sudoku", "test", limit=50, seed=5)
    assert records != load_examples("tiny_sudoku", "test", limit=50, seed=6)
    assert len(load_examples("tiny_sudoku", "test")) == 500
    for r in records:
        content = r["prompt"][0]["content"]
        assert r["prompt"] == [{"role": "user", "content": content}] and r["prefill"] == ""
        rows = content.split("\n")
        assert len(rows) == 4 and all(len(row) == 4 and row.isdigit() for row in rows)
        assert "".join(rows) == r["puzzle"] and 6 <= r["puzzle"].count("0") <= 10
        assert r["completion"].replace("\n", "") == r["solution"] == r["ground_truth"]
        assert rewards.score("tiny_sudoku", r["completion"], puzzle=r["puzzle"],
                             solution=r["solution"]) == (1, 1)


def test_num_sft_grids_only_for_tiny_sudoku():
    with pytest.raises(ValueError, match="num_sft_grids"):
        load_examples("countdown", "train", limit=1, num_sft_grids=4)
    with pytest.raises(ValueError):
        load_examples("tiny_sudoku", "sft", limit=1, num_sft_grids=0)
    with pytest.raises(ValueError):
        load_examples("tiny_sudoku", "train")


# --- Countdown -------------------------------------------------------------------------------------

def brute_force_values(numbers):
    """Every value of the two tree shapes over every order of 3 numbers and every pair of ops."""
    ops = [lambda a, b: a + b, lambda a, b: a - b, lambda a, b: a * b,
           lambda a, b: a / b if b != 0 else None]
    values = set()
    for a, b, c in itertools.permutations([Fraction(n) for n in numbers]):
        for f, g in itertools.product(ops, ops):
            left = f(a, b)
            if left is not None and g(left, c) is not None:
                values.add(g(left, c))
            right = g(b, c)
            if right is not None and f(a, right) is not None:
                values.add(f(a, right))
    return values


def test_countdown_generator_is_solvable_and_deterministic():
    problems = make_countdown_problems(60, seed=0)
    assert problems == make_countdown_problems(60, seed=0)
    assert problems != make_countdown_problems(60, seed=1)
    for numbers, target, expression in problems:
        assert len(numbers) == 3 and all(1 <= n <= 100 for n in numbers)
        assert isinstance(target, int) and 1 <= target <= 100
        assert Fraction(target) in brute_force_values(numbers)
        assert rewards.check_countdown(expression, numbers, target)


def test_countdown_solver_proves_or_refutes():
    assert rewards.check_countdown(solve_countdown([2, 3, 4], 5), [2, 3, 4], 5)
    assert rewards.check_countdown(solve_countdown([7, 3, 2], Fraction(7, 6)), [7, 3, 2], Fraction(7, 6))
    rng = random.Random(0)
    for _ in range(40):
        numbers, target = [rng.randint(1, 100) for _ in range(3)], rng.randint(1, 100)
        expression = solve_countdown(numbers, target)
        assert (expression is not None) == (Fraction(target) in brute_force_values(numbers))


def test_d1_countdown_jsonl_loader(tmp_path):
    path = tmp_path / "countdown_cd3_test.jsonl"
    path.write_text('{"input": "30,100,93", "output": "23"}\n{"input": "1,1,1", "output": "99"}\n')
    assert load_countdown_jsonl(path) == [([30, 100, 93], 23), ([1, 1, 1], 99)]
    records = load_examples("countdown", "test", data_dir=str(tmp_path), style="eval")
    assert records[0]["question"] == "Numbers: [30, 100, 93]\nTarget: 23"
    assert records[0]["ground_truth"] == [[30, 100, 93], 23]
    assert (records[0]["numbers"], records[0]["target"]) == ([30, 100, 93], 23)
    assert records[1]["completion"] is None                 # 99 is unreachable from 1, 1, 1
    path.write_text('{"input": "30,100,93", "output": "23"}\n{"input": "1,x,1", "output": "3"}\n')
    with pytest.raises(ValueError, match=r"countdown_cd3_test\.jsonl:2"):
        load_countdown_jsonl(path)


# --- GSM8K, MATH500, s1K -----------------------------------------------------------------------------

def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


GSM8K_ROW = {"question": "Janet has 3 ducks and buys 2. How many ducks?",
             "answer": "She has 3 + 2 = <<3+2=5>>5 ducks.\n#### 1,005"}


def test_gsm8k_loader_and_d1_prompts(tmp_path):
    write_jsonl(tmp_path / "gsm8k_test.jsonl", [GSM8K_ROW, {**GSM8K_ROW, "answer": "x\n#### -3"}])
    train = load_examples("gsm8k", "test", data_dir=str(tmp_path))
    evals = load_examples("gsm8k", "test", data_dir=str(tmp_path), style="eval", limit=1)
    assert len(train) == 2 and len(evals) == 1
    r = train[0]
    assert (r["answer"], r["ground_truth"], r["question"]) == ("1,005", 1005.0, GSM8K_ROW["question"])
    assert train[1]["ground_truth"] == -3.0                  # d1's regex would store None here
    assert r["prompt"][0]["content"].startswith("\nRespond in the following format:\n<reasoning>\n...\n")
    assert r["prompt"][0]["content"].endswith("</answer>\n\n\n" + GSM8K_ROW["question"])
    assert r["prefill"] == ""
    e = evals[0]
    assert e["prompt"][0]["content"].startswith("You are a math expert. You will be given a question")
    assert "\\boxed{...}\n</answer>\n\n" + GSM8K_ROW["question"] in e["prompt"][0]["content"]
    assert e["prefill"] == "<reasoning>" and e["completion"].startswith("\n")
    assert rewards.score("gsm8k", e["prefill"] + e["completion"], answer=e["ground_truth"]) == (1, 1)


def test_gsm8k_sft_target_earns_d1s_full_reward(tmp_path):
    write_jsonl(tmp_path / "gsm8k_train.jsonl", [{**GSM8K_ROW, "answer": "3 + 2 = 5\n#### 5"}])
    r = load_examples("gsm8k", "train", data_dir=str(tmp_path))[0]
    total = sum(w * fn([r["completion"]], answer=[r["answer"]])[0]
                for fn, w in rewards.reward_functions("gsm8k"))
    assert total == pytest.approx(4.0)                        # 0.5 + 0.5 + 0.5 + 0.5 + 2.0


def test_math500_loader_answer_field_or_boxed(tmp_path):
    write_jsonl(tmp_path / "math500_test.jsonl",
                [{"problem": "What is 1/2 of 1?", "solution": "It is $\\boxed{\\frac12}$.",
                  "answer": "\\frac{1}{2}"}])
    write_jsonl(tmp_path / "math500_train.jsonl", [{"problem": "2+2?", "solution": "So $\\boxed{4}$."}])
    test = load_examples("math500", "test", data_dir=str(tmp_path), style="eval")[0]
    train = load_examples("math500", "train", data_dir=str(tmp_path))[0]
    assert (test["answer"], test["ground_truth"], test["question"]) == ("\\frac{1}{2}", "\\frac{1}{2}",
                                                                        "What is 1/2 of 1?")
    assert test["prompt"][0]["content"].endswith("\\boxed{...}\n</answer>\" \n\n\nWhat is 1/2 of 1?")
    assert train["answer"] == "4"
    assert "Wrap the final answer in a \\boxed{}. \n\n2+2?" in train["prompt"][0]["content"]
    assert rewards.score("math500", test["prefill"] + test["completion"], answer=test["answer"]) == (1, 1)


def test_s1k_loader_formats_completion_as_d1_sft(tmp_path):
    write_jsonl(tmp_path / "s1k_train.jsonl", [
        {"question": "Q1", "thinking_trajectories": ["think A", "think B"], "attempt": "A1", "solution": "S"},
        {"question": "Q2", "thinking_trajectories": "think C", "attempt": "A2"}])
    first, second = load_examples("s1k", "train", data_dir=str(tmp_path))
    assert first["completion"] == "<reasoning>think A</reasoning>\n<answer>A1</answer>"
    assert second["completion"] == "<reasoning>think C</reasoning>\n<answer>A2</answer>"
    assert first["prompt"][0]["content"] == (
        "\nRespond in the following format:\n<reasoning>\nYour reasoning here\n</reasoning>\n"
        "<answer>\n...\n</answer>\n\n\nQ1")
    assert first["ground_truth"] == "S" and second["ground_truth"] is None
    with pytest.raises(ValueError):
        load_examples("s1k", "train", data_dir=str(tmp_path), style="eval")


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "gsm8k_train.jsonl"
    path.write_text(json.dumps(GSM8K_ROW) + "\n" + json.dumps(GSM8K_ROW) + "\n{\"question\": \"cut off\n")
    with pytest.raises(ValueError, match=r"gsm8k_train\.jsonl:3: malformed JSON"):
        load_examples("gsm8k", "train", data_dir=str(tmp_path))
    path.write_text(json.dumps(GSM8K_ROW) + "\n" + json.dumps({"question": "no answer field"}) + "\n")
    with pytest.raises(ValueError, match=r"gsm8k_train\.jsonl:2: .*'answer'"):
        load_examples("gsm8k", "train", data_dir=str(tmp_path))


def test_missing_file_says_how_to_prepare(tmp_path):
    for task, split in (("gsm8k", "test"), ("math500", "test"), ("s1k", "train"), ("countdown", "test"),
                        ("sudoku", "test")):
        with pytest.raises(FileNotFoundError, match=f"python -m data.prepare --task {task}"):
            load_examples(task, split, data_dir=str(tmp_path))


def test_parquet_loader(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist([GSM8K_ROW]), tmp_path / "gsm8k_test.parquet")
    assert load_examples("gsm8k", "test", data_dir=str(tmp_path))[0]["ground_truth"] == 1005.0


# --- the uniform record, prepare --------------------------------------------------------------------

@pytest.mark.parametrize("task", ["tiny_sudoku", "tiny_countdown", "sudoku", "countdown"])
@pytest.mark.parametrize("style", ["train", "eval"])
def test_generated_records_have_the_uniform_schema_and_reward_columns(task, style):
    split = "rl" if task in data.TINY_TASKS else "train"
    records = load_examples(task, split, style=style, limit=4)
    columns = {"puzzle", "solution"} if task.endswith("sudoku") else {"numbers", "target"}
    assert len(records) == 4
    for r in records:
        assert RECORD_KEYS | columns <= set(r)
        assert r["prompt"][0]["role"] == "user" and isinstance(r["prompt"][0]["content"], str)
        text = r["prefill"] + r["completion"]
        if style == "train":     # the SFT target earns the task's full GRPO reward...
            cols = {k: [r[k]] for k in columns}
            total = sum(w * fn([text], **cols)[0] for fn, w in rewards.reward_functions(task))
            assert total == pytest.approx(sum(w for _, w in rewards.reward_functions(task)))
        else:                    # ...and the eval-style target is scored correct
            correct, out_of = rewards.score(task, text, **{k: r[k] for k in columns})
            assert correct == out_of > 0
    assert set(TASKS) == {"tiny_sudoku", "tiny_countdown", "sudoku", "countdown", "gsm8k", "math500", "s1k"}


def test_prepare_offline_prints_what_to_download(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert prepare("gsm8k", str(tmp_path)) == 1
    out = capsys.readouterr().out
    assert "huggingface.co/datasets/openai/gsm8k" in out and str(tmp_path / "gsm8k_train") in out
    assert prepare("countdown", str(tmp_path)) == 1
    assert "dllm-reasoning/d1" in capsys.readouterr().out
    (tmp_path / "countdown_cd3_test.jsonl").write_text('{"input": "1,2,3", "output": "6"}\n')
    assert prepare("countdown", str(tmp_path)) == 0


def test_derived_seeds_and_generators():
    # pinned values: a resumed run and every rank must draw what the first run drew, in any process
    assert data.derive_seed(1, 2, 3) == 6498626229777268288
    seeds = {data.derive_seed(0, step, example) for step in range(20) for example in range(20)}
    assert len(seeds) == 400 and all(0 <= s < 2**63 for s in seeds)
    assert data.derive_seed(1, 2) != data.derive_seed(2, 1)
    assert torch.rand(4, generator=data.generator(7, 1)).tolist() == pytest.approx(
        [0.6296906, 0.2163504, 0.7208009, 0.5624869], abs=1e-6)
