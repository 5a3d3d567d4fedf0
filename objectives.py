"""
Beyond d1: the log-likelihood estimators and RL objectives that grpo.py can use instead of d1's, each a flag
away. grpo.py keeps d1's algorithm whole; a reader of d1 can skip this file.

Two small interfaces, so that a new method adds a section here and moves nothing in grpo.py:
- an estimator (`--estimator NAME`): ESTIMATORS[NAME](args) -> (make_input, logprobs, passes), its settings
  bound from the command line. make_input(sequences, is_prompt, p_mask_prompt, mask_id, generator, **rollout)
  draws the input of the whole rollout batch from `generator` (a seed gives the same masks for any split into
  micro-batches); `rollout` holds what the rollout recorded: completion_mask (N, T) and, when the sampler
  recorded it, unmask_step (N, T). logprobs(policy, estimate, rows, sequences, attention_mask,
  prompt_length) returns the per-token log-probs of the completion positions of the batch's `rows`, (n, T),
  or (n, C, T) for a ratio-free objective that reads C estimates; passes counts its forward rows per
  sequence. It serves the old, the reference and the current policy alike: the ratio compares like with like.
- a ratio-free objective (`--objective NAME`): RATIO_FREE_OBJECTIVES[NAME](args) -> (sequence_weights, loss),
  sequence_weights(advantages (N, 1), num_generations) -> (N, 1) once per rollout batch, and
  loss(logp, mask, weights, num_groups) the micro-batch's loss; it needs no old and no reference log-probs.
add_flags(parser) declares every method's settings; check_args(args, sampler) refuses what cannot work.

    python grpo.py --estimator coupled                  # DiffuCoder's coupled masks, d1's objective
    python grpo.py --objective wd1 --lr 3e-5            # wd1's weighted likelihood, d1's estimator
"""

import torch

from model import token_logprobs

# name -> function(args) -> the method's pieces, and the functions that add its flags to grpo.py's command line
# and check them (flags(parser), check(args, sampler)): each section below registers its own
ESTIMATORS, RATIO_FREE_OBJECTIVES, FLAGS, CHECKS = {}, {}, [], []

# -----------------------------------------------------------------------------
# Coupled sampling (DiffuCoder, Gong et al. 2025, coupled-GRPO)

# DiffuCoder's released coupled-GRPO draws its masking ratio from U(0.2, 0.8): a ratio near 0 or 1 would give
# the 1/t or 1/(1 - t) weight below an unbounded variance
COUPLED_MASK_RATIO_RANGE = (0.2, 0.8)


def coupled_estimator_input(sequences, is_prompt, p_mask_prompt, mask_id, generator,
                            ratio_range=COUPLED_MASK_RATIO_RANGE, **rollout):
    """Two passes whose masks over the action tokens (~is_prompt) are complementary. Per sequence
    t ~ U(ratio_range) and u ~ U(0, 1) per token; pass 1 masks the action tokens with u < t, pass 2 the
    others, so every action token is masked in exactly one pass and read there with the other pass's tokens
    as context. The conditioning tokens are masked as in d1's estimator, each with probability
    p_mask_prompt, the same draw in both passes. Each token is weighted by the inverse of its pass's masking
    rate, halved, because the two passes are two samples of LLaDA's ELBO,
    log p(x) >= E_t[(1/t) sum_{i masked at t} log p(x_i | x_t)]:
        log pi(o | q) ~ 1/2 [ (1/t) sum_{i in M_1} log p(o_i | x^1)
                              + 1/(1-t) sum_{i in M_2} log p(o_i | x^2) ],
    an antithetic (t, 1 - t) pair. sequences, is_prompt (N, L); all randomness on the CPU from `generator`.
    Returns (inputs (2, N, L), weights (2, N, L)): the two perturbed batches and each token's weight in each
    pass (0 where the pass does not read it)."""
    N, L = sequences.shape
    low, high = ratio_range
    u_prompt = torch.rand((N, L), generator=generator).to(sequences.device)
    t = (low + (high - low) * torch.rand((N, 1), generator=generator)).to(sequences.device)  # (N, 1)
    u = torch.rand((N, L), generator=generator).to(sequences.device)
    prompt_masked = is_prompt & (u_prompt < p_mask_prompt)
    first = ~is_prompt & (u < t)
    second = ~is_prompt & ~(u < t)  # the complement over the action tokens
    mask = torch.full_like(sequences, mask_id)
    inputs = torch.stack([torch.where(first | prompt_masked, mask, sequences),
                          torch.where(second | prompt_masked, mask, sequences)])
    weights = torch.stack([first / (2 * t), second / (2 * (1 - t))])
    return inputs, weights


def coupled_logprobs(policy, inputs, weights, sequences, attention_mask=None, prompt_length=0):
    """The coupled estimate of every completion token's log-prob (N, L - prompt_length): both passes of
    coupled_estimator_input's (inputs, weights) in one forward of 2N rows, each token read from the pass that
    masked it, with its weight. sequences (N, L) hold the targets; attention_mask (N, L) or None."""
    _, N, L = inputs.shape
    logits = policy(inputs.reshape(2 * N, L), None if attention_mask is None else attention_mask.repeat(2, 1),
                    slice(prompt_length, None))  # (2N, T, V)
    logp = token_logprobs(logits, sequences[:, prompt_length:].repeat(2, 1)).view(2, N, -1)
    return (weights[:, :, prompt_length:] * logp).sum(dim=0)


def coupled_rows_logprobs(policy, estimate, rows, sequences, attention_mask, prompt_length):
    """The estimator interface over coupled_logprobs: the rows of the batch's (inputs, weights)."""
    inputs, weights = estimate
    return coupled_logprobs(policy, inputs[:, rows], weights[:, rows], sequences[rows],
                            None if attention_mask is None else attention_mask[rows], prompt_length)


ESTIMATORS["coupled"] = lambda args: (coupled_estimator_input, coupled_rows_logprobs, 2)


# -----------------------------------------------------------------------------
# wd1 (Tang et al. 2025): a ratio-free weighted log-likelihood


def wd1_weights(grouped_advantages):
    """wd1's group-relative weights, as in their released trainer: w+ = softmax(A) over the group up-weights
    high-advantage completions, w- = softmax(-A) low-advantage ones for the negative (unlearning) term.
    grouped_advantages (P, G) -> w+ - w- (P, G)."""
    return torch.softmax(grouped_advantages, dim=1) - torch.softmax(-grouped_advantages, dim=1)


def wd1_sequence_weights(advantages, num_generations):
    """Each completion's w+ - w- within its group: advantages (N, 1) of contiguous groups of G -> (N, 1)."""
    return wd1_weights(advantages.view(-1, num_generations)).reshape(-1, 1)


def wd1_loss(logp, mask, weights, num_groups):
    """wd1's objective: minus the weighted log-likelihood of the completions under the current policy alone,
        loss = -(1 / num_groups) sum_i (w+_i - w-_i) log pi(o_i | q),
        log pi(o_i | q) = sum_k logp_ik mask_ik.
    logp (N, T), mask (N, T) of 0/1, weights (N, 1) = w+ - w- of each completion's group, num_groups the
    number of groups the N rows stand for (N / G, fractional when a micro-batch splits a group)."""
    sequence_logp = (logp * mask).sum(dim=1, keepdim=True)  # (N, 1)
    return -(weights * sequence_logp).sum() / num_groups


RATIO_FREE_OBJECTIVES["wd1"] = lambda args: (wd1_sequence_weights, wd1_loss)


# -----------------------------------------------------------------------------
# The methods' flags, and the combinations that cannot work


def add_flags(parser):
    """Every method's settings, in grpo.py's command line."""
    for flags in FLAGS:
        flags(parser)


def check_args(args, sampler):
    """Refuse a combination of flags that a method cannot run (sampler: grpo.py's rollout settings): a
    SystemExit that says what to do."""
    for check in CHECKS:
        check(args, sampler)
