"""Guards `evaluate.py --rescore`: files of one setup are pooled across ranks, the task comes from
the file-name prefix (d1's "math" included), each task is scored as d1's parser scores it (sudoku by
cells), the accuracy equals a hand count on small synthetic generation files, and bad inputs fail
with the file named."""

import json

import pytest
from helpers import run_script

import evaluate


def write_generations(path, items):
    path.write_text(json.dumps({"generations": [
        {"question": q, "prompt_input": "<prompt>", "generations": g, "ground_truth": t}
        for q, g, t in items]}))


SUDOKU_Q = "Solve the following Sudoku puzzle: 4320004330100004\n"     # 8 empty cells


@pytest.fixture
def results(tmp_path):
    write_generations(tmp_path / "gsm8k_instruct_128_64_0_generations.json", [
        ("q1", "\nso 18.\n</reasoning>\n<answer>\n\\boxed{18}\n</answer><|eot_id|>", 18.0),    # right
        ("q2", "<answer>\n\\boxed{17}\n</answer>", 18.0),                                      # wrong
        ("q3", "<answer>\nIt is 40 + 2 = 42\n</answer>", 42.0)])                               # right (tags)
    write_generations(tmp_path / "gsm8k_instruct_128_64_1_generations.json", [
        ("q4", "I do not know.", 5.0)])                                                        # wrong
    write_generations(tmp_path / "math_instruct_128_64_0_generations.json", [
        ("p1", "<answer>\\boxed{\\dfrac{1}{2}}</answer>", "\\frac12"),                         # right
        ("p2", "<answer>\\boxed{3}</answer>", "4")])                                           # wrong
    write_generations(tmp_path / "countdown_instruct_128_64_0_generations.json", [
        ("Numbers: [30, 100, 93]\nTarget: 23", "\\boxed{30 - (100 - 93)}", [[30, 100, 93], 23]),   # right
        ("Numbers: [30, 100, 93]\nTarget: 23", "\\boxed{100 - 93}", [[30, 100, 93], 23]),          # wrong
        ("Numbers: [2, 3, 4]\nTarget: 5", "\\boxed{9**9**9**9}", [[2, 3, 4], 5])])                  # wrong
    write_generations(tmp_path / "sudoku_instruct_128_64_0_generations.json", [
        (SUDOKU_Q, "<answer>\n4321124334122134\n</answer>", "4321124334122134"),                 # 8 of 8
        (SUDOKU_Q, "<answer>\n4321000000000000\n</answer>", "4321124334122134")])                # 1 of 8
    write_generations(tmp_path / "sudoku_instruct_128_64_1_generations.json", [
        (SUDOKU_Q, "<answer>\n4321124300000000\n</answer>", "4321124334122134")])                # 3 of 8
    write_generations(tmp_path / "tiny_sudoku_step500_0_generations.json", [
        ("4320\n0043\n3010\n0004", "4321\n1243\n3412\n2134", "4321124334122134"),                # solved
        ("4320\n0043\n3010\n0004", "4321\n1243\n3412\n2143", "4321124334122134")])               # not
    return tmp_path


def test_rescore_matches_hand_counts(results):
    rows = {row["setup"]: row for row in evaluate.rescore([str(results)])}
    expected = {  # setup: (task, correct, total, count, files)
        "countdown_instruct_128_64": ("countdown", 1, 3, 3, 1),
        "gsm8k_instruct_128_64": ("gsm8k", 2, 4, 4, 2),
        "math_instruct_128_64": ("math500", 1, 2, 2, 1),
        "sudoku_instruct_128_64": ("sudoku", 8 + 1 + 3, 24, 3, 2),
        "tiny_sudoku_step500": ("tiny_sudoku", 1, 2, 2, 1),
    }
    assert set(rows) == set(expected)
    for setup, (task, correct, total, count, files) in expected.items():
        row = rows[setup]
        assert ((row["task"], row["correct"], row["total"], row["count"], row["files"])
                == (task, correct, total, count, files))
        assert row["accuracy"] == pytest.approx(100 * correct / total)
    table = evaluate.format_table(list(rows.values()))
    assert "50.00%" in table and "33.33%" in table and "12/24" in table


def test_files_and_folders_are_pooled_once(results):
    one = str(results / "gsm8k_instruct_128_64_1_generations.json")
    rows = evaluate.rescore([one])
    assert [(r["setup"], r["correct"], r["total"]) for r in rows] == [("gsm8k_instruct_128_64", 0, 1)]
    rows = evaluate.rescore([str(results), one])            # the same file twice counts once
    assert next(r for r in rows if r["setup"] == "gsm8k_instruct_128_64")["total"] == 4


def test_cli_prints_the_table(results):
    out = run_script("evaluate.py", "--rescore", results).stdout
    assert "gsm8k_instruct_128_64" in out and "75.00%" not in out and "50.00%" in out


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        evaluate.rescore([str(tmp_path / "nothing_here")])
    with pytest.raises(FileNotFoundError):
        evaluate.rescore([str(tmp_path)])                    # a folder without generation files
    write_generations(tmp_path / "poetry_x_0_generations.json", [("q", "a", 1.0)])
    with pytest.raises(ValueError, match="cannot tell the task"):
        evaluate.rescore([str(tmp_path)])
    bad = tmp_path / "gsm8k_x_0_generations.json"
    bad.write_text('{"generations": [')
    with pytest.raises(ValueError, match="gsm8k_x_0_generations.json"):
        evaluate.rescore([str(bad)])
    odd = tmp_path / "gsm8k_results.json"
    odd.write_text('{"generations": []}')
    with pytest.raises(ValueError, match="<setup>_<rank>_generations.json"):
        evaluate.rescore([str(odd)])
