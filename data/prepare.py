"""Fetch the data files that `data.load_examples` reads into --data-dir (default data/files).

    python -m data.prepare --task gsm8k --data-dir data/files
    python -m data.prepare --task math500     # MATH-500 test (+ the MATH train split d1's GRPO uses)
    python -m data.prepare --task s1k         # s1K, for masked SFT
    python -m data.prepare --task countdown   # d1's test file: printed instructions
    python -m data.prepare --task sudoku      # d1's test file: printed instructions

GSM8K, MATH and s1K come from the Hugging Face Hub through `huggingface_hub` when it is installed and
the machine is online; otherwise (or with HF_HUB_OFFLINE=1) this prints what to download by hand and
where to put it. d1's Countdown and Sudoku test sets live in the d1 repository's dataset/ folder and
are always fetched by hand; their training problems are generated, nothing to download. tiny_sudoku
needs no files at all. Files are stored under our names with their original format (jsonl or
parquet; reading parquet needs pyarrow).
"""

import argparse
import fnmatch
import glob
import json
import os
import shutil
import sys
import tempfile

# task -> [(hub dataset, file pattern inside it, our file stem), ...]
HUB_FILES = {
    "gsm8k": [("openai/gsm8k", "main/train-*.parquet", "gsm8k_train"),
              ("openai/gsm8k", "main/test-*.parquet", "gsm8k_test")],
    "math500": [("HuggingFaceH4/MATH-500", "test.jsonl", "math500_test"),
                ("ankner/math-500", "*train*", "math500_train")],
    "s1k": [("simplescaling/s1K", "*train*.parquet", "s1k_train")],
}
D1_DATASET_URL = "https://raw.githubusercontent.com/dllm-reasoning/d1/main/dataset"
# task -> [(file name in d1's dataset/ folder, which is also our file name), ...]
D1_FILES = {
    "countdown": ["countdown_cd3_test.jsonl"],
    "sudoku": ["4x4_test_sudoku.csv"],
}
TASKS = tuple(HUB_FILES) + tuple(D1_FILES)
OFFLINE_VALUES = ("1", "true", "yes", "on")


def manual_instructions(task, data_dir):
    """What to download by hand for `task`, and where to save it, as printable lines."""
    if task in D1_FILES:
        return "\n".join(f"  {D1_DATASET_URL}/{name}  ->  save as {os.path.join(data_dir, name)}"
                         for name in D1_FILES[task])
    if task in HUB_FILES:
        lines = []
        for repo, pattern, stem in HUB_FILES[task]:
            ext = ".parquet" if pattern.endswith(".parquet") else ".jsonl (or .parquet)"
            lines.append(f"  https://huggingface.co/datasets/{repo}/tree/main  file {pattern}  ->  "
                         f"save as {os.path.join(data_dir, stem)}{ext}")
        return "\n".join(lines)
    raise ValueError(f"unknown task {task!r}; tasks: {TASKS}")


def _existing(data_dir, stem):
    for ext in (".jsonl", ".parquet"):
        if os.path.exists(os.path.join(data_dir, stem + ext)):
            return os.path.join(data_dir, stem + ext)
    return None


def _save_shards(shards, data_dir, stem):
    """Store one downloaded file under our name; several parquet shards become one jsonl."""
    if len(shards) == 1:
        ext = ".parquet" if shards[0].endswith(".parquet") else ".jsonl"
        destination = os.path.join(data_dir, stem + ext)
        shutil.copyfile(shards[0], destination)
        return destination
    import pyarrow.parquet as pq  # several shards: only parquet datasets come sharded
    destination = os.path.join(data_dir, stem + ".jsonl")
    with open(destination + ".tmp", "w", encoding="utf-8") as f:
        for shard in sorted(shards):
            for row in pq.read_table(shard).to_pylist():
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(destination + ".tmp", destination)
    return destination


def download_from_hub(task, data_dir):
    """Download every Hub file of `task` into data_dir; returns the paths written."""
    from huggingface_hub import snapshot_download

    written = []
    for repo, pattern, stem in HUB_FILES[task]:
        if _existing(data_dir, stem):
            print(f"{_existing(data_dir, stem)} exists, skipped")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            snapshot_download(repo_id=repo, repo_type="dataset", allow_patterns=[pattern], local_dir=tmp)
            shards = [p for p in glob.glob(os.path.join(tmp, "**", "*"), recursive=True)
                      if os.path.isfile(p) and fnmatch.fnmatch(os.path.relpath(p, tmp), pattern)]
            if not shards:
                raise FileNotFoundError(f"{repo} has no file matching {pattern}")
            written.append(_save_shards(shards, data_dir, stem))
            print(f"wrote {written[-1]}")
    return written


def prepare(task, data_dir):
    """Fetch or explain the files of one task. Returns 0 when every file is in place, else 1."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {TASKS}")
    os.makedirs(data_dir, exist_ok=True)
    if task in D1_FILES:
        missing = [n for n in D1_FILES[task] if not os.path.exists(os.path.join(data_dir, n))]
        print(f"{task}: training problems are generated by data.load_examples; nothing to download.")
        if not missing:
            print(f"{task}: the test file is in place.")
            return 0
        print(f"{task}: download d1's test set by hand:\n{manual_instructions(task, data_dir)}")
        return 1
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in OFFLINE_VALUES
    try:
        import huggingface_hub  # noqa: F401
        have_hub = True
    except ImportError:
        have_hub = False
    if offline or not have_hub:
        reason = "HF_HUB_OFFLINE is set" if offline else "huggingface_hub is not installed"
        print(f"{task}: cannot download ({reason}). Download by hand:\n{manual_instructions(task, data_dir)}")
        return 0 if all(_existing(data_dir, stem) for _, _, stem in HUB_FILES[task]) else 1
    try:
        download_from_hub(task, data_dir)
    except Exception as err:     # offline, unknown repo, rate limit...: say what to do instead
        print(f"{task}: download failed ({type(err).__name__}: {err}).\n"
              f"Download by hand:\n{manual_instructions(task, data_dir)}")
        return 1
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Fetch the data files of a task into --data-dir.")
    parser.add_argument("--task", required=True, choices=TASKS, help="which task's files to fetch")
    parser.add_argument("--data-dir", default="data/files", help="folder that load_examples reads")
    args = parser.parse_args()
    sys.exit(prepare(args.task, args.data_dir))
