"""
Guards JustGRPO's exact likelihood (objectives.py, `grpo.py --estimator ar`; Ni et al. 2026):

- ar_logprobs equals a slow reference written here (one single-row forward per row and completion position of
  the state the sampler saw: the past clean, actions from the position on [MASK], a canvas's given tokens and
  the prompt visible; log-softmax over the vocabulary less [MASK] at that position), with left-padded prompts
  under an attention mask, a canvas, a subset of the rows, and 1, 3 or all T positions per chunk;
- its gradients, through the checkpointed chunks (with and without the model's own gradient checkpointing),
  equal those of a plain loop of forwards;
- ar_input is deterministic (the generator unused), never masks the prompt, and refuses p_mask_prompt > 0;
- the sampler and the estimator agree: at temperature 1 with block length 1 and steps = gen_length,
  llada_generate's pass for position t reads exactly the estimator's state for t (commits that position
  alone, skips a canvas's given ones), and the log-probability of the token it drew under its own logits
  equals the estimator's: the likelihood is that of what was sampled;
- grpo.py end to end on the tiny task (gen_length 20): --estimator ar with mu 1 and beta 0 (JustGRPO's
  gradient) runs with T = 20 forward rows per estimate and the first ratio exactly 1, and with mu 2 and
  beta > 0 the no-grad old read equals the checkpointed current one bitwise (first ratio 1);
- `--rollout-order left-to-right` is block length 1 with gen_length steps: the same run as those flags given
  by hand, and it refuses other block lengths or steps;
- the refusals: block length or steps that are not left to right, a cache or a threshold, p_mask_prompt > 0.
"""

import math

import pytest
import torch
from helpers import TWO_STEPS, assert_clean_error, read_metrics, run_script

import checkpoint as C
import generate as G
import objectives

PROMPT_LENGTHS = (6, 9, 9, 4)  # left-padded to 9 under an attention mask
T = 7  # completion length
CANVAS_COLUMN = 2  # a given completion position (conditioning, not an action) in rows 1 and 3


@pytest.fixture
def mask_id(tokenizer):
    return C.mask_token_id(tokenizer)


def toy_batch(mask_id, seed=0):
    """sequences (N, P + T) of left-padded prompts and completions that never hold [MASK], their attention
    mask (N, P + T), is_prompt (N, P + T) (the prompt and a canvas column of rows 1 and 3), and P."""
    g = torch.Generator().manual_seed(seed)
    P, N = max(PROMPT_LENGTHS), len(PROMPT_LENGTHS)
    sequences = torch.randint(mask_id + 1, mask_id + 40, (N, P + T), generator=g)
    attention_mask = torch.ones(N, P + T, dtype=torch.long)
    for i, length in enumerate(PROMPT_LENGTHS):
        attention_mask[i, :P - length] = 0
        sequences[i, :P - length] = 0  # the pad (EOS) id
    is_prompt = torch.zeros(N, P + T, dtype=torch.bool)
    is_prompt[:, :P] = True
    is_prompt[[1, 3], P + CANVAS_COLUMN] = True
    return sequences, attention_mask, is_prompt, P


def slow_logprobs(model, sequences, attention_mask, is_prompt, P, mask_id, rows):
    """The obvious reading, a Python loop over rows and positions: row i's state before position P + t is
    its tokens before P + t, and from there on its conditioning tokens or [MASK]; one forward of that single
    row over every position, log-softmax at P + t with [MASK] left out (the sampler never draws it)."""
    out = []
    for i in rows:
        row = []
        for t in range(sequences.shape[1] - P):
            x = sequences[i].clone()
            for j in range(P + t, len(x)):
                if not is_prompt[i, j]:
                    x[j] = mask_id
            logits = model(x[None], attention_mask[i:i + 1])[0, P + t].clone()  # (V,)
            logits[mask_id] = -math.inf
            row.append(torch.log_softmax(logits, dim=-1)[sequences[i, P + t]])
        out.append(torch.stack(row))
    return torch.stack(out)  # (n, T)


@pytest.mark.parametrize("per_chunk", [1, 3, T])
@pytest.mark.parametrize("rows", [slice(None), [0, 2, 3]])
def test_ar_logprobs_equal_slow_reference(make_model, mask_id, monkeypatch, per_chunk, rows):
    model = make_model(seed=1)
    sequences, attention_mask, is_prompt, P = toy_batch(mask_id)
    n = len(range(len(sequences))[rows]) if isinstance(rows, slice) else len(rows)
    monkeypatch.setattr(objectives, "AR_FORWARD_ROWS", n * per_chunk)
    calls = []

    def counted(inputs, *args):  # the model, counting each forward's rows
        calls.append(len(inputs))
        return model(inputs, *args)

    estimate = objectives.ar_input(sequences, is_prompt, 0.0, mask_id, torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = objectives.ar_logprobs(counted, estimate, rows, sequences, attention_mask, P)
        slow = slow_logprobs(model, sequences, attention_mask, is_prompt, P, mask_id,
                             range(len(sequences))[rows] if isinstance(rows, slice) else rows)
    assert fast.shape == (n, T)
    assert (fast - slow).abs().max().item() < 1e-5
    # one forward row per sequence and position, per_chunk positions of every sequence per forward
    assert sum(calls) == n * T and len(calls) == math.ceil(T / per_chunk)


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_gradients_through_checkpointed_chunks_equal_a_plain_loop(make_model, mask_id, monkeypatch,
                                                                  grad_checkpointing):
    model = make_model(seed=2)
    model.gradient_checkpointing = grad_checkpointing
    sequences, attention_mask, is_prompt, P = toy_batch(mask_id, seed=1)
    weights = torch.linspace(-1, 1, len(sequences))[:, None] * (~is_prompt[:, P:]).float()  # (N, T)
    monkeypatch.setattr(objectives, "AR_FORWARD_ROWS", 3 * len(sequences))
    estimate = objectives.ar_input(sequences, is_prompt, 0.0, mask_id, None)
    logp = objectives.ar_logprobs(model, estimate, slice(None), sequences, attention_mask, P)  # checkpointed
    (weights * logp).sum().backward()
    fast = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing = False
    (weights * slow_logprobs(model, sequences, attention_mask, is_prompt, P, mask_id,
                             range(len(sequences)))).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad.abs().max() > 0, name
        assert torch.allclose(fast[name], p.grad, rtol=1e-4, atol=1e-6), name


def test_ar_input_is_deterministic_and_keeps_the_prompt(mask_id):
    sequences, _, is_prompt, P = toy_batch(mask_id)
    (first, returned_id), (second, _) = (objectives.ar_input(sequences, is_prompt, 0.0, mask_id,
                                                             torch.Generator().manual_seed(seed))
                                         for seed in (0, 1))
    assert torch.equal(first, second) and returned_id == mask_id
    assert torch.equal(first[is_prompt], sequences[is_prompt])  # the prompt and the canvas as sampled
    assert (first[~is_prompt] == mask_id).all()  # every action masked
    with pytest.raises(ValueError, match="p_mask_prompt must be 0"):
        objectives.ar_input(sequences, is_prompt, 0.15, mask_id, torch.Generator())


def test_sampler_draws_with_the_estimators_likelihood(make_model, mask_id):
    """The exactness claim: what llada_generate reads and draws at step t is the estimator's term t."""
    model = make_model(seed=3)
    sequences, attention_mask, is_prompt, P = toy_batch(mask_id, seed=2)
    canvas = torch.where(is_prompt[:, P:], sequences[:, P:], mask_id)  # given cells in rows 1 and 3
    passes = []

    def recording(inputs, mask, positions):
        logits = model(inputs, mask, positions)
        passes.append((inputs.clone(), positions, logits.clone()))
        return logits

    out = G.generate(recording, sequences[:, :P], steps=T, gen_length=T, block_length=1, temperature=1.0,
                     mask_id=mask_id, attention_mask=attention_mask[:, :P], canvas=canvas,
                     generator=torch.Generator().manual_seed(0))
    assert (out != mask_id).all() and torch.equal(out[:, P:][is_prompt[:, P:]], canvas[is_prompt[:, P:]])
    template, _ = objectives.ar_input(out, is_prompt, 0.0, mask_id, None)
    with torch.no_grad():
        estimated = objectives.ar_logprobs(model, (template, mask_id), slice(None), out, attention_mask, P)
    actions = ~is_prompt[:, P:]  # (N, T)
    assert len(passes) == T  # every position has an action in some row
    compared = 0
    for t, (inputs, positions, logits) in enumerate(passes):
        assert positions == slice(P + t, P + t + 1)  # step t reads position t alone
        # the state: the drawn tokens before t, the template from t on
        assert torch.equal(inputs[:, :P + t], out[:, :P + t])
        assert torch.equal(inputs[:, P + t:], template[:, P + t:])
        logits = logits[:, 0].clone()  # (N, V)
        logits[:, mask_id] = -math.inf  # the sampler's own distribution (generate.float64_chunks)
        drawn = torch.log_softmax(logits, dim=-1).gather(1, out[:, P + t, None]).squeeze(1)  # (N,)
        rows = actions[:, t]
        assert (drawn[rows] - estimated[rows, t]).abs().max().item() < 1e-5
        compared += int(rows.sum())
    assert compared == int(actions.sum())


# -----------------------------------------------------------------------------
# grpo.py end to end, and the refusals

AR = ["--estimator", "ar", "--rollout-order", "left-to-right", "--p-mask-prompt", 0]
TINY = [*TWO_STEPS, "--temperature", 1.0]


def test_grpo_with_the_exact_likelihood(start, tmp_path):
    out = tmp_path / "ar"
    run_script("grpo.py", "--model", start, *TINY, *AR, "--num-iterations", 1, "--beta", 0, "--out-dir", out)
    records = read_metrics(out)
    assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)
    # mu 1, beta 0: the current policy's estimate alone, one forward row per completion position (T = 20)
    assert all(r["update_forward_passes"] == 20 for r in records)


def test_grpo_old_and_reference_reads_equal_the_checkpointed_one(start, tmp_path):
    out = tmp_path / "ar-mu2"
    run_script("grpo.py", "--model", start, *TINY, *AR, "--num-iterations", 2, "--beta", 0.04,
               "--out-dir", out)
    records = read_metrics(out)
    # old (no grad) and current (checkpointed) reads of the unmoved policy: bitwise equal
    assert all(r["first_ratio_error"] == 0.0 for r in records)
    assert all(r["update_forward_passes"] == 2 * 3 * 20 for r in records)  # mu x (old, reference, current)


def test_rollout_order_left_to_right_is_block_length_1_and_a_step_per_position(start, tmp_path):
    runs = {}
    for name, order in [("flag", ["--rollout-order", "left-to-right"]),
                        ("explicit", ["--block-length", 1, "--diffusion-steps", 20])]:
        run_script("grpo.py", "--model", start, *TINY, "--estimator", "ar", "--p-mask-prompt", 0, *order,
                   "--out-dir", tmp_path / name)
        runs[name] = [{k: v for k, v in r.items() if not k.endswith("_s") and k != "tok_per_s"}
                      for r in read_metrics(tmp_path / name)]
    assert runs["flag"] == runs["explicit"]  # (the task's default order, one block of 20, ar refuses)


@pytest.mark.parametrize("flags, fragments", [
    (["--estimator", "ar", "--p-mask-prompt", 0], ["--rollout-order left-to-right", "20 steps"]),
    (["--estimator", "ar", "--block-length", 1, "--diffusion-steps", 40, "--p-mask-prompt", 0],
     ["--rollout-order left-to-right", "now block length 1, 40 steps"]),
    (["--rollout-order", "left-to-right", "--block-length", 5],
     ["drop --block-length and --diffusion-steps"]),
    (["--rollout-order", "left-to-right", "--diffusion-steps", 10], ["one position a step"]),
    ([*AR, "--rollout-threshold", 0.9], ["drop --rollout-cache and --rollout-threshold"]),
    ([*AR, "--rollout-cache", "prefix"], ["drop --rollout-cache and --rollout-threshold"]),
    (AR[:-2], ["--p-mask-prompt 0", "not 0.15"]),
])
def test_ar_refuses_what_is_not_left_to_right(tmp_path, flags, fragments):
    run = run_script("grpo.py", *flags, "--out-dir", tmp_path, expect_ok=False)
    assert_clean_error(run, *fragments)
