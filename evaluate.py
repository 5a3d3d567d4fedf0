"""
Evaluation: greedy generations of a checkpoint on a task's test set, sharded over ranks, scored by the
same checkers GRPO's rewards use (rewards.py), and written as ONE file in d1's generations JSON format.

d1's settings are the defaults: temperature 0, block_length 32, steps = gen_length / 2, d1's evaluation
prompts with "<reasoning>" appended after the chat template; Sudoku on d1's 256 of its 500 puzzles, all of
Countdown's 256 problems, GSM8K and MATH500; the stored generation is the text of all gen_length tokens.

    python evaluate.py --model out/grpo                                      # the tiny default task
    torchrun --standalone --nproc_per_node=8 evaluate.py --model checkpoints/LLaDA-8B-Instruct \
        --task gsm8k --gen-length 256                                        # d1's 8B evaluation
    python evaluate.py --rescore results/                                    # score generation files

A generations file is `{"generations": [{question, prompt_input, generations, ground_truth}, ...]}`,
named `<setup>_<rank>_generations.json`; we write one gathered over ranks,
`<task>_<model>_<gen_length>_<steps>_0_generations.json` (d1 writes one per rank; see the README's table
of differences from d1). Rescoring pools a setup's files and reads the task from the setup's prefix
(countdown, gsm8k, math500 or d1's "math", sudoku, tiny_sudoku, tiny_countdown); accuracy is correct /
total, which for sudoku counts cells (correct empty cells / empty cells), as d1 reports it.
"""

import argparse
import glob
import json
import os
import re
import time

import torch
from tqdm import tqdm

import checkpoint as C
import data
import ddp
import dryrun
import model as M
import rewards
from generate import CACHE_MODES, forward_passes_per_token, generate_records

# ---------------------------------------------------------------------------------------------------
# Rescoring

GENERATIONS_FILE = re.compile(r"^(?P<setup>.+)_(?P<rank>\d+)_generations\.json$")
# Longest prefix first: "tiny_sudoku" before "sudoku", "math500" before d1's "math".
TASK_PREFIXES = (("tiny_sudoku", "tiny_sudoku"), ("tiny_countdown", "tiny_countdown"), ("sudoku", "sudoku"),
                 ("countdown", "countdown"), ("gsm8k", "gsm8k"), ("math500", "math500"), ("math", "math500"))


def task_of_setup(setup):
    """The task a setup name starts with."""
    for prefix, task in TASK_PREFIXES:
        if setup.startswith(prefix):
            return task
    raise ValueError(f"cannot tell the task of {setup!r}: its name must start with one of "
                     f"{[p for p, _ in TASK_PREFIXES]}")


def generation_files(paths):
    """The generation files named by `paths` (files, or folders holding *_generations.json),
    sorted and without duplicates."""
    files = set()
    for path in paths:
        if os.path.isdir(path):
            found = glob.glob(os.path.join(path, "*_generations.json"))
            if not found:
                raise FileNotFoundError(f"{path} holds no *_generations.json file")
            files.update(os.path.realpath(f) for f in found)
        elif os.path.isfile(path):
            files.add(os.path.realpath(path))
        else:
            raise FileNotFoundError(f"{path} does not exist")
    return sorted(files)


def puzzle_of_question(task, question):
    """The Sudoku puzzle a question holds. d1: the question itself when it starts with 16 digits,
    else the 16 digits after "Sudoku puzzle: ". tiny_sudoku: the first 16 digits (4 rows)."""
    if task == "tiny_sudoku":
        return rewards.first_digits(question)
    if len(question) >= 16 and question[:16].isdigit():
        return question[:16]
    match = re.search(r"Sudoku puzzle: ([0-9]{16})", question)
    if match is None:
        raise ValueError(f"no 16-digit Sudoku puzzle in the question {question[:80]!r}")
    return match.group(1)


def reward_columns(task, item):
    """The columns rewards.score needs, built from one generations-JSON item."""
    ground_truth = item["ground_truth"]
    if task in ("gsm8k", "math500"):
        return {"answer": ground_truth}
    if task in ("countdown", "tiny_countdown"):
        if isinstance(ground_truth, list) and len(ground_truth) == 2:
            numbers, target = ground_truth
        else:
            # d1's fallback: read "Numbers: [a, b, c]" and "Target: t" from the question.
            question = item.get("question", "")
            numbers_match = re.search(r"Numbers: \[([\d, ]+)\]", question, re.IGNORECASE)
            target_match = re.search(r"Target: (\d+)", question, re.IGNORECASE)
            numbers = [int(n) for n in numbers_match.group(1).split(",")] if numbers_match else []
            target = int(target_match.group(1)) if target_match else None
        return {"numbers": numbers, "target": target}
    return {"puzzle": puzzle_of_question(task, item["question"]), "solution": ground_truth}


def score_file(path, task):
    """(correct, total, number of generations) of one generations file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    items = data.get("generations") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON object with a 'generations' list")
    correct = total = 0
    for index, item in enumerate(items):
        try:
            columns = reward_columns(task, item)
            text = item["generations"]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: generation {index}: {err!r}") from None
        c, t = rewards.score(task, text, **columns)
        correct, total = correct + c, total + t
    return correct, total, len(items)


def rescore(paths):
    """One row per setup: {"setup", "task", "accuracy" (%), "correct", "total", "count", "files"}."""
    setups = {}
    for path in generation_files(paths):
        match = GENERATIONS_FILE.match(os.path.basename(path))
        if match is None:
            raise ValueError(f"{path}: a generations file is named <setup>_<rank>_generations.json")
        setups.setdefault(match.group("setup"), []).append(path)
    rows = []
    for setup, files in sorted(setups.items()):
        task = task_of_setup(setup)
        correct = total = count = 0
        for path in files:
            c, t, n = score_file(path, task)
            correct, total, count = correct + c, total + t, count + n
        rows.append({"setup": setup, "task": task, "accuracy": 100.0 * correct / total if total else 0.0,
                     "correct": correct, "total": total, "count": count, "files": len(files)})
    return rows


def format_table(rows):
    """The rows as a text table (accuracy to 2 decimals, as d1 prints it)."""
    header = f"{'setup':<44} {'accuracy':>9} {'correct/total':>15} {'count':>6} {'files':>5}"
    lines = [header, "-" * len(header)]
    for row in rows:
        fraction = f"{row['correct']}/{row['total']}"
        lines.append(f"{row['setup']:<44} {row['accuracy']:>8.2f}% {fraction:>15} "
                     f"{row['count']:>6} {row['files']:>5}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Generating and scoring (also called by sft.py and grpo.py for their held-out accuracy)


def encode_eval_prompt(tokenizer, example):
    """An evaluation prompt's ids as d1's evaluation makes them: the tokenizer called with its default
    add_special_tokens=True on the templated text (rollouts pass False, as TRL does)."""
    return data.encode_prompt(tokenizer, example["prompt"], example["prefill"], add_special_tokens=True)


@torch.no_grad()
def evaluate_examples(model, tokenizer, task, examples, *, gen_length, steps, block_length, batch_size,
                      device="cpu", progress=True, cache="none", threshold=None,
                      autocast_dtype=torch.bfloat16):
    """Greedy completions of `examples`, sharded over ranks (every world_size-th example), gathered and
    scored with rewards.score. Every rank returns the same dict: accuracy (fraction), correct, total,
    count, completions (in example order; the decoded text of all gen_length tokens, special tokens
    included, as d1 stores it), effective_tokens (mean tokens before the first stop token), tokens_per_s,
    wall_s, the sampler's cache and threshold (generate's fast-sampler options) with its
    forward_passes_per_token, and for Sudoku valid_rate (complete valid grids that keep the given cells).
    autocast_dtype is the GPU's autocast dtype (d1 evaluates under torch.autocast("cuda"), i.e. float16)."""
    rank, world = ddp.rank(), ddp.world_size()
    mask_id, stop_ids = C.mask_token_id(tokenizer), C.stop_token_ids(tokenizer)
    mine = list(range(len(examples)))[rank::world]
    prompts = {i: encode_eval_prompt(tokenizer, examples[i]) for i in mine}
    mine.sort(key=lambda i: len(prompts[i]))  # similar lengths together: less padding
    sampler = {"steps": steps, "gen_length": gen_length, "block_length": block_length, "temperature": 0.0,
               "cache": cache, "threshold": threshold}
    completions, lengths, stats = {}, {}, {}
    t0 = time.time()
    for b in tqdm(range(0, len(mine), batch_size), desc=f"eval {task}", disable=not progress or rank != 0,
                  dynamic_ncols=True):
        batch = mine[b:b + batch_size]
        try:
            with M.autocast(device, autocast_dtype):
                out, _, _ = generate_records(model, tokenizer, [examples[i] for i in batch], sampler,
                                             mask_id=mask_id, device=device, add_special_tokens=True,
                                             stats=stats)
        except torch.cuda.OutOfMemoryError:
            raise SystemExit(f"a batch of {len(batch)} prompts x {len(prompts[batch[-1]]) + gen_length} "
                             "tokens does not fit in GPU memory: lower --batch-size") from None
        for i, row in zip(batch, out[:, -gen_length:].tolist()):
            stop = next((j for j, t in enumerate(row) if t in stop_ids), len(row))
            # d1 stores all gen_length tokens decoded, special tokens included, and its parser reads that
            completions[i] = tokenizer.decode(row, skip_special_tokens=False)
            lengths[i] = stop
    wall = time.time() - t0
    gathered = ddp.gather_objects((completions, lengths, wall, stats))
    completions = {i: c for part, _, _, _ in gathered for i, c in part.items()}
    lengths = {i: n for _, part, _, _ in gathered for i, n in part.items()}
    completions = [completions[i] for i in range(len(examples))]
    wall = max(w for _, _, w, _ in gathered)
    stats = {key: sum(part.get(key, 0) for *_, part in gathered)
             for key in ("forward_passes", "row_forward_passes", "generated_tokens")}
    correct = total = valid = 0
    for example, text in zip(examples, completions):
        c, t = rewards.score(task, text, **data.record_columns(example))
        correct, total = correct + c, total + t
        if "puzzle" in example:
            valid += rewards.sudoku_valid(text, example["puzzle"])
    result = {"accuracy": correct / total if total else 0.0, "correct": correct, "total": total,
              "count": len(examples), "completions": completions,
              "effective_tokens": sum(lengths.values()) / max(len(lengths), 1),
              "tokens_per_s": len(examples) * gen_length / max(wall, 1e-9), "wall_s": wall,
              "cache": cache, "threshold": threshold,
              "forward_passes_per_token": forward_passes_per_token(stats)}
    if examples and "puzzle" in examples[0]:
        result["valid_rate"] = valid / len(examples)
    return result


def model_names(paths):
    """Short distinct names for checkpoint folders: the last path component, or as many of the last ones
    as it takes to tell them apart (out/seed0/grpo and out/seed1/grpo -> seed0/grpo, seed1/grpo)."""
    parts = [os.path.normpath(os.path.abspath(p)).split(os.sep) for p in paths]
    for depth in range(1, max(len(x) for x in parts) + 1):
        names = ["/".join(x[-depth:]) for x in parts]
        if len(set(names)) == len(names):
            return names
    return names


def write_generations(path, examples, result, tokenizer, settings):
    """One file in d1's generations JSON format, plus the settings, metrics and wall time."""
    items = [{"question": ex["question"],
              "prompt_input": tokenizer.decode(encode_eval_prompt(tokenizer, ex)),
              "generations": text, "ground_truth": ex["ground_truth"]}
             for ex, text in zip(examples, result["completions"])]
    metrics = {k: v for k, v in result.items() if k != "completions"}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"generations": items, "metrics": metrics, **settings}, f, indent=2)
    os.replace(tmp, path)


def dry_run(args, settings):
    """--dry-run: one sampler call at the evaluation's batch size, on fake tensors at the first --model's
    shape (its config.json alone), with bf16 weights under --autocast-dtype as on a GPU. Prints each phase's
    peak memory, FLOPs and H100 time; returns the exit status."""
    tokenizer, config = dryrun.checkpoint_shape(args.model[0])
    B, P = settings["batch_size"], args.dry_run_prompt_tokens
    records = dryrun.synthetic_prompts(tokenizer, B, P)
    sampler = {key: settings[key] for key in ("steps", "gen_length", "block_length", "cache", "threshold")}
    with dryrun.session() as run, dryrun.cuda_like_autocast(getattr(torch, args.autocast_dtype)):
        model = dryrun.build_model(config, torch.bfloat16)

        def sample():
            generate_records(model, tokenizer, records, {**sampler, "temperature": 0.0}, device="cpu",
                             mask_id=C.mask_token_id(tokenizer), max_prompt_length=P, add_special_tokens=True)

        notes = [f"one rank's sampler call: {B} prompts of {P} tokens"]
        notes += dryrun.sample_one_block(run, model, sample, sampler, prompt_length=P, name="evaluation")
    return dryrun.finish(run, args.dry_run_gpu_memory, notes)


# ---------------------------------------------------------------------------------------------------

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description="Evaluate a checkpoint with d1's settings, or rescore generation files.")
    parser.add_argument("--model", nargs="+",
                        help="checkpoint folder(s): ours, a LoRA adapter folder, or LLaDA's published "
                             "layout; several are evaluated in turn and compared in one table")
    parser.add_argument("--base-model", default=None,
                        help="the base model folder of adapter --model folders (default: the one each "
                             "adapter_config.json names; d1's adapters name a hub id)")
    parser.add_argument("--task", default="tiny_sudoku", choices=data.TASKS[:-1],
                        help="test set to evaluate on")
    parser.add_argument("--data-dir", default="data/files", help="where downloaded test sets live")
    parser.add_argument("--gen-length", type=int, default=None, help="tokens generated (d1: 128, 256, 512)")
    parser.add_argument("--steps", type=int, default=None,
                        help="diffusion steps (default gen_length / 2; tiny: 20)")
    parser.add_argument("--block-length", type=int, default=None, help="semi-autoregressive block (d1: 32)")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per sampler call on one rank")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples")
    parser.add_argument("--cache", default="none", choices=CACHE_MODES,
                        help="the sampler's key/value cache (generate.py): none, prefix or dual")
    parser.add_argument("--threshold", type=float, default=None,
                        help="confidence-threshold parallel decoding: commit every position at least this "
                             "confident (Fast-dLLM: 0.9); default: the fixed step schedule")
    parser.add_argument("--autocast-dtype", default="bfloat16", choices=["bfloat16", "float16"],
                        help="the sampler's autocast dtype on GPUs (d1's evaluation: float16); CPUs run fp32")
    parser.add_argument("--output-dir", default="out/eval", help="where the generations file is written")
    parser.add_argument("--rescore", nargs="+", metavar="PATH",
                        help="score generation files (or folders of *_generations.json) instead of "
                             "generating")
    dryrun.add_flags(parser, world_size=False)
    args = parser.parse_args()
    if args.rescore:
        try:
            print(format_table(rescore(args.rescore)))
        except (FileNotFoundError, ValueError) as err:
            raise SystemExit(f"--rescore: {err}") from None
        raise SystemExit(0)
    if not args.model:
        parser.error("--model is required (or --rescore)")
    if args.threshold is not None and not 0 < args.threshold <= 1:
        raise SystemExit(f"--threshold {args.threshold}: a confidence in (0, 1] (Fast-dLLM uses 0.9)")
    for path in args.model:
        if not os.path.isdir(path):
            raise SystemExit(f"--model {path!r} is not a folder (a checkpoint or adapter folder)")

    rank, world_size, device = ddp.init()
    defaults = data.generation_defaults(args.task)
    gen_length = args.gen_length or defaults["gen_length"]
    settings = {"gen_length": gen_length,
                "steps": args.steps or (gen_length // 2 if args.gen_length else defaults["steps"]),
                "block_length": args.block_length or min(defaults["block_length"], gen_length),
                "batch_size": args.batch_size or defaults["batch_size"], "cache": args.cache,
                "threshold": args.threshold}
    if args.dry_run:  # one sampler call on fake tensors at the checkpoint's shape, then stop
        if ddp.is_distributed():
            raise SystemExit("--dry-run runs as one process (a rank's sampler call): python evaluate.py "
                             "--dry-run ...")
        raise SystemExit(dry_run(args, settings))
    try:
        examples = data.test_examples(args.task, args.data_dir, args.limit)
    except (FileNotFoundError, ValueError) as err:  # a bad or missing test file: the message says what to do
        raise SystemExit(str(err)) from None
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    summary = {}
    for model_path, name in zip(args.model, model_names(args.model)):
        tokenizer = C.load_tokenizer(model_path, args.base_model)
        model = C.load_model(model_path, device, dtype, args.base_model).eval()
        ddp.print0(f"evaluating {model_path} on {args.task}: {len(examples)} examples over {world_size} "
                   f"rank(s), {settings}")
        result = evaluate_examples(model, tokenizer, args.task, examples, device=device,
                                   autocast_dtype=getattr(torch, args.autocast_dtype), **settings)
        del model
        if rank == 0:
            tag = re.sub(r"[^A-Za-z0-9.-]+", "-", name)
            # fast-sampler runs get their own file
            sampler = ("" if args.cache == "none" else f"_{args.cache}") + (
                "" if args.threshold is None else f"_t{args.threshold:g}")
            path = os.path.join(args.output_dir, f"{args.task}_{tag}_{gen_length}_{settings['steps']}"
                                                 f"{sampler}_0_generations.json")
            write_generations(path, examples, result, tokenizer,
                              {"model_path": model_path, "task": args.task, "world_size": world_size,
                               "autocast_dtype": args.autocast_dtype, **settings})
            print(format_table(rescore([path])))
            line = (f"effective tokens {result['effective_tokens']:.1f} | {result['tokens_per_s']:.1f} "
                    f"generated tok/s | {result['forward_passes_per_token']:.3f} forward passes per "
                    f"generated token | wall {result['wall_s']:.1f}s")
            if "valid_rate" in result:
                line += f" | valid complete solutions {100 * result['valid_rate']:.2f}%"
            print(line)
            print(f"wrote {path}")
            summary[name] = 100 * result["accuracy"]
    if rank == 0 and len(summary) > 1:  # the comparison, one column per checkpoint
        print(f"\nheld-out accuracy (%) on {args.task}, {len(examples)} examples")
        print(" | ".join(f"{name:>14}" for name in summary))
        print(" | ".join(f"{acc:>14.1f}" for acc in summary.values()))
    ddp.cleanup()
