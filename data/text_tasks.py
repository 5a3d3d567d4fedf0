"""GSM8K, MATH500 and s1K: d1's prompts and loaders for local files, plus the pieces every task
shares (d1's format prompt, the uniform record, reading jsonl/parquet with errors that name the file
and line).

Files live in `data_dir` (default `data/files`, written by `python -m data.prepare --task X`):

| task | split | file (jsonl, or parquet when pyarrow is importable) | source |
| --- | --- | --- | --- |
| gsm8k | train, test | gsm8k_train, gsm8k_test | openai/gsm8k, config main |
| math500 | test | math500_test | HuggingFaceH4/MATH-500 |
| math500 | train | math500_train | ankner/math-500 (what d1's GRPO trains on) |
| s1k | train | s1k_train | simplescaling/s1K |

Prompt wordings are d1's, verbatim: training prompts from diffu-grpo/data_utils.py (and SFT/
sft_trainer.py for s1K), evaluation prompts from eval/gsm8k.py and eval/math500.py.
"""

import json
import os

from data.prepare import manual_instructions
from rewards import last_boxed_only_string, remove_boxed

# ---------------------------------------------------------------------------------------------------
# d1's prompts

# d1's GRPO format prompt (diffu-grpo/data_utils.py), prefixed to the user message.
SYSTEM_PROMPT = """
Respond in the following format:
<reasoning>
...
</reasoning>
<answer>
...
</answer>
"""

# d1's SFT format prompt (SFT/sft_trainer.py): the same with "Your reasoning here".
SFT_SYSTEM_PROMPT = """
Respond in the following format:
<reasoning>
Your reasoning here
</reasoning>
<answer>
...
</answer>
"""

# d1's evaluation prompts (eval/gsm8k.py, eval/math500.py), character for character: they differ only in
# a space before the first newline (GSM8K) and in MATH500's ending `</answer>" \n`, a stray quote in d1
# that we keep, since evaluation must see d1's prompt.
_BOXED_TASK = ("You are a math expert. You will be given a question to solve. Solve it step by step. "
               "Wrap the final answer in a \\boxed{}.")
_BOXED_FORMAT = ("Respond in the following format:\n<reasoning>\nYour reasoning here\n</reasoning>\n"
                 "<answer>\n\\boxed{...}\n</answer>")
GSM_SYSTEM_PROMPT = _BOXED_TASK + " \n" + _BOXED_FORMAT
MATH500_SYSTEM_PROMPT = _BOXED_TASK + "\n" + _BOXED_FORMAT + '" \n'

# d1's MATH training prompt adds this instruction after SYSTEM_PROMPT (note the space before \n\n).
MATH_TRAIN_INSTRUCTION = (
    "You are a math expert. You will be given a question to solve. Solve it step by step. "
    "Wrap the final answer in a \\boxed{}. \n\n"
)

EVAL_PREFILL = "<reasoning>"      # d1's eval appends this right after the assistant header
STYLES = ("train", "eval")

# ---------------------------------------------------------------------------------------------------
# The uniform record


def make_record(*, user_content, style, sft_text, question, ground_truth, **columns):
    """One example as every stage script consumes it.

    `sft_text` is the full SFT target text (or None). With style="eval" the prompt is followed by
    the prefill "<reasoning>", so the completion is what comes after it.
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    prefill = EVAL_PREFILL if style == "eval" else ""
    completion = sft_text
    if sft_text is not None and prefill and sft_text.startswith(prefill):
        completion = sft_text[len(prefill):]
    return {
        "prompt": [{"role": "user", "content": user_content}],
        "prefill": prefill,
        "completion": completion,
        "question": question,
        "ground_truth": ground_truth,
        **columns,
    }


# ---------------------------------------------------------------------------------------------------
# Reading files

def missing_file_error(task, path):
    """The FileNotFoundError a loader raises for a missing data file: says how to get it."""
    data_dir = os.path.dirname(path) or "."
    return FileNotFoundError(
        f"{path} not found. Run `python -m data.prepare --task {task} --data-dir {data_dir}`, "
        f"or download it by hand:\n{manual_instructions(task, data_dir)}")


def read_jsonl(path):
    """[(line_number, record), ...] of a jsonl file. A malformed line raises ValueError naming the
    file and line; blank lines carry no record and are passed over."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_number}: malformed JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
            records.append((line_number, record))
    return records


def read_parquet(path):
    """The rows of a parquet file (needs pyarrow), numbered from 1 like lines."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{path} is a parquet file and reading it needs pyarrow: `pip install pyarrow` "
                          f"(or convert it to jsonl)") from None
    return list(enumerate(pq.read_table(path).to_pylist(), start=1))


def read_task_file(task, data_dir, split, limit, splits=("train", "test")):
    """(path, [(line_number, record), ...]) of split's file, `data_dir/<task>_<split>.jsonl`, else `.parquet`;
    the first `limit` records."""
    if split not in splits:
        raise ValueError(f"{task} has the splits {', '.join(map(repr, splits))}, got {split!r}")
    stem = f"{task}_{split}"
    for ext, reader in ((".jsonl", read_jsonl), (".parquet", read_parquet)):
        path = os.path.join(data_dir, stem + ext)
        if os.path.exists(path):
            rows = reader(path)
            return path, rows if limit is None else rows[:limit]
    raise missing_file_error(task, os.path.join(data_dir, stem + ".jsonl"))


def read_test_file(task, path, read, limit):
    """read(path), d1's test file of a generated task, with the message that says how to get it when it
    is missing; the first `limit` records."""
    try:
        records = read(path)
    except FileNotFoundError:
        raise missing_file_error(task, path) from None
    return records if limit is None else records[:limit]


def field(path, line_number, record, name, kinds):
    """record[name], checked to be one of `kinds`, else an error naming the file and line."""
    if name not in record:
        raise ValueError(f"{path}:{line_number}: the record has no field {name!r} (fields: {sorted(record)})")
    value = record[name]
    if not isinstance(value, kinds):
        raise ValueError(f"{path}:{line_number}: field {name!r} has type {type(value).__name__}")
    return value


# ---------------------------------------------------------------------------------------------------
# GSM8K


def gsm8k_final_answer(solution):
    """The text after GSM8K's '####' (d1's extract_hash_answer), or None without one."""
    if "####" not in solution:
        return None
    return solution.split("####")[1].strip()


def gsm8k_examples(split, *, data_dir, style, limit):
    path, rows = read_task_file("gsm8k", data_dir, split, limit)
    records = []
    for line_number, row in rows:
        question = field(path, line_number, row, "question", str)
        solution = field(path, line_number, row, "answer", str)
        answer = gsm8k_final_answer(solution)
        if answer is None:
            raise ValueError(f"{path}:{line_number}: the answer does not end in '#### N'")
        try:
            # d1's eval parser stores the answer as a float (commas removed). d1's own regex drops a
            # leading minus sign and so stores None for negative answers; we keep the sign.
            ground_truth = float(answer.replace(",", ""))
        except ValueError:
            raise ValueError(f"{path}:{line_number}: the final answer {answer!r} is not a number") from None
        reasoning = solution.split("####")[0].strip()
        target = f"<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n{answer}\n</answer>\n"
        if style == "eval":
            user_content = GSM_SYSTEM_PROMPT + "\n\n" + question
            # d1's evaluation parser reads "1,005" as 1: box the number without thousands commas.
            boxed = answer.replace(",", "")
            target = f"<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n\\boxed{{{boxed}}}\n</answer>\n"
        else:
            user_content = SYSTEM_PROMPT + "\n\n" + question
        records.append(make_record(user_content=user_content, style=style, sft_text=target,
                                   question=question, ground_truth=ground_truth, answer=answer))
    return records


def coverage_split(task, split, train, test, num_sft, unit):
    """The items of a tiny task's split: `sft` the first num_sft training items (demonstrations cover part of
    the problem), `rl` all the training items, `test` the held-out ones. unit names them in errors."""
    if not 1 <= num_sft <= len(train):
        raise ValueError(f"num_sft_{unit} must be in 1..{len(train)}, got {num_sft}")
    items = {"sft": train[:num_sft], "rl": train, "test": test}.get(split)
    if items is None:
        raise ValueError(f"{task} has splits 'sft', 'rl' and 'test', got {split!r}")
    return items


# ---------------------------------------------------------------------------------------------------
# MATH500


def math500_examples(split, *, data_dir, style, limit):
    """MATH problems. The answer column is the last \\boxed{} of the solution in the training split (d1's
    rewards read it so), and in the test split the `answer` field when the file has one (MATH-500, as d1's
    evaluation)."""
    path, rows = read_task_file("math500", data_dir, split, limit)
    records = []
    for line_number, row in rows:
        problem = field(path, line_number, row, "problem", str)
        solution = field(path, line_number, row, "solution", str)
        if "answer" in row and split != "train":
            answer = field(path, line_number, row, "answer", str)
        else:
            boxed = last_boxed_only_string(solution)
            answer = remove_boxed(boxed) if boxed is not None and boxed != solution else None
            if not answer:
                raise ValueError(f"{path}:{line_number}: no 'answer' field and no \\boxed{{}} "
                                 "in the solution")
        if style == "eval":
            user_content = MATH500_SYSTEM_PROMPT + "\n\n" + problem
        else:
            user_content = SYSTEM_PROMPT + "\n\n" + MATH_TRAIN_INSTRUCTION + problem
        target = f"<reasoning>\n{solution.strip()}\n</reasoning>\n<answer>\n\\boxed{{{answer}}}\n</answer>\n"
        records.append(make_record(user_content=user_content, style=style, sft_text=target,
                                   question=problem, ground_truth=answer, answer=answer))
    return records


# ---------------------------------------------------------------------------------------------------
# s1K (SFT only)


def s1k_examples(split, *, data_dir, style, limit):
    """s1K's 1000 reasoning traces as d1's SFT uses them: the completion is
    `<reasoning>{thinking}</reasoning>\\n<answer>{attempt}</answer>` (no newlines inside the tags,
    as in d1's SFT/sft_trainer.py), `thinking` being the first trajectory when there is a list."""
    if style != "train":
        raise ValueError("s1k is an SFT data set: it has only style='train'")
    path, rows = read_task_file("s1k", data_dir, split, limit, splits=("train",))
    records = []
    for line_number, row in rows:
        question = field(path, line_number, row, "question", str)
        thinking = field(path, line_number, row, "thinking_trajectories", (list, str))
        if isinstance(thinking, list):
            if not thinking or not isinstance(thinking[0], str):
                raise ValueError(f"{path}:{line_number}: thinking_trajectories must hold at least one string")
            thinking = thinking[0]
        attempt = field(path, line_number, row, "attempt", str)
        target = f"<reasoning>{thinking}</reasoning>\n<answer>{attempt}</answer>"
        solution = row.get("solution") if isinstance(row.get("solution"), str) else None
        records.append(make_record(user_content=SFT_SYSTEM_PROMPT + "\n\n" + question, style=style,
                                   sft_text=target, question=question, ground_truth=solution))
    return records
