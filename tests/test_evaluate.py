"""
Guards evaluation, `evaluate.py`: run as a script on tiny checkpoints, and `evaluate_examples` called
directly.

- `python evaluate.py --model DIR... --task tiny_sudoku --limit 16 --output-dir OUT` writes exactly one
  `*_0_generations.json` per model in d1's format (a generations list of question, prompt_input,
  generations, ground_truth, in test-set order) plus the settings (gen_length, steps, block_length) and the
  metrics; rescoring the file (evaluate.rescore) gives the accuracy and counts the run printed, and the file
  alone is enough to score (its ground truths as generations score 100%);
- under 2 gloo ranks the same command writes one file per model whose generations are identical to the
  one-process file, in the same order;
- several models in one call print a comparison table with one column per model, also when two model
  folders share a name (out/seed0/grpo, out/seed1/grpo);
- user errors: a missing model folder, --rescore on a folder without generation files;
- d1's Sudoku subset: data.test_examples keeps the 256 puzzles that `np.random.seed(42);
  np.random.choice(500, 256, replace=False)` picks (the slow reference, written here with the global generator
  d1 seeds), in that order; the stored generation is the text of all gen_length tokens, as d1 stores it;
- evaluate_examples: with left padding and its attention mask, a prompt's greedy completion does not depend
  on the other prompts of its batch (without the mask it does, for the same model);
- the fast sampler's options: `--cache` and `--threshold` reach the sampler, name their own file and are
  recorded in it with the forward passes per generated token; evaluate_examples(cache=, threshold=) too.
"""

import copy
import glob
import json
import os
import re
import shutil

import pytest
import torch
from helpers import assert_clean_error, digit_checkpoint, run_script, tiny_checkpoint

import checkpoint as C
import data
import evaluate
from generate import generate, left_pad

LIMIT = 16
ITEM_KEYS = {"question", "prompt_input", "generations", "ground_truth"}
TABLE_ROW = re.compile(r"^(?P<setup>\S+)\s+(?P<accuracy>\d+\.\d+)%\s+(?P<correct>\d+)/(?P<total>\d+)\s", re.M)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two checkpoints with different outputs: the random tiny preset and the digit writer."""
    root = tmp_path_factory.mktemp("models")
    return tiny_checkpoint(root / "tiny"), digit_checkpoint(root / "digits")


def evaluate_cli(models, out, nproc=1):
    return run_script("evaluate.py", "--model", *models, "--task", "tiny_sudoku", "--limit", LIMIT,
                      "--output-dir", out, nproc=nproc)


@pytest.fixture(scope="module")
def one_process(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "one"
    return out, evaluate_cli(models, out)


@pytest.fixture(scope="module")
def two_ranks(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "two"
    return out, evaluate_cli(models, out, nproc=2)


def files_by_model(out, models):
    """{model folder name: its one generations file}; fails on any other file."""
    files = sorted(glob.glob(os.path.join(out, "*_generations.json")))
    found = {}
    for model_path in models:
        name = os.path.basename(model_path)
        mine = [f for f in files if os.path.basename(f).startswith(f"tiny_sudoku_{name}_")]
        assert len(mine) == 1, f"{name}: {mine} among {files}"
        assert mine[0].endswith("_0_generations.json")
        found[name] = mine[0]
    assert sorted(found.values()) == files, files
    return found


def load(path):
    with open(path) as f:
        return json.load(f)


def test_one_generations_file_per_model_in_d1_format(models, one_process):
    out, _ = one_process
    examples = data.test_examples("tiny_sudoku", "data/files", LIMIT)
    tokenizer = C.load_tokenizer(models[0])
    for name, path in files_by_model(out, models).items():
        written = load(path)
        items = written["generations"]
        assert len(items) == LIMIT
        for item, example in zip(items, examples):
            assert set(item) >= ITEM_KEYS and all(isinstance(item[k], str) for k in ITEM_KEYS)
            assert item["question"] == example["question"]  # test-set order
            assert item["ground_truth"] == example["ground_truth"]
            assert item["prompt_input"] == tokenizer.decode(
                data.encode_prompt(tokenizer, example["prompt"], example["prefill"]))
        defaults = data.generation_defaults("tiny_sudoku")
        for key in ("gen_length", "steps", "block_length"):
            assert written[key] == defaults[key]
        assert written["metrics"]["count"] == LIMIT and 0.0 <= written["metrics"]["accuracy"] <= 1.0
        assert f"_{written['gen_length']}_{written['steps']}_0_generations.json" in path


def test_rescoring_the_file_gives_the_printed_accuracy(models, one_process, tmp_path):
    out, run = one_process
    printed = {m["setup"]: m for m in TABLE_ROW.finditer(run.stdout)}
    for name, path in files_by_model(out, models).items():
        setup = os.path.basename(path)[: -len("_0_generations.json")]
        assert setup in printed, f"no table row for {setup} in:\n{run.stdout}"
        (row,) = evaluate.rescore([path])
        assert abs(float(printed[setup]["accuracy"]) - row["accuracy"]) <= 0.005
        assert ((int(printed[setup]["correct"]), int(printed[setup]["total"]))
                == (row["correct"], row["total"]))
        assert row["count"] == LIMIT and row["files"] == 1
        assert row["accuracy"] == pytest.approx(100 * load(path)["metrics"]["accuracy"])
        # the file holds what scoring needs: its ground truths, as generations, score 100%
        data = load(path)
        for item in data["generations"]:
            item["generations"] = item["ground_truth"]
        perfect = tmp_path / name / os.path.basename(path)
        perfect.parent.mkdir()
        perfect.write_text(json.dumps(data))
        assert evaluate.rescore([str(perfect)])[0]["accuracy"] == 100.0


def test_two_ranks_write_the_same_generations_in_the_same_order(models, one_process, two_ranks):
    (one, _), (two, _) = one_process, two_ranks
    one_files, two_files = files_by_model(one, models), files_by_model(two, models)
    for name in one_files:
        a, b = load(one_files[name]), load(two_files[name])
        assert b["world_size"] == 2
        assert a["generations"] == b["generations"]
    # the order is checked with teeth: the random model's completions are not all the same
    tiny = load(one_files[os.path.basename(models[0])])["generations"]
    assert len({item["generations"] for item in tiny}) > 1


def test_several_models_print_one_column_each(models, one_process):
    out, run = one_process
    lines = run.stdout.splitlines()
    header = next(i for i, line in enumerate(lines)
                  if line.startswith("held-out accuracy (%) on tiny_sudoku"))
    names = [n.strip() for n in lines[header + 1].split("|")]
    values = [float(v) for v in lines[header + 2].split("|")]
    assert names == [os.path.basename(m) for m in models]
    files = files_by_model(out, models)
    for name, value in zip(names, values):
        assert value == pytest.approx(100 * load(files[name])["metrics"]["accuracy"], abs=0.05)


def test_models_with_the_same_folder_name_keep_separate_results(models, tmp_path):
    """`--model out/seed0/grpo out/seed1/grpo` (run_tiny.sh's OUT=out/seed1 layout): two models, two files,
    two columns named by the shortest distinct path tails (with the base name alone the second model would
    overwrite the first's file and column)."""
    first, second = tmp_path / "seed0" / "grpo", tmp_path / "seed1" / "grpo"
    shutil.copytree(models[0], first)
    shutil.copytree(models[1], second)
    out = tmp_path / "eval"
    run = run_script("evaluate.py", "--model", first, second, "--task", "tiny_sudoku", "--limit", 2,
                     "--output-dir", out)
    files = glob.glob(os.path.join(out, "*_generations.json"))
    assert len(files) == 2, f"two models, {len(files)} generation file(s): {files}"
    lines = run.stdout.splitlines()
    table = lines.index("held-out accuracy (%) on tiny_sudoku, 2 examples")
    assert [name.strip() for name in lines[table + 1].split("|")] == ["seed0/grpo", "seed1/grpo"]


def test_missing_model_folder_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    run = run_script("evaluate.py", "--model", missing, "--output-dir", tmp_path / "out", expect_ok=False)
    assert_clean_error(run, str(missing), "not a folder")
    assert not (tmp_path / "out").exists()


def test_rescore_without_generation_files_errors(tmp_path):
    run = run_script("evaluate.py", "--rescore", tmp_path, expect_ok=False)
    assert run.returncode != 0
    assert f"{tmp_path} holds no *_generations.json file" in run.output, run.describe()


# -----------------------------------------------------------------------------
# evaluate_examples in process


def test_completion_is_independent_of_batch_companions(tokenizer):
    model = C.build_model("tiny", tokenizer, seed=0).eval()
    examples = data.test_examples("tiny_sudoku", "data/files", 2)
    longer = copy.deepcopy(examples[1])
    # 15 more tokens: the first prompt gets left-padded
    longer["prompt"][0]["content"] += "\n1234\n4321\n1111"
    settings = dict(gen_length=20, steps=20, block_length=20, batch_size=4, progress=False)
    alone = evaluate.evaluate_examples(model, tokenizer, "tiny_sudoku", examples[:1], **settings)
    together = evaluate.evaluate_examples(model, tokenizer, "tiny_sudoku", [examples[0], longer], **settings)
    assert together["count"] == 2 and len(together["completions"]) == 2
    assert alone["completions"][0] == together["completions"][0]

    # the mask is what makes it so: the same padded batch without it changes the first completion
    prompts = [data.encode_prompt(tokenizer, e["prompt"], e["prefill"]) for e in (examples[0], longer)]
    ids, attention_mask = left_pad(prompts, tokenizer.eos_token_id, "cpu")
    assert attention_mask is not None and attention_mask[0].sum() == len(prompts[0]) < ids.shape[1]
    assert torch.equal(ids[0, -len(prompts[0]):], torch.tensor(prompts[0]))
    unmasked = generate(model, ids, 20, 20, 20, 0.0, mask_id=C.mask_token_id(tokenizer))
    assert tokenizer.decode(unmasked[0, ids.shape[1]:], skip_special_tokens=False) != alone["completions"][0]


def test_sudoku_subset_is_d1s_choice(tmp_path):
    """d1's eval/sudoku.py draws its 256 test puzzles with the global numpy generator seeded 42."""
    import numpy as np

    from data.sudoku import _GRIDS, make_puzzles

    pairs = make_puzzles(_GRIDS, 500, 6, 10, seed="subset-test")
    with open(tmp_path / "4x4_test_sudoku.csv", "w") as f:
        f.write("Puzzle,Solution\n" + "".join(f"{p},{s}\n" for p, s in pairs))
    state = np.random.get_state()
    try:
        np.random.seed(42)
        expected = [pairs[i][0] for i in np.random.choice(500, 256, replace=False)]
    finally:
        np.random.set_state(state)
    examples = data.test_examples("sudoku", str(tmp_path))
    assert [e["puzzle"] for e in examples] == expected
    assert len({e["puzzle"] for e in examples}) == 256  # the old random.Random(42).sample shared about half


def test_stored_generation_is_the_whole_canvas_text(tokenizer):
    """d1 decodes all gen_length tokens (skip_special_tokens=False) and scores that text."""
    model = C.build_model("tiny", tokenizer, seed=0).eval()
    examples = data.test_examples("tiny_sudoku", "data/files", 1)
    result = evaluate.evaluate_examples(model, tokenizer, "tiny_sudoku", examples, gen_length=24, steps=24,
                                        block_length=24, batch_size=1, progress=False)
    ids = tokenizer(result["completions"][0], add_special_tokens=False)["input_ids"]
    assert len(ids) == 24  # every generated token is in the text, the EOS after the grid and what follows it
    assert ids[19] == tokenizer.eos_token_id and result["effective_tokens"] == 19


def test_fast_sampler_options_are_recorded(models, tokenizer):
    """cache/threshold reach the sampler: the result records them and the forward passes per generated token;
    with one step per token (steps = gen_length) the plain sampler needs one pass per token (cached ones too),
    threshold decoding fewer (the digit writer spreads its confidence over 4 digits)."""
    model = C.load_model(models[1]).eval()
    examples = data.test_examples("tiny_sudoku", "data/files", 3)
    settings = dict(gen_length=20, steps=20, block_length=5, batch_size=1, progress=False)
    plain = evaluate.evaluate_examples(model, tokenizer, "tiny_sudoku", examples, **settings)
    assert (plain["cache"], plain["threshold"], plain["forward_passes_per_token"]) == ("none", None, 1.0)
    dual = evaluate.evaluate_examples(model, tokenizer, "tiny_sudoku", examples, cache="dual", **settings)
    assert (dual["cache"], dual["forward_passes_per_token"]) == ("dual", 1.0)
    fast = evaluate.evaluate_examples(model, tokenizer, "tiny_sudoku", examples, cache="prefix",
                                      threshold=0.2, **settings)
    assert (fast["cache"], fast["threshold"]) == ("prefix", 0.2) and fast["forward_passes_per_token"] < 1.0


def test_cli_fast_sampler_flags(models, tmp_path):
    out = tmp_path / "eval"
    run_script("evaluate.py", "--model", models[1], "--task", "tiny_sudoku", "--limit", 4,
               "--block-length", 5, "--cache", "dual", "--threshold", 0.9, "--output-dir", out)
    (path,) = glob.glob(os.path.join(out, "*_generations.json"))
    assert os.path.basename(path) == "tiny_sudoku_digits_20_20_dual_t0.9_0_generations.json"
    written = load(path)
    assert (written["cache"], written["threshold"], written["block_length"]) == ("dual", 0.9, 5)
    assert (written["metrics"]["cache"], written["metrics"]["threshold"]) == ("dual", 0.9)
    assert written["metrics"]["forward_passes_per_token"] > 0
    assert [row["setup"] for row in evaluate.rescore([path])] == ["tiny_sudoku_digits_20_20_dual_t0.9"]
