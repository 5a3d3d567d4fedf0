"""
Guards the likelihood estimators and objectives beyond d1 (grpo.py --estimator, --objective):

- coupled_estimator_input (DiffuCoder's coupled sampling): over the action tokens the two passes' masks are
  complementary (each action token masked in exactly one pass); the conditioning tokens (prompt, canvas) are
  masked as d1's estimator masks them, at p_mask_prompt, identically in both passes, and left intact at
  p_mask_prompt 0; each pass's weight is 1 / (2 t) on the tokens it reads, with t in the ratio range (so the
  two weights of a row satisfy 1 / (2 w_1) + 1 / (2 w_2) = 1); the draw is a function of the seed;
- coupled_logprobs equals a slow reading, pass by pass and token by token, of each token from the pass that
  masked it;
- wd1_weights and wd1_loss equal a slow reference written here with Python loops (softmax by hand), and
  micro-batches that split a group add up to the whole batch's loss;
- for each estimator x objective, on a toy group of two completions with advantages +1 and -1, the gradient is
  finite and one small SGD step raises the positive completion's estimated log-likelihood relative to the
  negative one (on 32 fixed mask draws, the training draw among them);
- bench/estimators.py (`python -m bench.estimators`) runs on a tiny checkpoint and prints finite figures
  for both estimators and the forward-pass counts;
- grpo.py end to end: --estimator coupled with mu 2 and beta > 0 (old, reference and current log-probs on
  the same coupled masks: the first ratio exactly 1; 12 forward passes per step), and --objective wd1 with
  --estimator coupled (the current policy's passes alone: 4 per step; the model moves); --objective wd1
  refuses --beta with a clean message.
The default path (d1's estimator, the grpo objective) is guarded by test_grpo.py.
"""

import math

import pytest
import torch
from helpers import (TWO_STEPS, assert_clean_error, assert_estimator_run, max_difference,
                     parameters, read_metrics, run_script)

import grpo
import model as M
import objectives

MASK_ID = 5
PROMPT_LENGTH = 12
CANVAS_COLUMN = PROMPT_LENGTH + 2  # a given cell inside the completion: conditioning, not an action


def toy_batch(rows=4, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(10, 60, (rows, length), generator=g)  # never the mask id
    is_prompt = torch.zeros_like(x, dtype=torch.bool)
    is_prompt[:, :PROMPT_LENGTH] = True
    is_prompt[:, CANVAS_COLUMN] = True
    return x, is_prompt


# -----------------------------------------------------------------------------
# coupled masks


@pytest.mark.parametrize("p_mask_prompt", [0.0, 0.15])
def test_coupled_masks_are_complementary_over_the_actions(p_mask_prompt):
    x, is_prompt = toy_batch(rows=256, length=40)
    inputs, weights = objectives.coupled_estimator_input(x, is_prompt, p_mask_prompt, MASK_ID,
                                                   torch.Generator().manual_seed(3))
    assert inputs.shape == (2, *x.shape) and weights.shape == (2, *x.shape)
    first, second = inputs[0] == MASK_ID, inputs[1] == MASK_ID
    actions = ~is_prompt
    assert torch.equal(first[actions] ^ second[actions], torch.ones_like(first[actions]))  # exactly one pass
    # the conditioning tokens: the same mask in both passes, at d1's rate (10,496 draws: standard error
    # < 0.0035)
    assert torch.equal(first[is_prompt], second[is_prompt])
    if p_mask_prompt == 0:
        assert (torch.equal(inputs[0][is_prompt], x[is_prompt])
                and torch.equal(inputs[1][is_prompt], x[is_prompt]))
    else:
        assert abs(first[is_prompt].double().mean().item() - p_mask_prompt) < 0.015
    for p in range(2):  # what a pass does not mask is untouched
        kept = inputs[p] != MASK_ID
        assert torch.equal(inputs[p][kept], x[kept])
    # weights: 1/(2t) on pass 1's masked actions, 1/(2(1 - t)) on pass 2's, 0 elsewhere (the prompt included)
    assert torch.equal(weights[0] > 0, first & actions) and torch.equal(weights[1] > 0, second & actions)
    low, high = objectives.COUPLED_MASK_RATIO_RANGE
    t_seen = []
    for row in range(len(x)):
        w1, w2 = weights[0, row][weights[0, row] > 0], weights[1, row][weights[1, row] > 0]
        if len(w1) and len(w2):
            assert (w1 == w1[0]).all() and (w2 == w2[0]).all()
            t = 1 / (2 * w1[0].item())
            assert low <= t <= high and abs(t + 1 / (2 * w2[0].item()) - 1) < 1e-5
            t_seen.append(t)
    # the ratio is drawn per sequence, and pass 1 masks about a fraction t of the actions
    assert max(t_seen) - min(t_seen) > 0.4
    rate = first[actions].double().mean().item()
    assert abs(rate - (low + high) / 2) < 0.02, rate


def test_coupled_masks_are_a_function_of_the_seed():
    x, is_prompt = toy_batch()

    def draw(seed):
        return objectives.coupled_estimator_input(x, is_prompt, 0.15, MASK_ID,
                                                  torch.Generator().manual_seed(seed))

    assert all(torch.equal(a, b) for a, b in zip(draw(7), draw(7)))
    assert not torch.equal(draw(7)[0], draw(8)[0])


def test_coupled_logprobs_read_each_token_from_the_pass_that_masked_it(make_model):
    model = make_model(seed=1)
    x, is_prompt = toy_batch(rows=3)
    inputs, weights = objectives.coupled_estimator_input(x, is_prompt, 0.15, MASK_ID,
                                                   torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = objectives.coupled_logprobs(model, inputs, weights, x, None, PROMPT_LENGTH)
        passes = [torch.log_softmax(model(inputs[p]), dim=-1) for p in range(2)]  # (N, L, V) each
    assert fast.shape == (3, x.shape[1] - PROMPT_LENGTH)
    for i in range(3):
        for j in range(PROMPT_LENGTH, x.shape[1]):
            expected = 0.0
            for p in range(2):
                if inputs[p, i, j] == MASK_ID and not is_prompt[i, j]:
                    expected += weights[p, i, j].item() * passes[p][i, j, x[i, j]].item()
            assert fast[i, j - PROMPT_LENGTH].item() == pytest.approx(expected, abs=1e-5)


# -----------------------------------------------------------------------------
# wd1


def slow_wd1_loss(logp, mask, advantages, num_generations):
    """wd1 by hand: per group, w+ = softmax(A), w- = softmax(-A); loss = -mean over groups of
    sum_i (w+_i - w-_i) sum_k logp_ik mask_ik."""
    rows = len(logp)
    total = 0.0
    for start in range(0, rows, num_generations):
        group = range(start, start + num_generations)
        plus = [math.exp(advantages[i]) for i in group]
        minus = [math.exp(-advantages[i]) for i in group]
        for n, i in enumerate(group):
            sequence_logp = sum(logp[i][k] * mask[i][k] for k in range(len(logp[i])))
            total += (plus[n] / sum(plus) - minus[n] / sum(minus)) * sequence_logp
    return -total / (rows / num_generations)


def test_wd1_loss_equals_slow_reference():
    g = torch.Generator().manual_seed(0)
    G, groups, T = 4, 3, 7
    logp = -torch.rand(G * groups, T, generator=g, dtype=torch.float64) * 3
    mask = (torch.rand(G * groups, T, generator=g) > 0.3).double()
    advantages = torch.tensor([[1.5, -0.5, -0.5, -0.5], [0.0, 0.0, 0.0, 0.0], [0.7, 0.2, -0.4, -0.5]],
                              dtype=torch.float64)
    weights = objectives.wd1_weights(advantages).reshape(-1, 1)
    loss = objectives.wd1_loss(logp, mask, weights, groups)
    expected = slow_wd1_loss(logp.tolist(), mask.tolist(), advantages.reshape(-1).tolist(), G)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert (weights.view(groups, G)[1] == 0).all()  # a group with equal rewards teaches nothing
    # micro-batches that split groups (the loop's loss / number of micro-batches) add up to the whole loss
    halves = [slice(0, 6), slice(6, 12)]
    split = sum(objectives.wd1_loss(logp[mb], mask[mb], weights[mb], 6 / G) / len(halves) for mb in halves)
    assert split.item() == pytest.approx(loss.item(), rel=1e-12)


# -----------------------------------------------------------------------------
# each variant's gradient moves the objective the right way


def estimate(model, estimator, x, is_prompt, seed):
    """Per-token log-probs (N, T) of the completions by `estimator` on the mask drawn from `seed`."""
    g = torch.Generator().manual_seed(seed)
    if estimator == "d1":
        perturbed = grpo.estimator_input(x, is_prompt, 0.15, MASK_ID, g)
        return M.token_logprobs(model(perturbed, None, slice(PROMPT_LENGTH, None)), x[:, PROMPT_LENGTH:])
    inputs, weights = objectives.coupled_estimator_input(x, is_prompt, 0.15, MASK_ID, g)
    return objectives.coupled_logprobs(model, inputs, weights, x, None, PROMPT_LENGTH)


@pytest.mark.parametrize("estimator", ["d1", "coupled"])
@pytest.mark.parametrize("objective", ["grpo", "wd1"])
def test_one_step_raises_the_positive_completion(make_model, estimator, objective):
    model = make_model(seed=2)
    x, is_prompt = toy_batch(rows=2)
    x[1, :PROMPT_LENGTH] = x[0, :PROMPT_LENGTH]  # one group: one prompt, two completions
    mask = (~is_prompt[:, PROMPT_LENGTH:]).float()
    advantages = torch.tensor([[1.0], [-1.0]])

    def margin():  # positive minus negative estimated log-likelihood, averaged over 32 fixed mask draws
        with torch.no_grad():
            values = [((estimate(model, estimator, x, is_prompt, seed) * mask).sum(dim=1))
                      for seed in range(32)]
        difference = torch.stack(values)[:, 0] - torch.stack(values)[:, 1]
        return difference.mean().item()

    before = margin()
    logp = estimate(model, estimator, x, is_prompt, seed=0)
    if objective == "grpo":  # mu = 1: old = logp, ratio 1
        loss, _, _ = grpo.grpo_loss(logp, logp.detach(), None, advantages, mask, 0.5, 0.5, 0.0)
    else:
        loss = objectives.wd1_loss(logp, mask, objectives.wd1_weights(advantages.view(1, -1)).view(-1, 1), 1)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
    assert margin() > before + 1e-3, (before, margin())


# -----------------------------------------------------------------------------
# grpo.py end to end

TINY = [*TWO_STEPS, "--temperature", 0.9]


def test_grpo_with_coupled_masks(start, tmp_path):
    out = tmp_path / "coupled"
    run_script("grpo.py", "--model", start, *TINY, "--estimator", "coupled", "--num-iterations", 2,
               "--beta", 0.04, "--out-dir", out)
    # old and current log-probs read the same two coupled passes: mu 2 x (old, reference, current) x 2 passes
    assert_estimator_run(out, 2, 12)


def test_wd1_with_coupled_masks(start, tmp_path):
    out = tmp_path / "wd1"
    run_script("grpo.py", "--model", start, *TINY, "--objective", "wd1", "--estimator", "coupled",
               "--num-iterations", 2, "--out-dir", out)
    records = read_metrics(out)
    assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)
    # ratio-free: no old and no reference log-probs, only the current policy's 2 coupled passes per iteration
    assert all(r["update_forward_passes"] == 4 for r in records)
    assert max_difference(parameters(out), parameters(start)) > 0


def test_wd1_refuses_beta(tmp_path):
    run = run_script("grpo.py", "--objective", "wd1", "--beta", 0.04, "--out-dir", tmp_path, expect_ok=False)
    assert_clean_error(run, "--beta does not apply to --objective wd1", "--objective grpo")


def test_estimator_stats_prints_its_table(start):
    run = run_script("bench/estimators.py", "--model", start, "--prompts", 2, "--num-generations", 2,
                     "--draws", 2, "--reference-draws", 8)
    rows = {line.split("|")[0].strip(): line for line in run.stdout.splitlines() if line.count("|") == 6}
    assert {"d1", "coupled"} <= rows.keys(), run.stdout
    for name in ("d1", "coupled"):
        assert all(math.isfinite(float(v)) for v in rows[name].split("|")[1:]), rows[name]
    # grpo.py's defaults (mu 4, beta > 0): old, reference and current passes; wd1 the current ones alone
    assert ("d1 + grpo:  12" in run.stdout and "coupled + grpo:  24" in run.stdout
            and "coupled + wd1:   8" in run.stdout)
