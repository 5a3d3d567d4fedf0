"""
Guards stage 2, diffu-GRPO: `grpo_loss` and `estimator_input` from grpo.py, and `grpo.py` run as a script
(in process, or under torchrun).

- grpo_loss equals a slow reference written here with Python loops over rows and tokens (loss, KL, clip
  fraction, and the gradient with respect to the log-probs), on hand-made numbers: advantages of both signs
  and zero, ratios inside and outside the clip range (one between 1 + epsilon and 1 + epsilon_high),
  beta 0 and > 0, a completion mask with zeros;
- estimator_input (d1's one-pass estimator input): every completion token masked, conditioning tokens
  (the prompt, and given canvas tokens) masked at p_mask_prompt (statistically, on a big batch), the
  unmasked ones untouched, the mask a function of the generator's seed alone, p_mask_prompt 0 leaving the
  prompt intact;
- grpo.py from a saved tiny checkpoint whose completions earn some reward (helpers.digit_checkpoint), each
  run exiting 0 with the metrics every record must hold:
  (a) the default path (full fine-tuning, mu 2, beta > 0, the frozen starting model as reference):
      first_ratio_error exactly 0.0 in every record, a non-zero KL once the policy moved, the final model
      in LLaDA's layout; the same run syncs its reference after 4 optimiser steps (e, full training): the
      saved reference is exactly alpha policy + (1 - alpha) start;
  exact resume of that run: 3 uninterrupted steps vs 2 steps then the same command with `--max-steps 3
  --resume` (the final checkpoint of the 2-step run is its step-2 state): bitwise equal parameters;
  (b) + (d) + (e) LoRA with mu = 1 and beta > 0 (a crash in d1) and --sync-ref-every 1: an adapter folder
      that checkpoint.load_model loads on its base, a KL against the reference, a mixed reference adapter;
      its rollouts use the fast sampler (--rollout-cache dual --rollout-threshold): fewer forward passes
      per token;
  (c) + (f) beta = 0 (no reference pass: 4 forward passes per update) with --scale-rewards group, run over
      2 gloo ranks, which keep the parameters identical;
- the advantages are centred per group: greedy rollouts (identical completions, equal rewards > 0) with beta 0
  leave the weights bitwise unchanged;
- multi-node: two torchrun launchers of one process each (--nnodes 2, c10d on 127.0.0.1) end bitwise equal
  to that 2-rank run;
- FSDP2 (--fsdp, beta > 0, 2 gloo ranks): the sharded reference is mixed slice by slice into exactly
  alpha policy + (1 - alpha) start; preemption: a real SIGTERM to the launcher of that run stops both ranks
  after the same step with a checkpoint, and --resume ends bitwise equal to the uninterrupted FSDP run;
- user errors: a missing --model folder points to `python sft.py`. (--prompts-per-step not divisible by the
  world size is not run here: a third 2-process launch costs ~6 CPU-seconds of the suite's budget.)
"""

import math
import os
import shutil

import pytest
import torch
from helpers import (LLADA_LAYOUT, assert_bitwise_equal, assert_clean_error,
                     assert_stopped_cleanly_by_sigterm, checkpoints, digit_checkpoint, expected_lr,
                     max_difference, parameters, read_metrics, run_script, run_two_nodes, run_with_sigterm)

import checkpoint as C
import model as M
import rewards
from grpo import estimator_input, grpo_loss

# mu 2 and beta > 0 pinned (the paths under test); temperature pinned so that groups have a reward spread
TINY = ["--prompts-per-step", 2, "--num-generations", 4, "--num-iterations", 2, "--beta", 0.04,
        "--temperature", 0.9, "--eval-examples", 4, "--eval-every", 0]
RECORD_KEYS = ("prompt_length", "reward", "reward_std", "zero_std_ratio", "kl", "clip_ratio",
               "completion_length", "lr", "grad_norm", "rollout_s", "update_s", "tok_per_s", "loss",
               "first_ratio_error")


# -----------------------------------------------------------------------------
# grpo_loss against a slow reference


def slow_grpo_loss(logp, old_logp, ref_logp, advantages, mask, epsilon, epsilon_high, beta):
    """d1 eq. 3 token by token: (loss, kl, clip fraction, d loss / d logp as nested lists)."""
    rows, tokens = len(logp), len(logp[0])
    count = sum(mask[i][t] for i in range(rows) for t in range(tokens))
    loss = kl = clipped = 0.0
    grad = [[0.0] * tokens for _ in range(rows)]
    for i in range(rows):
        a = advantages[i][0]
        for t in range(tokens):
            if mask[i][t] == 0:
                continue
            ratio = math.exp(logp[i][t] - old_logp[i][t])
            bounded = min(max(ratio, 1 - epsilon), 1 + epsilon_high)
            clip_active = bounded * a < ratio * a  # the clipped term is the smaller one: it sets the min
            term = -min(ratio * a, bounded * a)
            slope = 0.0 if clip_active else -ratio * a  # d/dlogp of -ratio*a; a clipped term is constant
            if beta > 0:
                delta = ref_logp[i][t] - logp[i][t]
                kl_tok = math.exp(delta) - delta - 1
                term += beta * kl_tok
                kl += kl_tok
                slope += beta * (1 - math.exp(delta))
            loss += term
            clipped += clip_active
            grad[i][t] = slope / count
    return loss / count, kl / count, clipped / count, grad


# ratios per token: below 1 - eps, inside, exactly 1, between 1 + eps and 1 + eps_high, above 1 + eps_high
RATIOS = [[0.5, 0.85, 1.0, 1.25, 1.6],
          [1.6, 1.25, 0.5, 0.95, 1.1],
          [0.7, 1.3, 1.0, 1.05, 0.9],
          [1.25, 0.5, 1.6, 0.79, 1.35]]
ADVANTAGES = [[1.5], [-0.7], [0.0], [-2.0]]
MASK = [[1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0]]


@pytest.mark.parametrize("beta", [0.0, 0.04, 0.5])
def test_grpo_loss_equals_slow_reference(beta):
    epsilon, epsilon_high = 0.2, 0.28
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(4, 5, generator=g, dtype=torch.float64) * 3 - 0.1
    old_logp = logp - torch.tensor(RATIOS, dtype=torch.float64).log()
    ref_logp = logp + torch.randn(4, 5, generator=g, dtype=torch.float64) * 0.5
    advantages = torch.tensor(ADVANTAGES, dtype=torch.float64)
    mask = torch.tensor(MASK, dtype=torch.float64)

    x = logp.clone().requires_grad_(True)
    loss, kl, clip_fraction = grpo_loss(x, old_logp, ref_logp if beta > 0 else None, advantages, mask,
                                          epsilon, epsilon_high, beta)
    loss.backward()
    want_loss, want_kl, want_clip, want_grad = slow_grpo_loss(
        logp.tolist(), old_logp.tolist(), ref_logp.tolist(), ADVANTAGES, MASK, epsilon, epsilon_high, beta)
    assert float(loss.detach()) == pytest.approx(want_loss, rel=1e-12, abs=1e-15)
    assert float(kl) == pytest.approx(want_kl, rel=1e-12, abs=1e-15)
    assert float(clip_fraction) == pytest.approx(want_clip, rel=1e-12)
    assert torch.allclose(x.grad, torch.tensor(want_grad, dtype=torch.float64), rtol=1e-10, atol=1e-15)
    assert not kl.requires_grad and not clip_fraction.requires_grad
    # the hand-made numbers exercise what they should: some clipped, some not; a KL only when beta > 0
    assert 0 < want_clip < 1
    assert (want_kl > 0) == (beta > 0)


def test_grpo_loss_epsilon_high_is_the_upper_bound():
    """A ratio of 1.25 with a positive advantage is clipped at epsilon_high 0.2 and not at 0.28."""
    logp = torch.zeros(1, 1, dtype=torch.float64)
    old = logp - math.log(1.25)
    one = torch.ones(1, 1, dtype=torch.float64)
    _, _, clipped_low = grpo_loss(logp, old, None, one, one, 0.2, 0.2, 0.0)
    _, _, clipped_high = grpo_loss(logp, old, None, one, one, 0.2, 0.28, 0.0)
    assert float(clipped_low) == 1.0 and float(clipped_high) == 0.0


# -----------------------------------------------------------------------------
# The estimator's input

MASK_ID = 2
PROMPT_LENGTH = 100


def sequences(rows=256, length=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 100, (rows, length), generator=g)  # never the mask id


def conditioning(x, canvas_columns=()):
    """is_prompt (N, L): the prompt columns, plus given canvas tokens inside the completion (infilling)."""
    is_prompt = torch.zeros_like(x, dtype=torch.bool)
    is_prompt[:, :PROMPT_LENGTH] = True
    for column in canvas_columns:
        is_prompt[:, column] = True
    return is_prompt


@pytest.mark.parametrize("p_mask_prompt", [0.15, 0.5])
def test_estimator_input_masks_the_completion_and_a_fraction_of_the_prompt(p_mask_prompt):
    x = sequences()
    is_prompt = conditioning(x, canvas_columns=(105, 110))
    out = estimator_input(x, is_prompt, p_mask_prompt, MASK_ID, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert (out[~is_prompt] == MASK_ID).all()  # every completion token (the policy's actions) masked
    masked = out == MASK_ID
    assert torch.equal(out[~masked], x[~masked])  # what is not masked is untouched
    rate = masked[is_prompt].double().mean().item()  # 26,112 draws: standard error < 0.0032
    assert abs(rate - p_mask_prompt) < 0.015, rate
    # canvas tokens are conditioning too: masked at the prompt's rate, not always
    canvas_rate = masked[:, [105, 110]].double().mean().item()  # 512 draws: standard error < 0.023
    assert abs(canvas_rate - p_mask_prompt) < 0.1, canvas_rate
    # every row gets its own draws
    assert len({tuple(row.tolist()) for row in masked[:, :PROMPT_LENGTH]}) > 200


def test_estimator_input_is_a_function_of_the_seed():
    x = sequences(rows=32)
    is_prompt = conditioning(x)

    def draw(seed, p=0.15):
        return estimator_input(x, is_prompt, p, MASK_ID, torch.Generator().manual_seed(seed))

    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))
    # p_mask_prompt 0: the prompt intact; 1: everything masked
    assert torch.equal(draw(7, 0.0)[:, :PROMPT_LENGTH], x[:, :PROMPT_LENGTH])
    assert (draw(7, 1.0) == MASK_ID).all()


# -----------------------------------------------------------------------------
# grpo.py end to end


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    return digit_checkpoint(tmp_path_factory.mktemp("grpo") / "digits")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("grpo")


def grpo(start, out, *args, **kwargs):
    return run_script("grpo.py", "--model", start, *TINY, *args, "--out-dir", out, **kwargs)


def check_records(out, steps, evaluated=True):
    records = read_metrics(out)
    if evaluated:  # with held-out evaluation on, the first record is the starting checkpoint's accuracy
        assert set(records[0]) == {"step", "eval_accuracy"} and records[0]["step"] == 0
        records = records[1:]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    names = [f"rewards/{fn.__name__}" for fn, _ in rewards.reward_functions("tiny_sudoku")]
    for record in records:
        for key in RECORD_KEYS + tuple(names):
            assert key in record, f"{key} missing from {record}"
            assert math.isfinite(record[key]), record
    return records


def trainer_state(out):
    return C.load_trainer_state(str(out / checkpoints(out)[-1]))["trainer_state"]


def distance(a, b):
    return sum(float((a[k].detach() - b[k].detach()).double().pow(2).sum()) for k in a)


# Full fine-tuning, mu 2, beta > 0; the reference is the frozen starting model for steps 1-2, then synced
# after 4 optimiser steps (--sync-ref-every counts optimiser steps, 2 per rollout step at mu 2) so that
# step 3 and the resume also exercise a mixed reference.
REF_MIX_ALPHA = 0.6
DEFAULT = ["--save-every", 2, "--sync-ref-every", 4, "--ref-mix-alpha", REF_MIX_ALPHA]


@pytest.fixture(scope="module")
def default_run(start, workdir):
    """Run A: 3 steps, a checkpoint at step 2, the final one at step 3."""
    out = workdir / "default"
    return out, grpo(start, out, *DEFAULT, "--max-steps", 3)


@pytest.fixture(scope="module")
def two_steps(start, workdir):
    """Run B, first half: the same command with --max-steps 2 (its final checkpoint is step 2)."""
    out = workdir / "two_steps"
    return out, grpo(start, out, *DEFAULT, "--max-steps", 2)


def test_default_path(default_run, start):
    out, run = default_run
    records = check_records(out, 3)
    assert all(r["rollout_forward_passes_per_token"] >= 1 for r in records)  # the plain sampler's schedule
    # the policy has not moved at the first inner iteration: old and current log-probs are the same numbers
    assert all(r["first_ratio_error"] == 0.0 for r in records)
    # the digit model earns rewards with a spread inside groups, so advantages and the update are not zero
    assert any(r["reward_std"] > 0 for r in records) and all(r["grad_norm"] > 0 for r in records)
    assert max(r["kl"] for r in records) > 0  # beta > 0: the reference is read, and the policy moved from it
    assert all(r["update_forward_passes"] == 6 for r in records)  # mu 2 x (old, reference, current)
    # the schedule: 5 warm-up optimiser steps, then cosine over 3 x mu 2; a record holds its last inner
    # step's lr
    assert [r["lr"] for r in records] == pytest.approx([expected_lr(2 * s + 1, 3e-4, 5, 6, "cosine")
                                                        for s in range(3)])
    assert all(0 <= r["clip_ratio"] <= 1 and 0 <= r["zero_std_ratio"] <= 1 for r in records)
    # tiny_sudoku is infilling: the policy's tokens are the blank cells alone (6..10), not the given cells
    assert all(0 < r["completion_length"] <= 10 for r in records)
    # <bos><user>, 4 rows of 4 digits and 3 newlines, <assistant>
    assert all(r["prompt_length"] == 22 for r in records)
    assert "eval_accuracy" in records[-1]
    for name in LLADA_LAYOUT + ("training_args.json",):
        assert (out / name).is_file()
    assert checkpoints(out)[-1] == f"{C.CHECKPOINT_PREFIX}{3:06d}"
    assert max_difference(parameters(out), parameters(start)) > 0
    assert "done: model in" in run.stdout
    # a line every --log-every steps (default 10) and at the last step
    assert "step 00003/3" in run.stdout and "step 00001/3" not in run.stdout


def test_full_reference_sync_mixes_the_policy_in(two_steps, start):
    """After step 2 (4 optimiser steps, --sync-ref-every 4) the saved reference is alpha policy + (1 - alpha)
    starting model (TRL's mix-up), not the starting model (d1's sync is a no-op with LoRA). Were rollout steps
    counted, no sync would have happened yet."""
    out, _ = two_steps
    reference = trainer_state(out)["ref_model"]
    policy, initial = parameters(out), parameters(start)
    assert reference is not None and reference.keys() == policy.keys()
    assert distance(policy, initial) > 0
    for name in policy:
        mixed = REF_MIX_ALPHA * policy[name] + (1 - REF_MIX_ALPHA) * initial[name]
        assert torch.allclose(reference[name], mixed, rtol=0, atol=1e-6), name


def test_resume_is_bitwise_exact(default_run, two_steps, start, workdir):
    """Run B, second half: the same command with --max-steps 3 --resume: step 3 is recomputed from the saved
    weights, optimizer, RNG, synced reference and step alone, and must equal run A's."""
    (reference, _), (half, _) = default_run, two_steps
    assert checkpoints(half) == [f"{C.CHECKPOINT_PREFIX}{2:06d}"]
    out = workdir / "resumed"
    shutil.copytree(half, out)
    run = grpo(start, out, *DEFAULT, "--max-steps", 3, "--resume")
    assert f"resumed from {os.path.join(str(out), C.CHECKPOINT_PREFIX + '000002')} at step 2" in run.output
    check_records(out, 3)
    assert_bitwise_equal(parameters(out), parameters(reference))


def test_lora_mu_1_with_beta_and_reference_sync(start, workdir):
    """LoRA (d), mu = 1 with beta > 0 (b: a crash in d1), --sync-ref-every 1 with LoRA (e): the reference
    is the base (adapters off) at step 1, then the base plus a dense mix of the policy's deltas B A (the
    exactness of the mix is test_model.py's). --max-prompt-length 12 keeps the last 12 prompt tokens of
    every rollout."""
    out = workdir / "lora"
    grpo(start, out, "--lora-r", 4, "--num-iterations", 1, "--sync-ref-every", 1, "--max-steps", 2,
         "--eval-examples", 0, "--save-every", 0, "--max-prompt-length", 12, "--rollout-cache", "dual",
         "--rollout-threshold", 0.2, "--lr-schedule", "constant", "--warmup-steps", 1)
    records = check_records(out, 2, evaluated=False)
    assert [r["lr"] for r in records] == pytest.approx([3e-4, 3e-4])  # d1's schedule: constant after warm-up
    assert all(r["update_forward_passes"] == 2 for r in records)  # mu 1: no old pass; reference and current
    assert all(r["prompt_length"] == 12 for r in records)
    # the digit writer is >= 0.2 confident of a digit in every blank: all of a rollout's blanks in one
    # pass (the plain sampler: one pass per blank of its longest row, more than 1 per token)
    assert all(0 < r["rollout_forward_passes_per_token"] < 0.5 for r in records)
    assert records[-1]["kl"] > 0  # the reference pass ran with mu = 1 and differs from the moved policy
    assert C.is_adapter(str(out)) and os.path.samefile(C.adapter_base(str(out)), start)
    tuned, base = C.load_model(str(out)), C.load_model(start)
    assert M.lora_modules(tuned)
    assert_bitwise_equal({n: p for n, p in tuned.named_parameters() if "lora_" not in n},
                         dict(base.named_parameters()))
    adapter = C.adapter_state(tuned)
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)  # the adapters trained
    # the synced reference: per adapted layer a dense delta that mixes the policy's deltas, nearer them
    # than zero
    reference = trainer_state(out)["ref_deltas"]
    policy = {name: m.delta_weight() for name, m in M.lora_modules(tuned)}
    assert reference.keys() == policy.keys() and all(reference[k].shape == policy[k].shape for k in policy)
    zero = {k: torch.zeros_like(v) for k, v in policy.items()}
    assert 0 < distance(reference, policy) < distance(zero, policy)


TWO_RANKS = ["--beta", 0, "--scale-rewards", "group", "--max-steps", 2, "--save-every", 0]


@pytest.fixture(scope="module")
def two_ranks(start, workdir):
    """2 gloo ranks, one prompt (one whole group) each: the reference of the preemption and multi-node
    tests."""
    out = workdir / "two_ranks"
    return out, grpo(start, out, *TWO_RANKS, nproc=2)


def test_two_ranks_with_beta_0_and_group_scaled_rewards(two_ranks):
    """2 gloo ranks keep the parameters identical; beta 0 skips the reference pass (c); --scale-rewards
    group (f) runs."""
    out, run = two_ranks
    assert "parameters identical on all 2 ranks" in run.output
    records = check_records(out, 2)  # rank 0 alone writes
    assert all(r["update_forward_passes"] == 4 for r in records)  # mu 2 x (old, current): no reference pass
    assert all(r["first_ratio_error"] == 0.0 for r in records)
    assert "eval_accuracy" in records[-1]  # the held-out evaluation is sharded over the ranks too
    assert (out / "model.safetensors").is_file()


def test_identical_completions_give_zero_advantages_and_no_update(start, workdir):
    """Greedy rollouts make the G completions of a prompt identical, so each group's rewards are equal and the
    advantages r - mean(group) are all zero: with beta 0 the loss has no gradient and the weights do not move.
    (Advantages left uncentred, or centred over the wrong axis, would be the positive rewards themselves.)"""
    out = workdir / "greedy"
    grpo(start, out, "--temperature", 0, "--beta", 0, "--weight-decay", 0, "--max-steps", 1,
         "--eval-examples", 0, "--save-every", 0)
    record = check_records(out, 1, evaluated=False)[0]
    assert record["reward"] > 0 and record["reward_std"] == 0.0 and record["zero_std_ratio"] == 1.0
    assert record["grad_norm"] == 0.0
    assert_bitwise_equal(parameters(out), parameters(start))


def test_two_nodes_equal_one_node(two_ranks, start, workdir):
    """Two torchrun launchers of one process each (--nnodes 2, c10d rendezvous on 127.0.0.1): bitwise the run
    of one node with 2 processes (rollout noise comes from the global rank)."""
    out = workdir / "two_nodes"
    run_two_nodes("grpo.py", "--model", start, *TINY, *TWO_RANKS, "--out-dir", out)
    check_records(out, 2)
    assert_bitwise_equal(parameters(out), parameters(two_ranks[0]))


# the reference synced after step 3 (6 optimiser steps at mu 2), where a checkpoint is written too
FSDP = ["--fsdp", "--beta", 0.04, "--sync-ref-every", 6, "--save-every", 3, "--keep-checkpoints", 2,
        "--max-steps", 4]


@pytest.fixture(scope="module")
def fsdp_run(start, workdir):
    """The 2-rank run with --fsdp and beta > 0: the reference copy sharded too, mixed after step 3."""
    out = workdir / "fsdp"
    return out, grpo(start, out, *TWO_RANKS, *FSDP, nproc=2)


def test_fsdp_shards_the_reference_and_mixes_it_slice_by_slice(fsdp_run, start):
    """Under FSDP the policy and the reference are both sharded; the reference saved at step 3 (gathered)
    is exactly alpha policy + (1 - alpha) start, as in the unsharded run
    (test_full_reference_sync_mixes_the_policy_in)."""
    out, run = fsdp_run
    records = check_records(out, 4)
    assert max(r["kl"] for r in records) > 0 and all(r["first_ratio_error"] == 0.0 for r in records)
    step3 = out / f"{C.CHECKPOINT_PREFIX}000003"
    reference = C.load_trainer_state(str(step3))["trainer_state"]["ref_model"]
    policy, initial = parameters(step3 / "model"), parameters(start)
    assert distance(policy, initial) > 0
    for name in policy:
        mixed = REF_MIX_ALPHA * policy[name] + (1 - REF_MIX_ALPHA) * initial[name]
        assert torch.allclose(reference[name], mixed, rtol=0, atol=1e-6), name


def test_sigterm_to_torchrun_stops_both_ranks_and_fsdp_resume_is_bitwise_exact(fsdp_run, start, workdir):
    """A real SIGTERM to the launcher of the same 2-rank FSDP run (forwarded to both workers) once step 1 is
    logged: both ranks stop after step 1 or 2 with a checkpoint (not a --save-every step: the preemption saves
    anyway; weights, AdamW state and reference gathered on rank 0); the same command with --resume (rank 0
    reads, every rank keeps its slice; the reference is synced after step 3) ends bitwise equal to the
    uninterrupted run."""
    out = workdir / "preempted"
    run = run_with_sigterm("grpo.py", "--model", start, *TINY, *TWO_RANKS, *FSDP, "--out-dir", out,
                           out_dir=out, after_step=1)
    stopped = assert_stopped_cleanly_by_sigterm(run, out, 4)
    resumed = grpo(start, out, *TWO_RANKS, *FSDP, "--resume", nproc=2)
    assert f"at step {stopped}" in resumed.output
    check_records(out, 4)
    assert_bitwise_equal(parameters(out), parameters(fsdp_run[0]))


def test_missing_model_points_to_sft(tmp_path):
    run = run_script("grpo.py", "--model", tmp_path / "no-sft-yet", "--out-dir", tmp_path / "out",
                     expect_ok=False)
    assert_clean_error(run, "python sft.py", str(tmp_path / "no-sft-yet"))
