"""
Guards the choices of d1's released code that we follow and that no other test would notice moving: each
is checked against d1's rule written here as a slow reference, through the function the scripts really
call.

- the completion mask (generate.read_completions, which grpo.py's rollout calls) keeps the tokens up to and
  including the first EOS, as d1's trainer builds it from the index of the first EOS; all ones without EOS;
- advantages (grpo.group_advantages) are the rewards minus their group's mean, not divided by the group's
  std (d1 overrides TRL's default); --scale-rewards group divides by std + 1e-4 as TRL does;
- grpo.d1_clip_ratio is the clip_ratio d1 logs (TRL's is_clipped at d1's pinned commit): tokens whose
  unclipped term is below the clipped one, the side where the clip does not bind;
- the warm-up of d1's runs: HF's constant_with_warmup, warmup_ratio of the run's optimiser steps rounded up,
  lr x step / warm-up (the first step's lr is 0), against HF's formula; a grpo.py run logs those lrs; giving
  --warmup-steps and --warmup-ratio together is refused;
- MATH's training reward reads the last \\boxed{} of the solution, as d1's does, even where the file has an
  answer field (evaluation keeps MATH-500's answer field, as d1's evaluation);
- the generated Sudoku training set holds more puzzles than the 8B recipe's run draws (d1 draws from a large
  CSV, so no prompt comes twice);
- evaluation encodes prompts as d1's evaluation does (the tokenizer's default add_special_tokens=True)
  and rollouts as TRL does (False): the same ids with a tokenizer like LLaDA's, whose chat template
  writes the BOS, and d1's doubled BOS with a tokenizer whose post-processor adds one;
- --autocast-dtype float16 (d1 evaluates under torch.autocast("cuda"), i.e. float16) reaches the autocast
  context and is recorded in the generations file.
"""

import glob
import json
import math
import warnings

import pytest
import torch
from helpers import assert_clean_error, digit_checkpoint, read_metrics, run_script

import checkpoint as C
import data
import evaluate
import model as M
from generate import read_completions
from grpo import d1_clip_ratio, group_advantages, learning_rate

# -----------------------------------------------------------------------------
# The completion mask and the advantages


def slow_d1_completion_mask(completion_ids, eos_id):
    """d1's rule, row by row: every position up to and including the first EOS (the whole row without one)."""
    mask = []
    for row in completion_ids.tolist():
        first_eos = row.index(eos_id) if eos_id in row else len(row)
        mask.append([1 if j <= first_eos else 0 for j in range(len(row))])
    return torch.tensor(mask, dtype=torch.bool)


def test_completion_mask_keeps_up_to_and_including_the_first_eos(tokenizer):
    eos = tokenizer.eos_token_id
    ids = torch.tensor([[5, 6, eos, 7, eos, eos],     # EOS mid-row, then more EOS
                        [eos, 5, 6, 7, 8, 9],         # EOS first
                        [5, 6, 7, 8, 9, 10],          # no EOS: all kept
                        [5, 6, 7, 8, 9, eos]])        # EOS last
    mask, texts = read_completions(tokenizer, ids, None, C.mask_token_id(tokenizer))
    assert torch.equal(mask, slow_d1_completion_mask(ids, eos))
    assert mask[0].tolist() == [True, True, True, False, False, False]  # the first EOS itself is trained on
    assert len(texts) == 4


def test_completion_mask_against_d1_on_random_rows(tokenizer):
    eos = tokenizer.eos_token_id
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 12, (64, 16), generator=g)
    ids[torch.rand(64, 16, generator=g) < 0.1] = eos
    mask, _ = read_completions(tokenizer, ids, None, C.mask_token_id(tokenizer))
    assert torch.equal(mask, slow_d1_completion_mask(ids, eos))


def slow_d1_advantages(rewards, num_generations, scale_by_std=False):
    """d1: each reward minus the mean of its group of G contiguous completions; TRL's default also divides by
    the group's (unbiased) std + 1e-4."""
    out = []
    for start in range(0, len(rewards), num_generations):
        group = rewards[start:start + num_generations]
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (len(group) - 1))
        out += [(r - mean) / (std + 1e-4) if scale_by_std else r - mean for r in group]
    return out


def test_advantages_are_rewards_minus_the_group_mean_without_std_scaling():
    rewards = [0.0, 1.0, 2.5, 0.5, 3.0, 3.0, 3.0, 3.0, 0.1, 0.0, 0.0, 2.0]
    got = group_advantages(torch.tensor(rewards), 4)
    assert got.shape == (12, 1)
    assert got.flatten().tolist() == pytest.approx(slow_d1_advantages(rewards, 4), abs=1e-6)
    # dividing by the std would scale the first group's advantages by 1/std = 0.92, which d1 does not do
    assert got.flatten()[:4].tolist() == pytest.approx([-1.0, 0.0, 1.5, -0.5], abs=1e-6)
    scaled = group_advantages(torch.tensor(rewards), 4, "group")
    assert scaled.flatten().tolist() == pytest.approx(slow_d1_advantages(rewards, 4, scale_by_std=True),
                                                      abs=1e-5)


# -----------------------------------------------------------------------------
# d1's logged clip ratio


def slow_d1_clip_ratio(logp, old_logp, advantages, mask, epsilon):
    """TRL at d1's commit: is_clipped = coef_1 * A < clamp(coef_1) * A, averaged over the completion mask."""
    clipped = total = 0
    for i in range(len(logp)):
        for k in range(len(logp[i])):
            if mask[i][k]:
                ratio = math.exp(logp[i][k] - old_logp[i][k])
                clamped = min(max(ratio, 1 - epsilon), 1 + epsilon)
                clipped += ratio * advantages[i] < clamped * advantages[i]
                total += 1
    return clipped / total


def test_d1_clip_ratio_counts_the_side_where_the_clip_does_not_bind():
    old = torch.zeros(3, 4)
    logp = torch.log(torch.tensor([[0.3, 0.9, 1.2, 2.0],     # A > 0: only 0.3 is below the range, unclipped
                                   [0.3, 0.9, 1.2, 2.0],     # A < 0: only 2.0 is above the range, unclipped
                                   [0.3, 0.9, 1.2, 2.0]]))   # A = 0: nothing
    advantages = torch.tensor([[1.0], [-1.0], [0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.float32)
    got = d1_clip_ratio(logp, old, advantages, mask, 0.5, 0.5).item()
    want = slow_d1_clip_ratio(logp.tolist(), old.tolist(), advantages.flatten().tolist(), mask.tolist(), 0.5)
    assert got == pytest.approx(want) and got == pytest.approx(2 / 11)


# -----------------------------------------------------------------------------
# d1's warm-up: HF's constant_with_warmup


def hf_constant_with_warmup(step, warmup_steps):
    """transformers' get_constant_schedule_with_warmup, its lr_lambda."""
    if step < warmup_steps:
        return float(step) / float(max(1.0, warmup_steps))
    return 1.0


@pytest.mark.parametrize("total, ratio", [(7704, 1e-4), (17504, 1e-4), (40, 0.1), (10, 0.0)])
def test_constant_with_warmup_is_hf_schedule(total, ratio):
    warmup = math.ceil(total * ratio)  # HF's get_warmup_steps
    for step in range(min(total, 30)):
        assert learning_rate(step, 3e-6, "constant_with_warmup", warmup, total) == pytest.approx(
            3e-6 * hf_constant_with_warmup(step, warmup), abs=0)
    if warmup:
        # the first step's lr is 0
        assert learning_rate(0, 3e-6, "constant_with_warmup", warmup, total) == 0.0


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    return digit_checkpoint(tmp_path_factory.mktemp("start") / "digits")


def test_grpo_logs_the_hf_warmup(start, tmp_path):
    # 2 rollout batches x mu 2 = 4 optimiser steps, warm-up ceil(0.5 x 4) = 2: lrs 0, lr/2, lr, lr; a record
    # holds its last inner step's lr
    run_script("grpo.py", "--model", start, "--prompts-per-step", 2, "--num-generations", 4,
               "--num-iterations", 2, "--eval-examples", 0, "--max-steps", 2, "--lr", 1e-3,
               "--lr-schedule", "constant_with_warmup", "--warmup-ratio", 0.5, "--out-dir", tmp_path / "out",
               "--save-every", 0)
    records = read_metrics(tmp_path / "out")
    assert [r["lr"] for r in records] == pytest.approx([5e-4, 1e-3])
    assert all(0 <= r["clip_ratio_d1"] <= 1 for r in records)  # d1's clip_ratio, logged beside ours


def test_warmup_steps_and_ratio_together_are_refused(start, tmp_path):
    run = run_script("grpo.py", "--model", start, "--warmup-steps", 3, "--warmup-ratio", 0.1,
                     "--out-dir", tmp_path / "out", expect_ok=False)
    assert_clean_error(run, "--warmup-steps", "--warmup-ratio")


def test_math_training_answer_is_the_solutions_last_boxed(tmp_path):
    # d1's MATH reward reads the last \boxed{} of the solution, even where the file has an answer field
    row = {"problem": "1/2 of 1?", "solution": "So $\\boxed{\\frac12}$.", "answer": "\\frac{1}{2}"}
    for split in ("train", "test"):
        with open(tmp_path / f"math500_{split}.jsonl", "w") as f:
            f.write(json.dumps(row) + "\n")
    assert data.load_examples("math500", "train", data_dir=str(tmp_path))[0]["answer"] == "\\frac12"
    assert data.load_examples("math500", "test", data_dir=str(tmp_path))[0]["answer"] == "\\frac{1}{2}"


def test_generated_sudoku_set_outlasts_the_recipe():
    # the 8B recipe's Sudoku run draws 2188 rollout batches x 16 prompts: none should come twice
    assert len(data.load_examples("sudoku", "train")) >= 2188 * 16


# -----------------------------------------------------------------------------
# Evaluation as d1 measured: prompt tokens and autocast


def bos_adding_tokenizer():
    """The tiny tokenizer with a post-processor that prepends BOS on add_special_tokens=True."""
    from tokenizers import processors
    tokenizer = C.build_tiny_tokenizer()
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tokenizer.bos_token} $A", special_tokens=[(tokenizer.bos_token, bos)])
    return tokenizer


EXAMPLE = {"prompt": [{"role": "user", "content": "1024"}], "prefill": "<r>"}


def test_evaluation_encodes_prompts_as_d1_and_rollouts_as_trl(tokenizer):
    # like LLaDA's: the chat template writes the BOS and the tokenizer adds none: the same ids either way
    text = (tokenizer.apply_chat_template(EXAMPLE["prompt"], add_generation_prompt=True, tokenize=False)
            + "<r>")
    rollout = data.encode_prompt(tokenizer, EXAMPLE["prompt"], EXAMPLE["prefill"])
    assert evaluate.encode_eval_prompt(tokenizer, EXAMPLE) == rollout == tokenizer(text)["input_ids"]
    assert rollout.count(tokenizer.bos_token_id) == 1
    # a tokenizer whose post-processor adds a BOS: d1's evaluation call doubles it, TRL's rollouts do not
    doubling = bos_adding_tokenizer()
    evaluation = evaluate.encode_eval_prompt(doubling, EXAMPLE)
    assert evaluation == doubling(text)["input_ids"]  # d1's eval: tokenizer(prompts) with its defaults
    assert evaluation[:2] == [doubling.bos_token_id] * 2
    assert data.encode_prompt(doubling, EXAMPLE["prompt"], EXAMPLE["prefill"]) == evaluation[1:]


def test_autocast_dtype_reaches_the_autocast_context(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no CUDA here: torch warns that it disables the context
        assert M.autocast("cuda", torch.float16).fast_dtype == torch.float16
        assert M.autocast("cuda").fast_dtype == torch.bfloat16


def test_evaluate_records_the_autocast_dtype(start, tmp_path):
    run_script("evaluate.py", "--model", start, "--limit", 2, "--autocast-dtype", "float16",
               "--output-dir", tmp_path / "eval")
    (path,) = glob.glob(str(tmp_path / "eval" / "*_generations.json"))
    with open(path) as f:
        assert json.load(f)["autocast_dtype"] == "float16"
