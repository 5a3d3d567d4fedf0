"""
Guards SPG, sandwiched policy gradient (Wang et al. 2025, arXiv 2510.09541; objectives.py's spg section,
grpo.py --estimator spg --objective spg), against its released code (facebookresearch/SPG, spg_trainer.py):

- with m = 1 sample the EUBO's gradient equals the ELBO's (both reduce to 1/t-weighted log-probs), and a row
  with nothing to count (an empty completion) or a token masked in no sample gives zero, not NaN, gradients;
- the reduction to d1: with one block of gen_length tokens, min_t = max_t = 1 and m = 1, spg_input draws
  d1's estimator_input exactly (same seed, same mask) and one mu = 1 update under SPG's loss moves the
  weights as d1's grpo_loss at beta 0 (ratio 1) does, for every --spg-bound;
- with m = 2, both channels of spg_logprobs and their gradients equal a slow reference written here with
  Python loops in SPG's own form (per-sample means over the masked tokens; a_i = 1/2 (M_1 p_1^beta / t_1 +
  M_2 p_2^beta / t_2); the EUBO's log averaged over the tokens with a_i > 0);
- the block_random mask structure on a big batch: the blocks after k fully masked, block k's masked count in
  [1, ml] and on average (ml + 1) / 2, every action after the completion masked, the conditioning tokens
  (prompt and canvas) and the earlier blocks' tokens masked at about p_mask_prompt (SPG's quirk), t the
  counted share, distinct blocks per sample, the draw a function of the seed;
- spg_loss's per-sign bound and its normalisation by the micro-batch's completion tokens, against a slow
  loop; the registered pieces take the rollout's block length and --spg-bound's omega;
- grpo.py end to end: `--estimator spg --objective spg` runs 2 steps from a tiny checkpoint with finite
  losses, mu x m forward passes per step, and moves the model; the refusals say what to do.
"""

import argparse
import copy
import math
from functools import partial

import pytest
import torch
from helpers import assert_clean_error, digit_checkpoint, max_difference, parameters, read_metrics, run_script

import checkpoint as C
import grpo
import objectives

MASK_ID = C.mask_token_id(C.build_tiny_tokenizer())  # what the test models were built with
PROMPT_LENGTH = 6
CANVAS_COLUMN = 2  # a given cell inside the completion: conditioning, never counted


def toy_batch(rows, gen_length, lengths, seed=0, canvas=True):
    """sequences (rows, PROMPT_LENGTH + gen_length) of ordinary tokens, is_prompt (the prompt and, with
    canvas, one given cell) and the completion mask of completions of the given lengths (up to and
    including the EOS), less the canvas cell, as grpo.py builds them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(10, 60, (rows, PROMPT_LENGTH + gen_length), generator=g)  # never the mask id
    is_prompt = torch.zeros_like(x, dtype=torch.bool)
    is_prompt[:, :PROMPT_LENGTH] = True
    completion_mask = torch.arange(gen_length) < torch.as_tensor(lengths).view(-1, 1)
    if canvas:
        is_prompt[:, PROMPT_LENGTH + CANVAS_COLUMN] = True
        completion_mask[:, CANVAS_COLUMN] = False
    return x, is_prompt, completion_mask


def draw(x, is_prompt, completion_mask, seed, p_mask_prompt=0.15, **settings):
    return objectives.spg_input(x, is_prompt, p_mask_prompt, MASK_ID, torch.Generator().manual_seed(seed),
                                completion_mask=completion_mask, **settings)


def gradient(model, loss):
    # the graph is kept: a test takes the gradients of two losses of one forward
    return [g for g in torch.autograd.grad(loss, list(model.parameters()), retain_graph=True,
                                           allow_unused=True) if g is not None]


# -----------------------------------------------------------------------------
# The two bounds


@pytest.mark.parametrize("eubo_beta", [1.0, 1.5, 2.0])
def test_one_sample_eubo_has_the_elbo_gradient(make_model, eubo_beta):
    # per counted token: EUBO (1/beta)(beta logp - log t) L_b / n_b, ELBO logp / t, and n_b = t L_b
    model = make_model(seed=1)
    x, is_prompt, completion_mask = toy_batch(5, 16, [16, 9, 3, 12, 0])  # the last row counts nothing
    estimate = draw(x, is_prompt, completion_mask, seed=4, block_length=4, num_samples=1)
    logp = objectives.spg_logprobs(model, estimate, slice(None), x, None, PROMPT_LENGTH, eubo_beta=eubo_beta)
    assert logp.shape == (5, 2, 16) and logp.dtype == torch.float32
    assert (logp[4] == 0).all()  # an empty completion: nothing counted, t = 0 handled
    mask = completion_mask.float()
    row_weights = torch.tensor([[0.7], [-1.3], [0.4], [2.0], [1.0]])
    elbo = gradient(model, (logp[:, 0] * mask * row_weights).sum())
    eubo = gradient(model, (logp[:, 1] * mask * row_weights).sum())
    assert all(torch.isfinite(g).all() for g in elbo + eubo)
    for a, b in zip(elbo, eubo):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bound", ["eubo", "mix", "elbo"])
def test_reduces_to_d1_with_one_fully_masked_sample(make_model, bound):
    # d1's input: one block of gen_length tokens, all of its completion tokens masked; d1 at mu 1, beta 0
    T, seed, p_mask_prompt = 12, 5, 0.3
    x, is_prompt, completion_mask = toy_batch(4, T, [12, 7, 4, 10], seed=2)
    estimate = draw(x, is_prompt, completion_mask, seed, p_mask_prompt, block_length=T, num_samples=1,
                    min_t=1.0, max_t=1.0)
    perturbed = grpo.estimator_input(x, is_prompt, p_mask_prompt, MASK_ID,
                                     torch.Generator().manual_seed(seed))
    assert torch.equal(estimate["inputs"][0], perturbed)  # the same draw, not only the same law
    assert torch.equal(estimate["t"], torch.ones(1, 4, 1))
    advantages = torch.tensor([[1.0], [-0.5], [0.0], [-0.5]])
    args = argparse.Namespace(spg_bound=bound, spg_mix_weight=0.5)
    weights_of, spg_loss = objectives.RATIO_FREE_OBJECTIVES["spg"](args)
    spg_logprobs = partial(objectives.spg_logprobs, eubo_beta=1.5)

    def one_update(model, logprobs, estimate, objective, loss=None):  # grpo.update at mu 1, plain SGD
        before = [p.detach().clone() for p in model.parameters()]
        batch = {"sequences": x, "attention_mask": None, "prompt_length": PROMPT_LENGTH,
                 "completion_mask": completion_mask, "advantages": advantages, "num_generations": 4,
                 "weights": weights_of(advantages, 4)}
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        grpo.update(model, optimizer, list(model.parameters()), logprobs, [estimate], batch,
                    [slice(0, 2), slice(2, 4)], [0.1], objective=objective, ratio_free_loss=loss,
                    epsilon=0.5, epsilon_high=0.5, beta=0.0)
        return [p.detach() - b for p, b in zip(model.parameters(), before)]

    model = make_model(seed=3)
    d1 = one_update(copy.deepcopy(model), grpo.completion_logprobs, perturbed, "grpo")
    spg = one_update(copy.deepcopy(model), spg_logprobs, estimate, "spg", spg_loss)
    assert max(float(d.abs().max()) for d in d1) > 1e-4  # the update is not trivially zero
    for a, b in zip(d1, spg):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


def slow_bounds(model, estimate, x, completion_mask, eubo_beta):
    """SPG's per-sequence bounds by hand, as its _get_per_seq_logps writes them, times L_b: the counted mask
    M_ji read off the input (mask token on a completion token), t_j = sum_i M_ji / L_b,
        ELBO_b = (1/m) sum_j (sum_i M_ji logp_ji / sum_i M_ji),
        a_i = (1/m) sum_j M_ji p_ji^beta / t_j,   EUBO_b = (1/beta) sum_{i: a_i > 0} log a_i / #{i: a_i > 0}.
    Returns two lists of scalar tensors (with their graph) and the counts of the tokens masked in both
    samples and in none."""
    inputs = estimate["inputs"]
    m, rows, _ = inputs.shape
    T = completion_mask.shape[1]
    log_probs = [torch.log_softmax(model(inputs[j]), dim=-1).double() for j in range(m)]  # (rows, L, V)
    elbos, eubos, in_both, in_none = [], [], 0, 0
    for b in range(rows):
        tokens = [i for i in range(T) if completion_mask[b, i]]
        length = len(tokens)
        logp = [{i: log_probs[j][b, PROMPT_LENGTH + i, x[b, PROMPT_LENGTH + i]] for i in tokens}
                for j in range(m)]
        masked = [{i for i in tokens if inputs[j, b, PROMPT_LENGTH + i] == MASK_ID} for j in range(m)]
        t = [len(masked[j]) / length for j in range(m)]
        elbo = sum(sum(logp[j][i] for i in masked[j]) / len(masked[j]) for j in range(m)) / m
        a = {i: sum(torch.exp(logp[j][i]) ** eubo_beta / t[j] for j in range(m) if i in masked[j]) / m
             for i in tokens if any(i in masked[j] for j in range(m))}
        eubo = sum(torch.log(a_i) for a_i in a.values()) / len(a) / eubo_beta
        elbos.append(length * elbo)
        eubos.append(length * eubo)
        in_both += sum(all(i in masked[j] for j in range(m)) for i in tokens)
        in_none += sum(not any(i in masked[j] for j in range(m)) for i in tokens)
    return elbos, eubos, in_both, in_none


def test_two_sample_bounds_equal_a_slow_reference(make_model):
    model = make_model(seed=5)
    x, is_prompt, completion_mask = toy_batch(4, 12, [12, 7, 11, 5], seed=6)
    estimate = draw(x, is_prompt, completion_mask, seed=8, p_mask_prompt=0.3, block_length=4, num_samples=2)
    fast = objectives.spg_logprobs(model, estimate, slice(None), x, None, PROMPT_LENGTH, eubo_beta=1.5)
    fast = (fast.double() * completion_mask.unsqueeze(1)).sum(dim=2)  # (rows, 2): L_b x each bound
    elbos, eubos, in_both, in_none = slow_bounds(model, estimate, x, completion_mask, 1.5)
    assert in_both > 0 and in_none > 0  # the average over samples and the uncounted tokens both exercised
    slow = torch.stack([torch.stack(elbos), torch.stack(eubos)], dim=1)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    # and their gradients, each bound weighted per row as a loss would
    row_weights = torch.tensor([[1.0, -0.4], [-2.0, 0.3], [0.5, 1.5], [-1.0, -1.0]], dtype=torch.float64)
    fast_gradient = gradient(model, (fast * row_weights).sum())
    slow_gradient = gradient(model, (slow * row_weights).sum())
    assert all(torch.isfinite(g).all() for g in fast_gradient)
    for a, b in zip(fast_gradient, slow_gradient):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5)  # fp32 forwards


def test_a_sequence_slice_reads_its_rows(make_model):
    # micro-batches: the rows of the batch's estimate, the same values as the whole batch's
    model = make_model(seed=7)
    x, is_prompt, completion_mask = toy_batch(4, 12, [12, 5, 9, 3], seed=9)
    estimate = draw(x, is_prompt, completion_mask, seed=1, block_length=4, num_samples=2)
    mask = torch.ones_like(x)
    mask[1, :2] = 0  # left padding of a shorter prompt
    with torch.no_grad():
        whole = objectives.spg_logprobs(model, estimate, slice(None), x, mask, PROMPT_LENGTH, eubo_beta=1.5)
        halves = torch.cat([objectives.spg_logprobs(model, estimate, rows, x, mask, PROMPT_LENGTH,
                                                    eubo_beta=1.5) for rows in (slice(0, 2), slice(2, 4))])
    torch.testing.assert_close(whole, halves, rtol=1e-5, atol=1e-5)


# -----------------------------------------------------------------------------
# The block-wise masks


def test_block_random_mask_structure():
    rows, T, B, m, p = 600, 32, 8, 2, 0.3
    lengths = torch.randint(1, T + 1, (rows,), generator=torch.Generator().manual_seed(0))
    lengths[:200] = T  # whole completions: every block holds completion tokens
    x, is_prompt, completion_mask = toy_batch(rows, T, lengths, seed=1)
    estimate = draw(x, is_prompt, completion_mask, seed=2, p_mask_prompt=p, block_length=B, num_samples=m)
    inputs, block = estimate["inputs"], estimate["block"]
    assert inputs.shape == (m, *x.shape) and block.shape == (m, rows)
    masked = inputs == MASK_ID
    assert torch.equal(inputs[~masked], x.expand(m, -1, -1)[~masked])  # what is not masked is untouched
    action, position = ~is_prompt[:, PROMPT_LENGTH:], torch.arange(T)
    conditioning, earlier = [], []
    masked_in_block, expected_in_block = 0, 0.0
    for j in range(m):
        for b in range(rows):
            k, row = int(block[j, b]), masked[j, b, PROMPT_LENGTH:]
            completion, end = completion_mask[b], int(lengths[b])
            holding = set((position[completion] // B).tolist())
            assert k in holding
            in_block = completion & (position // B == k)
            ml, n = int(in_block.sum()), int((row & in_block).sum())
            assert 1 <= n <= ml
            masked_in_block, expected_in_block = masked_in_block + n, expected_in_block + (ml + 1) / 2
            assert row[action[b] & (position >= (k + 1) * B)].all()  # the later blocks
            assert row[action[b] & (position >= end)].all()  # after the completion: mask tokens
            conditioning.append(masked[j, b][is_prompt[b]])
            earlier.append(row[completion & (position < k * B)])
        # t: the counted share of the completion
        counted = masked[j, :, PROMPT_LENGTH:] & completion_mask
        assert torch.equal(estimate["counted"][j], counted)
        torch.testing.assert_close(estimate["t"][j, :, 0], counted.sum(1) / completion_mask.sum(1))
    # n ~ U{1..ml}: on average (ml + 1) / 2, so block k is not masked at the prompt's rate on top
    assert abs(masked_in_block / expected_in_block - 1) < 0.03
    # the prompt, the canvas cell and the earlier blocks' tokens: each masked with probability p
    for tokens in (torch.cat(conditioning), torch.cat(earlier)):
        assert len(tokens) > 2000 and abs(tokens.float().mean().item() - p) < 0.03
    # a permutation of the blocks: where all 4 hold completion tokens, the two samples take distinct blocks
    assert (block[0, :200] != block[1, :200]).all()
    assert set(block[0, :200].tolist()) == {0, 1, 2, 3}


def test_masks_are_a_function_of_the_seed():
    x, is_prompt, completion_mask = toy_batch(8, 16, [16, 12, 9, 5, 16, 3, 14, 7])
    settings = dict(block_length=4, num_samples=2)
    first, again = (draw(x, is_prompt, completion_mask, 3, **settings) for _ in range(2))
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(first["inputs"], draw(x, is_prompt, completion_mask, 4, **settings)["inputs"])


# -----------------------------------------------------------------------------
# The loss and the registered pieces


def slow_spg_loss(logp, mask, advantages, omega):
    """compute_loss by hand: per row S_b = sum_i ELBO terms if A_b > 0, else omega sum_i EUBO terms +
    (1 - omega) sum_i ELBO terms (both already L_b x the bound); loss = -sum_b A_b S_b / sum_b L_b."""
    total, tokens = 0.0, 0.0
    for b in range(len(logp)):
        elbo = sum(logp[b][0][i] * mask[b][i] for i in range(len(mask[b])))
        eubo = sum(logp[b][1][i] * mask[b][i] for i in range(len(mask[b])))
        bound = elbo if advantages[b] > 0 else omega * eubo + (1 - omega) * elbo
        total += -advantages[b] * bound
        tokens += sum(mask[b])
    return total / tokens


@pytest.mark.parametrize("omega", [1.0, 0.5, 0.0])
def test_spg_loss_equals_slow_reference(omega):
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(6, 2, 5, generator=g, dtype=torch.float64) * 3
    mask = (torch.rand(6, 5, generator=g) > 0.3).double()
    advantages = torch.tensor([[1.0], [-0.5], [0.0], [2.0], [-1.0], [-1.5]], dtype=torch.float64)
    weights = objectives.spg_sequence_weights(advantages, 3)
    assert torch.equal(weights, advantages)  # SPG: A = r - mean, no std
    for rows in (slice(0, 6), slice(0, 3), slice(3, 6)):  # each micro-batch over its own tokens
        loss = objectives.spg_loss(logp[rows], mask[rows], weights[rows], 1.0, omega=omega)
        expected = slow_spg_loss(logp[rows].tolist(), mask[rows].tolist(), advantages[rows].view(-1).tolist(),
                                 omega)
        assert loss.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("bound, omega", [("eubo", 1.0), ("mix", 0.3), ("elbo", 0.0)])
def test_registered_pieces_take_the_command_line(bound, omega):
    args = argparse.Namespace(spg_bound=bound, spg_mix_weight=0.3, spg_eubo_beta=2.0, spg_samples=3,
                              task="tiny_sudoku", block_length=None, max_completion_length=None)
    _, loss = objectives.RATIO_FREE_OBJECTIVES["spg"](args)
    assert loss.keywords == {"omega": omega}
    make_input, logprobs, passes = objectives.ESTIMATORS["spg"](args, {"block_length": 20})
    assert make_input.keywords == {"block_length": 20, "num_samples": 3}  # the sampler's block
    assert logprobs.keywords == {"eubo_beta": 2.0} and passes == 3


# -----------------------------------------------------------------------------
# grpo.py end to end

TINY = ["--prompts-per-step", 2, "--num-generations", 4, "--temperature", 0.9, "--eval-examples", 0,
        "--max-steps", 2, "--save-every", 0]


def test_grpo_with_spg(tmp_path):
    start = digit_checkpoint(tmp_path / "digits")
    out = tmp_path / "spg"
    # tiny_sudoku's 20 tokens in 4 blocks of 5, m = 2 samples from distinct blocks
    run_script("grpo.py", "--model", start, *TINY, "--estimator", "spg", "--objective", "spg",
               "--block-length", 5, "--num-iterations", 2, "--out-dir", out)
    records = read_metrics(out)
    assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)
    # ratio-free: no old, no reference, the current policy's m = 2 rows per sequence in each of mu = 2 steps
    assert all(r["update_forward_passes"] == 4 for r in records)
    assert max_difference(parameters(out), parameters(start)) > 0


@pytest.mark.parametrize("flags, fragments", [
    (["--objective", "spg"], ["pass --estimator spg --objective spg together"]),
    (["--estimator", "spg"], ["pass --estimator spg --objective spg together"]),
    (["--estimator", "spg", "--objective", "spg"], ["--spg-samples 2", "a smaller --block-length"]),
    (["--estimator", "spg", "--objective", "spg", "--block-length", 5, "--spg-eubo-beta", 0],
     ["--spg-eubo-beta 0.0"]),
    (["--estimator", "spg", "--objective", "spg", "--block-length", 5, "--beta", 0.04],
     ["--beta does not apply to --objective spg", "--objective grpo"]),
])
def test_refusals(tmp_path, flags, fragments):
    run = run_script("grpo.py", *flags, "--out-dir", tmp_path, expect_ok=False)
    assert_clean_error(run, *fragments)
