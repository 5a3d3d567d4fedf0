"""Tasks: one entry point, `load_examples`, gives every stage script the same records.

    from data import load_examples
    records = load_examples("tiny_sudoku", "sft")                       # generated, offline
    records = load_examples("tiny_countdown", "rl")                     # generated, offline
    records = load_examples("gsm8k", "test", style="eval", limit=100)   # needs data/files/gsm8k_test.*

Every record is a dict with
- "prompt": chat messages, [{"role": "user", "content": ...}] (d1 puts its format instructions at
  the front of the user message rather than in a system message; so do we),
- "prefill": text to append right after the chat template's assistant header ("<reasoning>" for
  d1's evaluation prompts, "" otherwise),
- "completion": the SFT target, the text that follows prompt + prefill (None when there is none),
- "question": the raw question, as stored in generation files,
- "ground_truth": the reference in d1's generations-JSON format (gsm8k a float, countdown and
  tiny_countdown [numbers, target], sudoku the 16-digit solution, math500 the answer string),
- the reward columns, named as in d1: gsm8k/math500 "answer"; countdown and tiny_countdown "numbers",
  "target";
  sudoku and tiny_sudoku "puzzle", "solution";
- tiny_sudoku only, "canvas": the completion with its fixed characters written and CANVAS_BLANK where
  the model must fill in (the sampler starts from it instead of an all-[MASK] completion).

style="train" gives d1's training prompts (answers in <answer> tags), style="eval" d1's evaluation
prompts (answers in \\boxed{}, generation prefilled with "<reasoning>"). The tiny tasks have a single
compact prompt whatever the style, and splits "sft", "rl" and "test" (a coverage split).

Generated splits (the tiny tasks; sudoku and countdown "train") are drawn from `seed`; file splits are
read in file order and `limit` keeps the first records.
"""

import numpy as np
import torch

from data.countdown import countdown_examples, tiny_countdown_examples
from data.sudoku import (CANVAS_BLANK, EMPTY, TINY_NUM_SFT_GRIDS, check_puzzle, sudoku_examples,
                         tiny_sudoku_examples)
from data.text_tasks import STYLES, gsm8k_examples, math500_examples, s1k_examples

# s1k stays last: it has no test set, and evaluate.py offers TASKS[:-1]
TASKS = ("tiny_sudoku", "tiny_countdown", "sudoku", "countdown", "gsm8k", "math500", "s1k")
# the laptop tasks: generated, with splits "sft", "rl" and "test" (sft.py and grpo.py pick sft and rl)
TINY_TASKS = ("tiny_sudoku", "tiny_countdown")
DEFAULT_DATA_DIR = "data/files"
# the sampler's settings per task: d1's evaluation (gen_length 128/256/512, block_length 32,
# steps = gen_length / 2), tiny_sudoku's answer, 19 characters + EOS: one block of 20, and tiny_countdown's,
# "<answer>a+b-c</answer>" (22 characters) + <|eot_id|> + EOS = 24, rounded up to one block of 32
GENERATION_DEFAULTS = {
    "default": {"gen_length": 256, "block_length": 32, "steps": 128, "batch_size": 8},
    "tiny_sudoku": {"gen_length": 20, "block_length": 20, "steps": 20, "batch_size": 250},
    "tiny_countdown": {"gen_length": 32, "block_length": 32, "steps": 32, "batch_size": 250},
}
RECORD_KEYS = ("prompt", "prefill", "completion", "question", "ground_truth", "canvas")


def generation_defaults(task):
    """gen_length, block_length, steps and evaluation batch_size of a task."""
    return GENERATION_DEFAULTS.get(task, GENERATION_DEFAULTS["default"])


def record_columns(example):
    """The columns a reward function or rewards.score reads from a record (d1's names)."""
    return {k: v for k, v in example.items() if k not in RECORD_KEYS}


def load_examples(task, split, *, data_dir=DEFAULT_DATA_DIR, style="train", limit=None, seed=0,
                  num_sft_grids=None):
    """The records of one task split (see the module docstring).

    num_sft_grids: tiny_sudoku only, how many training grids the "sft" split draws from (default 16).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {TASKS}")
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if num_sft_grids is not None and task != "tiny_sudoku":
        raise ValueError(f"num_sft_grids belongs to tiny_sudoku, not {task!r}")
    if task == "tiny_sudoku":
        grids = TINY_NUM_SFT_GRIDS if num_sft_grids is None else num_sft_grids
        return tiny_sudoku_examples(split, limit=limit, seed=seed, num_sft_grids=grids)
    if task == "tiny_countdown":
        return tiny_countdown_examples(split, limit=limit, seed=seed)
    if task == "sudoku":
        return sudoku_examples(split, data_dir=data_dir, style=style, limit=limit, seed=seed)
    if task == "countdown":
        return countdown_examples(split, data_dir=data_dir, style=style, limit=limit, seed=seed)
    if task == "gsm8k":
        return gsm8k_examples(split, data_dir=data_dir, style=style, limit=limit)
    if task == "math500":
        return math500_examples(split, data_dir=data_dir, style=style, limit=limit)
    return s1k_examples(split, data_dir=data_dir, style=style, limit=limit)


# d1 scores Sudoku on 256 of its 500 test puzzles, drawn by np.random.seed(42);
# np.random.choice(500, 256, replace=False) (its eval/sudoku.py); its Countdown file holds exactly 256
# problems, so nothing is drawn there
SUBSAMPLED_TASKS, SUBSAMPLE_SIZE, SUBSAMPLE_SEED = ("countdown", "sudoku"), 256, 42


def test_examples(task, data_dir, limit=None):
    """d1's test set of a task in d1's evaluation style; sudoku subsampled to d1's 256 puzzles."""
    examples = load_examples(task, "test", data_dir=data_dir, style="eval")
    if task in SUBSAMPLED_TASKS and len(examples) > SUBSAMPLE_SIZE:
        # the legacy global generator d1 seeds draws exactly what a RandomState of the same seed draws
        keep = np.random.RandomState(SUBSAMPLE_SEED).choice(len(examples), SUBSAMPLE_SIZE, replace=False)
        examples = [examples[i] for i in keep]  # in d1's order
    return examples[:limit] if limit is not None else examples


def encode_prompt(tokenizer, messages, prefill="", add_special_tokens=False):
    """Token ids of a chat prompt: the template with the assistant header, then `prefill` (d1's
    evaluation appends "<reasoning>"). Rendered to text first, so it reads the same under transformers 4
    and 5. Rollouts encode as TRL does (add_special_tokens=False: the template already holds the BOS); d1's
    evaluation calls the tokenizer with its default, True, which adds whatever the tokenizer's
    post-processor adds."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text + prefill, add_special_tokens=add_special_tokens)["input_ids"]


def sft_tokens(tokenizer, example):
    """(prompt_ids, response_ids) of one SFT example, before truncation and padding.

    Chat tasks are built as d1's SFT builds them (its preprocess_dataset): the sequence is the chat
    template over the user turn and the assistant's reply, so the reply ends with the template's end of
    turn (<|eot_id|> for LLaDA), and the prompt is as long as the tokens of the template over the user turn
    alone plus "\n", which puts the boundary one token into the assistant header (the rest of the header is
    trained). Infilling tasks (a canvas) are built as the sampler reads them: the prompt with its
    generation header, then the completion and one EOS, position for position the canvas the sampler
    starts from.
    """
    if example.get("canvas") is not None:
        prompt_ids = encode_prompt(tokenizer, example["prompt"], example["prefill"])
        response_ids = (tokenizer(example["completion"], add_special_tokens=False)["input_ids"]
                        + [tokenizer.eos_token_id])
        return prompt_ids, response_ids
    reply = [{"role": "assistant", "content": example["prefill"] + example["completion"]}]
    full = tokenizer(tokenizer.apply_chat_template(example["prompt"] + reply, tokenize=False))["input_ids"]
    prompt = tokenizer(tokenizer.apply_chat_template(example["prompt"], tokenize=False) + "\n")["input_ids"]
    return full[:len(prompt)], full[len(prompt):]


def encode_canvas(tokenizer, example, gen_length, mask_id):
    """The starting completion (gen_length,) of an infilling record: its canvas text, CANVAS_BLANK
    characters turned into [MASK], then EOS, then [MASK] up to gen_length. None when the record has no
    canvas (the sampler then starts from an all-[MASK] completion)."""
    if example.get("canvas") is None:
        return None
    ids = tokenizer(example["canvas"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    blank_id = tokenizer.convert_tokens_to_ids(CANVAS_BLANK)
    ids = [mask_id if t == blank_id else t for t in ids]
    if ids.count(mask_id) != example["canvas"].count(CANVAS_BLANK):
        raise ValueError(f"the tokenizer does not keep {CANVAS_BLANK!r} as one token: canvases need a "
                         "character-level tokenizer")
    if len(ids) > gen_length:
        raise ValueError(f"a canvas of {len(ids)} tokens does not fit in gen_length {gen_length}")
    return ids + [mask_id] * (gen_length - len(ids))


def tiny_sudoku_canvas(puzzle):
    """The canvas of a tiny_sudoku puzzle written as 4 rows of 4 digits ('0' = blank): the rows with each
    blank to fill. A ValueError names a malformed puzzle."""
    rows = puzzle.split("\n")
    if len(rows) != 4 or any(len(row) != 4 for row in rows):
        raise ValueError(f"a tiny_sudoku puzzle is 4 rows of 4 digits (0 = blank), got {puzzle!r}")
    check_puzzle("".join(rows))
    return puzzle.replace(EMPTY, CANVAS_BLANK)


# -----------------------------------------------------------------------------
# Which examples a step uses, and the noise it draws: functions of (seed, step, ...), never of what ran
# before or of which rank computes them, so that a run resumes without data-loader state and reproduces
# at any world size


def derive_seed(*numbers):
    """A 63-bit seed from a tuple such as (seed, step, example, sample)."""
    return int(np.random.SeedSequence([int(n) for n in numbers]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


def generator(*numbers, device="cpu"):
    return torch.Generator(device).manual_seed(derive_seed(*numbers))


def step_indices(step, batch_size, num_items, seed):
    """The item indices of optimiser step `step`: consecutive slices of a permutation drawn per epoch from
    (seed, epoch)."""
    start = step * batch_size
    indices = []
    while len(indices) < batch_size:
        epoch, offset = divmod(start + len(indices), num_items)
        order = torch.randperm(num_items, generator=generator(seed, epoch))
        indices += order[offset: offset + batch_size - len(indices)].tolist()
    return indices
