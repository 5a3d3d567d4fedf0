"""
Beyond d1: the log-likelihood estimators and RL objectives that grpo.py can use instead of d1's, each a flag
away. grpo.py keeps d1's algorithm whole; a reader of d1 can skip this file.

Two small interfaces, so that a new method adds entries here and moves nothing in grpo.py:
- an estimator (`--estimator NAME`): ESTIMATORS[NAME] = (make_input, logprobs, passes), where
  make_input(sequences, is_prompt, p_mask_prompt, mask_id, generator) draws the perturbed input for the whole
  rollout batch (so a seed gives the same masks for any split into micro-batches), and
  logprobs(policy, estimate, rows, sequences, attention_mask, prompt_length) returns the per-token log-probs
  (n, T) of the completion positions of the batch's `rows`; passes counts its forward rows per sequence.
  It serves the old, the reference and the current policy alike, so the ratio compares like with like.
- a ratio-free objective (`--objective NAME`): RATIO_FREE_OBJECTIVES[NAME] = (sequence_weights, loss), where
  sequence_weights(advantages (N, 1), num_generations) -> (N, 1) is computed once per rollout batch, and
  loss(logp, mask, weights, num_groups) is the micro-batch's loss; such an objective needs no old and no
  reference log-probs.

    python grpo.py --estimator coupled                  # DiffuCoder's coupled masks, d1's objective
    python grpo.py --objective wd1 --lr 3e-5            # wd1's weighted likelihood, d1's estimator
"""

import torch

from model import token_logprobs

# -----------------------------------------------------------------------------
# Coupled sampling (DiffuCoder, Gong et al. 2025, coupled-GRPO)

# DiffuCoder's released coupled-GRPO draws its masking ratio from U(0.2, 0.8): a ratio near 0 or 1 would give
# the 1/t or 1/(1 - t) weight below an unbounded variance
COUPLED_MASK_RATIO_RANGE = (0.2, 0.8)


def coupled_estimator_input(sequences, is_prompt, p_mask_prompt, mask_id, generator,
                            ratio_range=COUPLED_MASK_RATIO_RANGE):
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


# -----------------------------------------------------------------------------
# What grpo.py's flags select

ESTIMATORS = {"coupled": (coupled_estimator_input, coupled_rows_logprobs, 2)}
RATIO_FREE_OBJECTIVES = {"wd1": (wd1_sequence_weights, wd1_loss)}
