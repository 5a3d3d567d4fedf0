"""
Guards `--dry-run` (dryrun.py wired into sft.py, grpo.py and evaluate.py): each command of the README's 8B
recipe runs its first step on fake tensors at LLaDA-8B-Instruct's exact shape (a config.json this test
writes; the tokenizer is the tiny one, its ids inside LLaDA's vocabulary; the prompts are synthesised) and
fits an 80 GB GPU:

- SFT on s1K (LoRA r 128, 1 x 4096, checkpointing): fits, under the 23.5 GiB it peaked at before its loss kept
  only the bf16 logits; and the FSDP command (full fine-tuning over 8 ranks, torch's fake process group);
- GRPO at d1's per-GPU settings, one rank of 8, mu 12 (gsm8k, math500) and mu 8 (countdown, sudoku: the dry
  run reads no task data, so two tasks stand for four), with its 14,960 TFLOP per step; and each method of
  objectives.py on those settings, as its authors run it (SPG at mu 4, JustGRPO at mu 1 without KL);
- evaluation at 512 tokens, batch 64: the recipe's command (float16 autocast) fits, and with `--cache dual`
  the first pass of a block, which keeps every layer's keys and values, peaks under 42 GiB (the cache held
  once);
- the flags on tiny shapes: --dry-run-world-size sets the rank's share of the batch, --dry-run-prompt-tokens
  the prompts' length, and --dry-run-gpu-memory makes a phase that does not fit exit 1 with a message;
- a folder without config.json, or an adapter folder, is refused with a message saying what to do.
"""

import json
import re

import pytest
from helpers import assert_clean_error, digit_checkpoint, run_script

import checkpoint as C
import model as M

ROW = re.compile(r"^(?P<phase>\S.*?)(?: x\d+)?\s+(?P<peak>\d+\.\d+)\s+(?P<after>\d+\.\d+)\s+"
                 r"(?P<tflop>\d+\.\d+)\s", re.M)
TOTAL = re.compile(r"^total\s+(?P<tflop>\d+\.\d+)\s", re.M)


@pytest.fixture(scope="module")
def llada_8b(tmp_path_factory):
    """LLaDA-8B-Instruct's config.json (no weights) and a tokenizer."""
    path = tmp_path_factory.mktemp("llada-8b")
    C.save_tokenizer(C.build_tiny_tokenizer(), str(path))
    (path / "config.json").write_text(json.dumps(M.ModelConfig().to_llada()))
    return str(path)


def peaks(run):
    """{phase: peak GiB} of a dry run's report."""
    found = {m["phase"].strip(): float(m["peak"]) for m in ROW.finditer(run.stdout) if m["phase"] != "total"}
    assert found, run.describe()
    return found


SFT = ["--task", "s1k", "--lora-r", 128, "--lora-alpha", 256, "--lora-dropout", 0.05,
       "--lora-targets", "q_proj,k_proj,v_proj", "--batch-size", 8, "--micro-batch-size", 1, "--lr", 1e-5,
       "--lr-schedule", "linear", "--warmup-steps", 0, "--adam-beta2", 0.999, "--max-seq-length", 4096,
       "--pad-to", "max-length", "--overlong", "truncate", "--grad-checkpointing", "--max-steps", 2500,
       "--eval-examples", 0]
GRPO = ["--lora-r", 128, "--lora-alpha", 64, "--lora-targets", "q_proj,k_proj,v_proj,up_proj",
        "--prompts-per-step", 16, "--num-generations", 6, "--gradient-accumulation-steps", 2,
        "--max-prompt-length", 200, "--max-completion-length", 256, "--block-length", 32,
        "--diffusion-steps", 128, "--temperature", 0.9, "--beta", 0.04, "--epsilon", 0.5, "--lr", 3e-6,
        "--lr-schedule", "constant_with_warmup", "--warmup-ratio", 0.0001, "--grad-checkpointing"]


def test_sft_recipe_fits(llada_8b):
    run = run_script("sft.py", "--dry-run", "--dry-run-world-size", 8, "--model", llada_8b, *SFT)
    found = peaks(run)
    assert set(found) == {"forward and backward of a micro-batch", "optimiser step"}
    assert 14.9 < max(found.values()) < 23.5  # the bf16 weights, and less than the fp32 loss copies took


def test_sft_fsdp_command_fits(llada_8b):
    run = run_script("sft.py", "--dry-run", "--dry-run-world-size", 8, "--model", llada_8b, "--task", "s1k",
                     "--fsdp", "--batch-size", 32, "--micro-batch-size", 1, "--max-seq-length", 4096,
                     "--grad-checkpointing", "--eval-examples", 0)
    found = peaks(run)
    # one rank of 8: weights, gradients and AdamW's moments in fp32 sharded, 16 N / 8 = 14.9 GiB at the end
    assert 14.9 < found["optimiser step"] < 30, run.stdout


@pytest.mark.parametrize("task, mu", [("gsm8k", 12), ("countdown", 8)])
def test_grpo_recipe_fits(llada_8b, task, mu):
    run = run_script("grpo.py", "--dry-run", "--dry-run-world-size", 8, "--model", llada_8b, "--task", task,
                     "--num-iterations", mu, *GRPO)
    found = peaks(run)
    assert {"rollout: first pass of a block", "rollout: other passes", "old and reference log-probs",
            "update: one of mu steps", "optimiser step"} == set(found)
    assert max(found.values()) < 79
    assert "2 prompts (12 rollouts) per rank | micro-batch 6 x 2" in run.stdout  # one rank of 8
    tflop = float(TOTAL.search(run.stdout)["tflop"])
    assert tflop == pytest.approx(10230 + 1963 * mu / 12 + 2767 * mu / 12, rel=0.01)


def without(flags, *names):
    """flags less each --name and its value."""
    out, skip = [], False
    for flag in flags:
        if skip:
            skip = False
        elif flag in names:
            skip = True
        else:
            out.append(flag)
    return out


RATIO_FREE = without(GRPO, "--beta", "--epsilon")
METHODS = {  # objectives.py's methods on the recipe's flags (mu 12, gsm8k), each as its authors run it
    "coupled": [*GRPO, "--estimator", "coupled"],
    "wd1": [*RATIO_FREE, "--objective", "wd1"],
    "d2": [*GRPO, "--estimator", "stepmerge", "--merge-chunks", 8],
    "spg": [*RATIO_FREE, "--estimator", "spg", "--objective", "spg", "--num-iterations", 4],
    "justgrpo": [*without(GRPO, "--block-length", "--diffusion-steps", "--beta"), "--estimator", "ar",
                 "--rollout-order", "left-to-right", "--p-mask-prompt", 0, "--num-iterations", 1,
                 "--beta", 0],
    "igpo": [*GRPO, "--inpaint-zero-std-groups"],
}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_fits_at_the_recipes_shape(llada_8b, method):
    run = run_script("grpo.py", "--dry-run", "--dry-run-world-size", 8, "--model", llada_8b,
                     "--task", "gsm8k", "--num-iterations", 12, *METHODS[method])
    found = peaks(run)
    assert 14.9 < max(found.values()) < 79, run.stdout  # the bf16 weights, and under an H100's memory
    d1 = 10230 + 1963 + 2767  # TFLOP of d1's step at mu 12 (test_grpo_recipe_fits)
    tflop = float(TOTAL.search(run.stdout)["tflop"])
    print(f"{method}: peak {max(found.values()):.1f} GiB, {tflop:.0f} TFLOP a step ({tflop / d1:.2f} x d1)")
    if method == "justgrpo":  # one forward row per completion position, 256 x d1's single one, left to right
        assert "the first of its 256 chunks of positions" in run.stdout and tflop > 4 * d1
    elif method in ("coupled", "d2"):  # 2 and 8 forward passes per estimate against d1's 1
        assert tflop > 1.2 * d1


@pytest.mark.parametrize("cache, limit", [("none", 79), ("dual", 42)])
def test_evaluation_at_512_tokens_fits(llada_8b, cache, limit):
    args = ["--dry-run", "--model", llada_8b, "--task", "gsm8k", "--gen-length", 512, "--batch-size", 64,
            "--cache", cache]
    run = run_script("evaluate.py", *args, *(["--autocast-dtype", "float16"] if cache == "none" else []))
    found = peaks(run)
    assert max(found.values()) < limit, run.stdout
    if cache == "dual":  # the block's first pass keeps 32 layers x 2 x (64 x 712 x 4096) bf16: 22.3 GiB
        assert found["evaluation: first pass of a block"] > 14.9 + 22.3


# -----------------------------------------------------------------------------
# The flags, on tiny shapes


def test_dry_run_world_size_and_prompt_tokens(tmp_path):
    out = ["--out-dir", tmp_path / "out"]  # a dry run writes nothing there
    one = run_script("sft.py", "--dry-run", "--batch-size", 8, "--dry-run-prompt-tokens", 50, *out)
    eight = run_script("sft.py", "--dry-run", "--batch-size", 8, "--dry-run-world-size", 8, *out)
    assert "a micro-batch of 8 x 4096 tokens, prompts of 50, x 1 accumulated" in one.stdout
    assert "a micro-batch of 1 x 4096 tokens, prompts of 200, x 1 accumulated" in eight.stdout
    start = digit_checkpoint(tmp_path / "digits")
    grpo = run_script("grpo.py", "--dry-run", "--model", start, "--dry-run-world-size", 2,
                      "--dry-run-prompt-tokens", 30, *out)
    assert "4 prompts (32 rollouts) per rank" in grpo.stdout and "prompts of 30 tokens" in grpo.stdout
    assert not (tmp_path / "out").exists()


def test_a_phase_that_does_not_fit_exits_1(tmp_path):
    start = digit_checkpoint(tmp_path / "digits")
    run = run_script("evaluate.py", "--dry-run", "--model", start, "--dry-run-gpu-memory", 0.0001,
                     expect_ok=False)
    assert run.returncode == 1 and "DOES NOT FIT" in run.stdout
    assert_clean_error(run, "--dry-run-gpu-memory")


def test_missing_config_and_adapter_folders_are_refused(tmp_path):
    C.save_tokenizer(C.build_tiny_tokenizer(), str(tmp_path))
    run = run_script("evaluate.py", "--dry-run", "--model", tmp_path, expect_ok=False)
    assert_clean_error(run, "config.json", "tokenizer files")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "x"}))
    run = run_script("grpo.py", "--dry-run", "--model", tmp_path, expect_ok=False)
    assert_clean_error(run, "adapter folder", "merge")
