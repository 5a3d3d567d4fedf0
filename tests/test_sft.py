"""
Guards stage 1, `sft.py` (masked SFT), run as a script on the tiny preset (in process, or under torchrun):

- the loss path end to end: the run finishes and writes the final model in LLaDA's layout (config.json,
  model.safetensors, tokenizer files, training_args.json) to --out-dir, a resumable checkpoint-XXXXXX folder
  holding the same weights, and metrics.jsonl with one record per step (and the held-out accuracy on the
  last step);
- distributed: `torchrun --nproc_per_node=2 sft.py` keeps the parameters identical on both ranks, reaches the
  parameters of one process that uses the same micro-batches, and (the docstring's promise, "the same run
  over 2 CPU processes") the parameters of the plain one-process command with the same global batch; each
  rank has its own stream of torch's global RNG (LoRA dropout's), rank 0 the one-process run's;
- exact resume: a run killed with SIGKILL after its first checkpoint, whose out-dir also holds a
  half-written `.tmp-checkpoint-*` folder (a kill during a save), resumed with --resume, ends bitwise
  equal to the uninterrupted run, and its metrics.jsonl holds each step once;
- FSDP2 (--fsdp over 2 gloo ranks): the loss trajectory and parameters match the DDP run within float
  rounding of a different summation order (bounds justified in the test); --fsdp without torchrun is refused
  with a message;
- preemption: a real SIGTERM to the launcher of that 2-rank FSDP run stops both ranks after the same step
  with a checkpoint and a clean exit; --resume then ends bitwise equal to the uninterrupted FSDP run;
- multi-node: two torchrun launchers (--nnodes 2, c10d rendezvous on 127.0.0.1) end bitwise equal to one
  node of 2 processes;
- LoRA: an adapter folder in PEFT's format that checkpoint.load_model loads on its base and that changes the
  logits; LoRA on a preset (random weights) is refused; the same run pads to --max-seq-length (--pad-to
  max-length, d1's padding), so each step trains batch x max-seq-length tokens;
- d1's SFT sequence: data.sft_tokens on a tokenizer with LLaDA's chat template and special tokens equals
  d1's preprocess_dataset (written here as the slow reference: the template over user + assistant, padded
  to max_length with EOS and truncated; the prompt length from the template over the user turn plus "\n"),
  input ids and prompt lengths both, for a short example and one longer than max_length;
- --max-seconds stops early, its lr schedule runs over the time budget, and it still writes the final
  model;
- user errors (a batch that does not split, an unknown --model, a missing dataset) exit non-zero with a
  message and no traceback.
"""

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from helpers import (LLADA_LAYOUT, ROOT, RUN_TIMEOUT_S, assert_bitwise_equal, assert_clean_error,
                     assert_stopped_cleanly_by_sigterm, checkpoints, command, expected_lr, logged_steps,
                     max_difference, parameters, read_metrics, run_script, run_two_nodes, run_with_sigterm,
                     script_env, tiny_checkpoint)

import checkpoint as C
import data
import model as M

MAX_STEPS = 12  # enough steps after the first checkpoint (step 2) for a kill to land mid-run
TINY = ["--max-steps", MAX_STEPS, "--batch-size", 8, "--num-examples", 64, "--eval-examples", 8,
        "--save-every", 2]
RECORD_KEYS = ("step", "loss", "lr", "grad_norm", "dt_ms", "tokens", "tok_per_s")


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """The plain one-process run: the reference of the distributed and resume tests."""
    out = tmp_path_factory.mktemp("sft") / "one_rank"
    return out, run_script("sft.py", *TINY, "--out-dir", out)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The same command over 2 gloo ranks: micro-batches of 4 (batch 8 / 2 ranks)."""
    out = tmp_path_factory.mktemp("sft") / "two_ranks"
    return out, run_script("sft.py", *TINY, "--out-dir", out, nproc=2)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("sft") / "tiny")


# -----------------------------------------------------------------------------
# The loss path


def test_run_writes_final_model_checkpoint_and_metrics(one_rank):
    out, run = one_rank
    for name in LLADA_LAYOUT + ("training_args.json",):
        assert (out / name).is_file(), f"{name} missing from the final model folder"
    with open(out / "training_args.json") as f:
        training_args = json.load(f)
    assert training_args["max_steps"] == MAX_STEPS and training_args["batch_size"] == 8
    assert "args: {" in run.stdout  # the arguments are printed at start
    # a line every --log-every steps (default 10) and at the last step; metrics.jsonl holds every step
    assert f"step 00010/{MAX_STEPS}" in run.stdout and f"step {MAX_STEPS:05d}/{MAX_STEPS}" in run.stdout
    assert f"step 00005/{MAX_STEPS}" not in run.stdout

    # the final model loads back (weights and tokenizer), and training moved it from its random init
    final = parameters(out)
    tokenizer = C.load_tokenizer(str(out))
    start = dict(C.build_model("tiny", tokenizer, seed=0).named_parameters())
    assert max_difference(final, start) > 0

    # the newest resumable checkpoint is the final state: step MAX_STEPS, the same weights
    names = checkpoints(out)
    assert names and names[-1] == f"{C.CHECKPOINT_PREFIX}{MAX_STEPS:06d}", names
    checkpoint = out / names[-1]
    with open(checkpoint / "state.json") as f:
        assert json.load(f)["step"] == MAX_STEPS
    assert (checkpoint / "trainer_state.pt").is_file()
    assert_bitwise_equal(parameters(checkpoint / "model"), final)

    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(1, MAX_STEPS + 1))
    # the default schedule's warm-up (100 steps) spans the run
    assert [r["lr"] for r in records] == pytest.approx([expected_lr(s, 2e-3, 100, MAX_STEPS, "cosine")
                                                        for s in range(MAX_STEPS)])
    for record in records:
        for key in RECORD_KEYS:
            assert key in record, f"{key} missing from {record}"
            assert torch.isfinite(torch.tensor(float(record[key]))), record
        assert (record["loss"] > 0 and record["grad_norm"] > 0 and record["tok_per_s"] > 0
                and record["dt_ms"] > 0)
    assert "eval_accuracy" in records[-1] and 0.0 <= records[-1]["eval_accuracy"] <= 1.0
    assert all("eval_accuracy" not in r for r in records[:-1])  # --eval-every 100: only the last step


# -----------------------------------------------------------------------------
# Two ranks


def test_two_ranks_keep_parameters_identical(two_ranks):
    out, run = two_ranks
    assert "parameters identical on all 2 ranks" in run.output
    assert (out / "model.safetensors").is_file()
    assert [r["step"] for r in read_metrics(out)] == list(range(1, MAX_STEPS + 1))  # rank 0 alone logs


def test_each_rank_has_its_own_dropout_stream(one_rank, two_ranks):
    """torch's global RNG draws LoRA dropout alone, so its stream must differ across ranks (else every rank
    drops the same units); rank 0 keeps the one-process run's. Read from the RNG states a checkpoint saves."""
    def torch_rng(out):
        return [state["torch"] for state in C.load_trainer_state(str(out[0] / checkpoints(out[0])[-1]))
                ["trainer_state"]["rng"]]

    (alone,), (rank0, rank1) = torch_rng(one_rank), torch_rng(two_ranks)
    assert torch.equal(rank0, alone)
    assert not torch.equal(rank0, rank1)


def test_two_ranks_equal_one_rank_with_the_same_micro_batches(two_ranks, tmp_path):
    """One process with micro-batches of 4 (2 accumulated) sees the micro-batches the 2 ranks see, with the
    same masks: gradient averaging over ranks must give the parameters of local accumulation."""
    out, _ = two_ranks
    local = tmp_path / "one_rank_micro4"
    run_script("sft.py", *TINY, "--micro-batch-size", 4, "--eval-examples", 0, "--save-every", 0,
               "--out-dir", local)
    assert max_difference(parameters(out), parameters(local)) <= 1e-5


def test_two_ranks_equal_the_plain_one_rank_command(one_rank, two_ranks):
    """sft.py's docstring: `torchrun --nproc_per_node=2 sft.py` is "the same run" as `python sft.py`, the
    masks being drawn "so that a run is the same at any world size". With the default micro-batch
    (batch / world size) the micro-batches change with the world size, so the masks must be drawn for the
    global batch, not per micro-batch."""
    (one, _), (two, _) = one_rank, two_ranks
    difference = max_difference(parameters(one), parameters(two))
    assert difference <= 1e-5, f"2 ranks vs 1 rank, same global batch: max |diff| {difference:.3e}"


# -----------------------------------------------------------------------------
# Exact resume


def checkpoint_step(out):
    with open(out / checkpoints(out)[-1] / "state.json") as f:
        return json.load(f)["step"]


def past_a_checkpoint(out):
    """Whether a live run has a checkpoint and has logged a step after it (False while files are in
    motion)."""
    try:
        return bool(checkpoints(out)) and max(logged_steps(out), default=0) > checkpoint_step(out)
    except (FileNotFoundError, json.JSONDecodeError):  # a checkpoint replaced between listing and reading
        return False


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """The TINY command killed with SIGKILL after its first checkpoint, once it logged a later step; a
    half-written save planted beside its checkpoints; then the same command with --resume.
    Returns (out-dir, step resumed from, resumed run)."""
    tmp = tmp_path_factory.mktemp("sft")
    out = tmp / "killed"
    with open(tmp / "killed.log", "w") as log:
        proc = subprocess.Popen(command("sft.py", TINY + ["--out-dir", out]), cwd=ROOT, env=script_env(),
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + RUN_TIMEOUT_S
            # kill mid-run: once a checkpoint exists and a later step has been logged
            while not past_a_checkpoint(out):
                assert proc.poll() is None, "the run ended before a step past its first checkpoint"
                assert time.time() < deadline, "no checkpoint in time"
                time.sleep(0.002)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before the kill: nothing was interrupted"
    assert not (out / "model.safetensors").exists()
    newest = out / checkpoints(out)[-1]
    killed_at = checkpoint_step(out)
    assert killed_at < max(logged_steps(out)) < MAX_STEPS

    # a save cut short by a kill: a temporary folder with a truncated weights file and state
    half = out / f".tmp-{C.CHECKPOINT_PREFIX}k1ll3d"
    (half / "model").mkdir(parents=True)
    weights = (newest / "model" / "model.safetensors").read_bytes()
    (half / "model" / "model.safetensors").write_bytes(weights[: len(weights) // 3])
    (half / "model" / "config.json").write_bytes((newest / "model" / "config.json").read_bytes())
    (half / "trainer_state.pt").write_bytes((newest / "trainer_state.pt").read_bytes()[:100])
    (half / "state.json").write_text('{"step": 9')

    run = run_script("sft.py", *TINY, "--out-dir", out, "--resume")
    assert f"resumed from {newest} at step {killed_at}" in run.output
    assert not half.exists(), "the leftover of the killed save was not cleaned up by the next save"
    return out, killed_at, run


def test_resume_after_sigkill_and_half_written_save_is_bitwise_exact(one_rank, killed_and_resumed):
    (reference, _), (out, _, _) = one_rank, killed_and_resumed
    assert_bitwise_equal(parameters(out), parameters(reference))


def test_metrics_after_a_resume_hold_one_record_per_step(killed_and_resumed):
    """The killed run logged steps past its last checkpoint; the resumed run recomputes them. metrics.jsonl,
    which a plot reads, must not hold those steps twice."""
    out, killed_at, _ = killed_and_resumed
    steps = [r["step"] for r in read_metrics(out)]
    assert steps == list(range(1, MAX_STEPS + 1)), f"resumed at step {killed_at}; steps logged: {steps}"


def test_two_nodes_equal_one_node(two_ranks, tmp_path):
    """`torchrun --nnodes 2 --nproc_per_node 1 --rdzv-backend c10d` twice (two "nodes" on this machine, global
    ranks 0 and 1, LOCAL_RANK 0 on both) is the same run as one node of 2 processes, bitwise; only global
    rank 0 writes."""
    out = tmp_path / "two_nodes"
    runs = run_two_nodes("sft.py", *TINY, "--out-dir", out)
    assert sum("done:" in run.stdout for run in runs) == 1  # one writer across the nodes
    assert_bitwise_equal(parameters(out), parameters(two_ranks[0]))


# -----------------------------------------------------------------------------
# FSDP2 (--fsdp): full fine-tuning sharded over the ranks


FSDP = ["--fsdp", "--keep-checkpoints", 6]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """The 2-rank command with --fsdp, keeping every checkpoint (2, 4, ..., 12)."""
    out = tmp_path_factory.mktemp("sft") / "fsdp"
    return out, run_script("sft.py", *TINY, *FSDP, "--out-dir", out, nproc=2)


def test_fsdp_matches_ddp(two_ranks, fsdp_run):
    """FSDP shards weights, gradients and AdamW state, so the arithmetic is the same as DDP's except the
    order of a few fp32 sums: gradients are averaged by a reduce-scatter and the clipping norm sums per-rank
    slices, and AdamW's normalised steps keep such rounding differences from growing: the bounds are
    rounding-sized."""
    (ddp_out, _), (out, _) = two_ranks, fsdp_run
    assert checkpoints(out) == [f"{C.CHECKPOINT_PREFIX}{s:06d}" for s in range(2, MAX_STEPS + 1, 2)]
    fsdp_loss = [r["loss"] for r in read_metrics(out)]
    ddp_loss = [r["loss"] for r in read_metrics(ddp_out)]
    assert len(fsdp_loss) == MAX_STEPS and fsdp_loss == pytest.approx(ddp_loss, rel=1e-5)
    assert "eval_accuracy" in read_metrics(out)[-1]  # evaluation ran with the gathered weights
    assert max_difference(parameters(out), parameters(ddp_out)) <= 1e-6


def test_sigterm_to_torchrun_stops_both_ranks_and_fsdp_resume_is_bitwise_exact(fsdp_run, tmp_path):
    """A real SIGTERM to the torchrun launcher of the same 2-rank FSDP run (it forwards it to both workers, as
    SLURM's signal before a preemption) once step 3 is logged: both ranks stop after the same step and rank 0
    saves it (weights and AdamW state gathered); the same command with --resume (rank 0 reads, every rank
    keeps its slice) ends bitwise equal to the uninterrupted run."""
    out = tmp_path / "preempted"
    run = run_with_sigterm("sft.py", *TINY, *FSDP, "--out-dir", out, out_dir=out, after_step=3)
    stopped = assert_stopped_cleanly_by_sigterm(run, out, MAX_STEPS)
    resumed = run_script("sft.py", *TINY, *FSDP, "--out-dir", out, "--resume", nproc=2)
    assert (f"resumed from {out / (C.CHECKPOINT_PREFIX + f'{stopped:06d}')} at step {stopped}"
            in resumed.output)
    assert [r["step"] for r in read_metrics(out)] == list(range(1, MAX_STEPS + 1))
    assert_bitwise_equal(parameters(out), parameters(fsdp_run[0]))


# -----------------------------------------------------------------------------
# LoRA


def test_lora_writes_a_peft_adapter_that_loads_on_its_base(tiny_base, tmp_path):
    out = tmp_path / "lora"
    run_script("sft.py", "--model", tiny_base, "--lora-r", 4, "--lora-alpha", 8, "--max-steps", 3,
               "--batch-size", 8, "--num-examples", 32, "--eval-examples", 0, "--save-every", 0, "--lr", 1e-2,
               "--warmup-steps", 1, "--lr-schedule", "linear", "--pad-to", "max-length",
               "--max-seq-length", 64, "--out-dir", out)
    records = read_metrics(out)
    assert all(r["tokens"] == 8 * 64 for r in records)  # 22 prompt + 20 response tokens, 22 EOS pads
    assert [r["lr"] for r in records] == pytest.approx([expected_lr(s, 1e-2, 1, 3, "linear")
                                                        for s in range(3)])
    assert C.is_adapter(str(out)) and (out / "adapter_model.safetensors").is_file()
    with open(out / "adapter_config.json") as f:
        config = json.load(f)
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert os.path.samefile(config["base_model_name_or_path"], tiny_base)
    assert sorted(config["target_modules"]) == sorted(M.LORA_TARGETS)

    base = C.load_model(tiny_base).eval()
    tuned = C.load_model(str(out)).eval()
    lora = dict(M.lora_modules(tuned))
    assert len(lora) == base.cfg.n_layers * len(M.LORA_TARGETS)
    # PEFT's names and shapes: A (r, in), B (out, r)
    from safetensors.torch import load_file
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert len(saved) == 2 * len(lora)
    for name, module in lora.items():
        a = saved[f"base_model.model.model.transformer.{name}.lora_A.weight"]
        b = saved[f"base_model.model.model.transformer.{name}.lora_B.weight"]
        assert a.shape == (4, module.in_features) and b.shape == (module.out_features, 4)
    # the base weights are untouched; the adapters change the output
    tuned_base = {n: p for n, p in tuned.named_parameters() if "lora_" not in n}
    assert_bitwise_equal(tuned_base, dict(base.named_parameters()))
    tokenizer = C.load_tokenizer(tiny_base)
    ids = torch.tensor([data.encode_prompt(tokenizer, [{"role": "user", "content": "1200\n0034\n2000\n0001"}])
                        + [C.mask_token_id(tokenizer)] * 20])
    with torch.no_grad():
        assert not torch.allclose(tuned(ids), base(ids), atol=1e-4)
    # the resumable checkpoint holds the adapter, not a full model
    assert (out / checkpoints(out)[-1] / "adapter" / "adapter_model.safetensors").is_file()


def test_lora_on_a_preset_is_refused(tmp_path):
    run = run_script("sft.py", "--model", "tiny", "--lora-r", 4, "--out-dir", tmp_path / "out",
                     expect_ok=False)
    assert_clean_error(run, "--lora-r")
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# Time budget and user errors


def test_max_seconds_stops_early_and_writes_the_final_model(tmp_path):
    out = tmp_path / "timed"
    # a budget of several steps even on a loaded machine (a step takes 0.1-0.8 s here): the test reads the
    # schedule, not the clock
    run = run_script("sft.py", "--max-steps", 1000, "--max-seconds", 4, "--batch-size", 8,
                     "--num-examples", 64, "--lr", 1e-3, "--warmup-steps", 0, "--eval-examples", 8,
                     "--save-every", 0, "--out-dir", out, "--max-seq-length", 30, "--overlong", "truncate")
    records = read_metrics(out)
    steps = len(records)
    assert 2 <= steps < 1000
    # every example (22 prompt + 20 response tokens) is cut to 30 tokens, not dropped
    assert "64 examples (0 dropped, 64 truncated as longer than 30 tokens)" in run.stdout
    assert all(r["tokens"] == 8 * 30 for r in records)
    # the cosine schedule runs over the time budget, which ends first: it decays to near 10% of the peak
    lrs = [r["lr"] for r in records]
    assert lrs[0] > 0.95e-3 and lrs[-1] < 0.4e-3
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert "eval_accuracy" in records[-1]  # the early stop is a last step: it evaluates
    for name in LLADA_LAYOUT:
        assert (out / name).is_file()
    assert checkpoints(out)[-1] == f"{C.CHECKPOINT_PREFIX}{steps:06d}"
    assert f"done: {steps} steps" in run.stdout
    assert "/4 s" in run.stderr  # the progress bar counts the time budget, not the 1000 steps


@pytest.mark.parametrize("args, fragments", [
    (["--batch-size", 6, "--micro-batch-size", 4],
     ["--batch-size 6", "micro-batch-size x world size", "4 x 1"]),
    (["--model", "{tmp}/no-such-checkpoint"], ["{tmp}/no-such-checkpoint", "checkpoint folder"]),
    (["--task", "gsm8k", "--data-dir", "{tmp}/data"],
     ["{tmp}/data/gsm8k_train.jsonl not found", "data.prepare"]),
    (["--fsdp"], ["--fsdp", "torchrun"]),
], ids=["batch-does-not-split", "unknown-model", "missing-dataset", "fsdp-without-torchrun"])
def test_user_errors_exit_with_a_message(tmp_path, args, fragments):
    args = [str(a).replace("{tmp}", str(tmp_path)) for a in args]
    run = run_script("sft.py", *args, "--out-dir", tmp_path / "out", expect_ok=False)
    assert_clean_error(run, *[f.replace("{tmp}", str(tmp_path)) for f in fragments])


# -----------------------------------------------------------------------------
# d1's SFT sequence

# LLaDA-8B-Instruct's chat template (Llama 3's)
LLADA_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ "
    "message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def d1_preprocess(tokenizer, question, trajectory, max_length):
    """d1's SFT preprocess_dataset for one example: (input_ids, prompt_length)."""
    prompt = [{"role": "user", "content": question}]
    response = [{"role": "assistant", "content": trajectory}]
    inputs = tokenizer.apply_chat_template(prompt + response, tokenize=False)
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False) + "\n"
    input_ids = tokenizer(inputs, truncation=True, max_length=max_length, padding="max_length")["input_ids"]
    prompt_length = sum(tokenizer(prompt_text, truncation=True, max_length=max_length)["attention_mask"])
    return input_ids, prompt_length


def test_d1_sft_sequence_matches_d1_preprocessing():
    import copy

    tokenizer = copy.deepcopy(C.build_tiny_tokenizer())
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"]})
    tokenizer.chat_template = LLADA_CHAT_TEMPLATE
    tokenizer.padding_side = "right"  # d1 loads its tokenizer so, and pads with EOS
    assert tokenizer.pad_token == tokenizer.eos_token
    max_length = 160
    for question, trajectory in [("What is 2 + 3?", "<reasoning>2 + 3 = 5</reasoning>\n<answer>5</answer>"),
                                 ("Count to forty.",
                                  "<reasoning>" + " ".join(map(str, range(1, 41))) + "</reasoning>")]:
        example = {"prompt": [{"role": "user", "content": question}], "prefill": "", "completion": trajectory}
        expected_ids, expected_prompt_length = d1_preprocess(tokenizer, question, trajectory, max_length)
        prompt_ids, response_ids = data.sft_tokens(tokenizer, example)
        ids = (prompt_ids + response_ids)[:max_length]  # sft.py --overlong truncate
        ids += [tokenizer.eos_token_id] * (max_length - len(ids))  # sft.py --pad-to max-length
        assert ids == expected_ids
        assert len(prompt_ids) == expected_prompt_length
    # the second example is longer than max_length: truncated inside the reasoning, no <|eot_id|> left
    assert len(prompt_ids) + len(response_ids) > max_length
    # the reply is trained from inside the assistant header and ends with the template's end of turn
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert tokenizer.decode(response_ids).startswith("assistant<|end_header_id|>") and response_ids[-1] == eot
