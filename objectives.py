"""
Beyond d1: the log-likelihood estimators and RL objectives that grpo.py can use instead of d1's, each a flag
away. grpo.py keeps d1's algorithm whole; a reader of d1 can skip this file.

Two small interfaces, so that a new method adds a section here and moves nothing in grpo.py:
- an estimator (`--estimator NAME`): ESTIMATORS[NAME](args, sampler) -> (make_input, logprobs, passes), its
  settings bound from the command line and the rollout's sampler (steps, gen_length, block_length, ...).
  make_input(sequences, is_prompt, p_mask_prompt, mask_id, generator, **rollout) draws the input of the whole
  rollout batch from `generator` (a seed gives the same masks for any split into
  micro-batches); `rollout` holds what the rollout recorded: completion_mask (N, T) and, when the sampler
  recorded it, unmask_step (N, T). logprobs(policy, estimate, rows, sequences, attention_mask,
  prompt_length) returns the per-token log-probs of the completion positions of the batch's `rows`, (n, T),
  or (n, C, T) for a ratio-free objective that reads C estimates; passes counts its forward rows per
  sequence. It serves the old, the reference and the current policy alike: the ratio compares like with like.
- a ratio-free objective (`--objective NAME`): RATIO_FREE_OBJECTIVES[NAME](args) -> (sequence_weights, loss),
  sequence_weights(advantages (N, 1), num_generations) -> (N, 1) once per rollout batch, and
  loss(logp, mask, weights, num_groups) the micro-batch's loss; it needs no old and no reference log-probs.
add_flags(parser) declares every method's settings; check_args(args, sampler) refuses what cannot work.
IGPO is neither: a rollout option (--inpaint-zero-std-groups) whose igpo_step grpo.py calls once a step's
completions are scored.

    python grpo.py --estimator coupled                  # DiffuCoder's coupled masks, d1's objective
    python grpo.py --objective wd1 --lr 3e-5            # wd1's weighted likelihood, d1's estimator
    python grpo.py --estimator stepmerge --merge-chunks 4   # d2: the sampling trajectory, 4 chunks
    python grpo.py --estimator spg --objective spg --block-length 5   # SPG: ELBO / EUBO, block-wise masks
    python grpo.py --estimator ar --rollout-order left-to-right --num-iterations 1 --beta 0 \
        --p-mask-prompt 0 --temperature 1    # JustGRPO: left-to-right rollouts, their exact likelihood
    python grpo.py --inpaint-zero-std-groups             # IGPO: all-wrong groups sampled again with hints
"""

import functools
import math

import torch

import data
import rewards
from generate import generate, read_completions
from model import token_logprobs

# name -> function(args[, sampler]) -> the method's pieces, and the functions that add its flags to grpo.py's
# command line and check them (flags(parser), check(args, sampler)): each section below registers its own
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


ESTIMATORS["coupled"] = lambda args, sampler: (coupled_estimator_input, coupled_rows_logprobs, 2)


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
# JustGRPO (Ni et al. 2026, "The Flexibility Trap", arXiv 2601.15165): the exact likelihood of left-to-right
# rollouts. With --block-length 1 --diffusion-steps gen_length our sampler commits completion position t at
# step t (a canvas's given positions are skipped), so a completion's likelihood is exactly
#     log pi(o | q) = sum_t log p(o_t | q, o_<t, [MASK] or the canvas at positions >= t),
# each term read from ONE forward of the state the sampler saw at step t. Their trainer reads it token by
# token (J:grpo.py:34-50, J = LeapLabTHU/JustGRPO @ eebe50e); with --num-iterations 1 --beta 0 grpo_loss's
# ratio is 1 and its gradient theirs, A grad log pi per token. What differs from their released trainer:
# - normalisation: grpo_loss averages over a micro-batch's completion tokens; theirs sums every position of a
#   row / (gen_length x the global count of rows with a non-zero advantage), accumulation steps added
#   (J:grpo.py:31-32,50, J:train.py:184): the same direction per micro-batch, micro-batches weighed apart;
# - the EOS mask: d1's completion mask (up to the first EOS) stays; theirs trains every position, the EOS
#   padding after the answer included;
# - [MASK] is left out of each token's softmax: our sampler never draws it (generate.float64_chunks), theirs
#   can (J:utils/generate.py:88-89), so each estimate is the probability of what our sampler drew;
# - left-padded prompts under an attention mask (theirs repeat one prompt per call, J:utils/generate.py:58);
# - the estimate reads the policy at temperature 1: exact for --temperature 1, their rollouts' (J:grpo.py:8);
#   at another temperature the rollouts come from softmax(logits / T), and the estimate stays the policy's;
# - their run's settings are flags: --scale-rewards group (their (r - mean) / (std + 1e-4), J:grpo.py:58-61),
#   --epsilon 0.2 (inert at mu 1), --num-generations 16, --temperature 1, --lr 5e-6 --weight-decay 0
#   --max-grad-norm 1 (J:train.py:17-31).

# forward rows (sequences x positions) per chunk of the estimate: their trainer's batch of one forward, the
# 8 generations of a prompt (J:grpo.py:14); at least one position of every sequence per chunk
AR_FORWARD_ROWS = 8


def ar_input(sequences, is_prompt, p_mask_prompt, mask_id, generator, **rollout):
    """JustGRPO's template (J:grpo.py:36-37, there the completion all [MASK]): the conditioning tokens
    (is_prompt: the prompt, a canvas's given tokens) as the sampler saw them, every action [MASK].
    Deterministic: the generator is unused, and the prompt is never masked, since a masked prompt is not the
    state the sampler read (p_mask_prompt must be 0). Returns (template (N, L), mask_id)."""
    if p_mask_prompt:
        raise ValueError(f"the ar estimator reads the prompt as the sampler saw it: p_mask_prompt must be 0, "
                         f"not {p_mask_prompt}")
    return torch.where(is_prompt, sequences, torch.full_like(sequences, mask_id)), mask_id


def ar_chunk_logprobs(policy, sequences, template, attention_mask, start, stop, mask_id):
    """log pi(o_t | q, o_<t) of n sequences at the c absolute positions read = start..stop - 1, from one
    forward of n x c rows, row (i, j) the state the sampler saw before committing read[j] of sequence i:
    positions before it from sequences, the rest from the template. The LM head runs over the c positions of
    each row and row (i, j) keeps read[j]'s logits: at c = 1 (8 or more sequences) the position alone, and
    shapes that do not depend on the data (a dry run on fake tensors needs no worst case). JustGRPO's loop
    body (J:grpo.py:36-44) for c positions at once. sequences, template (n, L); attention_mask (n, L) or None.
    Returns (n, c)."""
    n, L = sequences.shape
    c, read = stop - start, torch.arange(start, stop, device=sequences.device)
    past = torch.arange(L, device=sequences.device)[None, :] < read[:, None]  # (c, L)
    inputs = torch.where(past, sequences[:, None], template[:, None]).flatten(0, 1)  # (n c, L)
    mask = None if attention_mask is None else attention_mask.repeat_interleave(c, dim=0)
    logits = policy(inputs, mask, slice(start, stop)).view(n, c, c, -1)
    diagonal = torch.arange(c, device=sequences.device)
    logits = logits[:, diagonal, diagonal]  # (n, c, V): row (i, j) at read[j]
    # the sampler draws from the vocabulary less [MASK]: its probability, renormalised without it
    logits = logits.index_fill(-1, torch.tensor([mask_id], device=logits.device), -torch.inf)
    return token_logprobs(logits, sequences[:, read])


def ar_chunks(n, gen_length):
    """(positions per chunk, chunks) of ar_logprobs for n sequences: at least one position of each."""
    per_chunk = max(1, AR_FORWARD_ROWS // n)
    return per_chunk, -(-gen_length // per_chunk)


def ar_logprobs(policy, estimate, rows, sequences, attention_mask, prompt_length, max_chunks=None):
    """The estimator interface over ar_chunk_logprobs: the exact per-token log-probs (n, T) of the batch's
    `rows` in left-to-right order, one forward row per completion position (a canvas's given positions are
    read too, their value unused: the completion mask drops them), max(1, AR_FORWARD_ROWS // n) positions per
    chunk. With grad each chunk's forward is recomputed in its backward (torch.utils.checkpoint), so the
    activations of one chunk are live at a time, as theirs backpropagates token by token (J:grpo.py:50).
    estimate: ar_input's (template, mask_id). max_chunks: the dry run's, the first chunks alone (every chunk
    has the same shapes), the other positions' log-probs left 0."""
    template, mask_id = estimate
    sequences, template = sequences[rows], template[rows]
    mask = None if attention_mask is None else attention_mask[rows]
    n, L = sequences.shape
    per_chunk, _ = ar_chunks(n, L - prompt_length)
    columns = []
    for start in range(prompt_length, L, per_chunk)[:max_chunks]:
        chunk = (policy, sequences, template, mask, start, min(start + per_chunk, L), mask_id)
        columns.append(torch.utils.checkpoint.checkpoint(ar_chunk_logprobs, *chunk, use_reentrant=False)
                       if torch.is_grad_enabled() else ar_chunk_logprobs(*chunk))
    done = sum(column.shape[1] for column in columns)
    columns.append(torch.zeros(n, L - prompt_length - done, device=sequences.device))
    return torch.cat(columns, dim=1)


# one forward row per completion position
ESTIMATORS["ar"] = lambda args, sampler: (ar_input, ar_logprobs, sampler["gen_length"])


def check_ar(args, sampler):
    """--estimator ar is exact only for the rollouts whose order it reads: one position a step, left to
    right, each read from the full state (LLaDA's sampler), and the prompt unmasked."""
    if args.estimator != "ar":
        return
    gen_length = sampler["gen_length"]
    if args.p_mask_prompt:
        raise SystemExit(f"--estimator ar reads the prompt as the sampler saw it: pass --p-mask-prompt 0 "
                         f"(not {args.p_mask_prompt})")
    if sampler["block_length"] != 1 or sampler["steps"] != gen_length:
        raise SystemExit(f"--estimator ar is the exact likelihood of left-to-right rollouts, one position a "
                         f"step: pass --rollout-order left-to-right (block length 1, {gen_length} steps; now "
                         f"block length {sampler['block_length']}, {sampler['steps']} steps)")
    if sampler["cache"] != "none" or sampler["threshold"] is not None:
        raise SystemExit("--estimator ar is checked against LLaDA's sampler, and at block length 1 a cache "
                         "or a threshold saves no forward pass: drop --rollout-cache and --rollout-threshold")


CHECKS.append(check_ar)


# -----------------------------------------------------------------------------
# d2-StepMerge (Wang, Turok, Schiff, Arriola, Kuleshov 2025, "d2"): the sampler's trajectory, chunk by chunk


# d2's N in its released GSM8K run: 128 steps over 8 blocks of 32, so a chunk is one block's 16 steps
MERGE_CHUNKS = 8


def merge_boundaries(steps, num_chunks):
    """[s_0, ..., s_K]: chunk k holds the tokens committed at steps s_k < g <= s_{k+1}. d2's segments,
    int(k * (steps / N)) for 0 < k < N, written as d2 writes them (d2StepMergeTrainer.generate,
    diffu_grpo_trainer.py L804), with s_0 = 0 and s_K = steps."""
    return [0] + [int(k * (steps / num_chunks)) for k in range(1, num_chunks)] + [steps]


def stepmerge_input(sequences, is_prompt, p_mask_prompt, mask_id, generator, *, unmask_step, steps,
                    num_chunks, **rollout):
    """d2-StepMerge's inputs (d2, arXiv 2509.21474; d2StepMergeTrainer.generate and
    _get_per_token_logps_oldandref): the rollout's trajectory cut into K = num_chunks chunks of steps. State k
    is the sampler's x after s_k steps (merge_boundaries): the completion tokens committed by then visible,
    the rest masked. A sampler never changes a committed token, so state k is where(g <= s_k, o, MASK) on the
    action positions, g = unmask_step, the commit step the rollout recorded (generate's record). The
    conditioning tokens (prompt, canvas cells: is_prompt) are masked with p_mask_prompt from the same draw
    as grpo.estimator_input, shared by the K states (d2 L993-1004), so K = 1 is d1's estimator bit for bit.
    sequences, is_prompt (N, L); unmask_step (N, T), 0 on canvas cells; steps: the rollout's. Returns
    (states (K, N, L), chunk (N, T)): chunk[i] = k whose state reads token i (canvas cells: 0)."""
    u = torch.rand(sequences.shape, generator=generator).to(sequences.device)  # estimator_input's draw
    prompt_masked = is_prompt & (u < p_mask_prompt)
    step = torch.zeros_like(sequences)
    step[:, sequences.shape[1] - unmask_step.shape[1]:] = unmask_step  # (N, L), 0 on the prompt
    bounds = merge_boundaries(steps, num_chunks)
    states = torch.stack([torch.where(prompt_masked | (~is_prompt & (step > s)), mask_id, sequences)
                          for s in bounds[:-1]])  # (K, N, L)
    # bucketize: the i with bounds[i - 1] < g <= bounds[i], so chunk i - 1; a canvas cell's g = 0 goes to 0
    chunk = torch.bucketize(unmask_step, torch.tensor(bounds, device=unmask_step.device)) - 1
    return states, chunk.clamp(min=0)


def stepmerge_logprobs(policy, estimate, rows, sequences, attention_mask, prompt_length):
    """d2-StepMerge's per-token log-probs of the batch's `rows` (n, T) (d2's _get_per_token_logps_oldandref,
    diffu_grpo_trainer.py L981-1020): token i of chunk k read from state k, log p(o_i | state_k), so that
        log pi(o | q) ~ sum_k sum_{i in chunk k} log p(o_i | z_{s_k})
    merges the sampler's steps s_k < g <= s_{k+1} into one step from the chunk's first state. One forward per
    chunk, K passes per sequence, each d1's pass on its state. grpo_loss on these is d2's compute_loss
    (L688-750): d2 runs one chunk per micro-step with loss x N / sum(c) and averages the N micro-steps, the
    same sum over tokens. d2 backprops each chunk on its own; here a micro-batch holds its K passes'
    activations and logits until its backward, K x d1's (--grad-checkpointing, or more
    --gradient-accumulation-steps; --dry-run measures it)."""
    states, chunk = estimate
    mask = None if attention_mask is None else attention_mask[rows]
    targets, chunk = sequences[rows, prompt_length:], chunk[rows]  # (n, T) each
    logp = None
    for k in range(len(states)):  # no chunk skipped when empty: every rank runs K passes (FSDP)
        logits = policy(states[k, rows], mask, slice(prompt_length, None))  # (n, T, V)
        logp_k = token_logprobs(logits, targets)
        logp = logp_k if logp is None else torch.where(chunk == k, logp_k, logp)  # K = 1: d1's, untouched
    return logp


ESTIMATORS["stepmerge"] = lambda args, sampler: (
    functools.partial(stepmerge_input, steps=sampler["steps"], num_chunks=args.merge_chunks),
    stepmerge_logprobs, args.merge_chunks)


def stepmerge_flags(parser):
    """--merge-chunks, in grpo.py's command line."""
    parser.add_argument("--merge-chunks", type=int, default=MERGE_CHUNKS,
                        help="K, d2-StepMerge's N (--estimator stepmerge): the rollout's steps cut into K "
                             "chunks, one forward pass each (d2: 8 for 256 tokens / 128 steps)")


def stepmerge_check(args, sampler):
    """Refuse threshold rollouts (no fixed step index) and a K that cannot cut the rollout's steps."""
    if args.estimator != "stepmerge":
        return
    if sampler["threshold"] is not None:
        raise SystemExit("--estimator stepmerge reads each token's commit step, and --rollout-threshold "
                         "runs a varying number of steps per block: drop --rollout-threshold (a "
                         "--rollout-cache is fine)")
    if not 1 <= args.merge_chunks <= sampler["steps"]:
        raise SystemExit(f"--merge-chunks {args.merge_chunks}: chunks of the rollout's {sampler['steps']} "
                         f"steps, so 1 to {sampler['steps']} (or raise --diffusion-steps)")


FLAGS.append(stepmerge_flags)
CHECKS.append(stepmerge_check)


# -----------------------------------------------------------------------------
# SPG, sandwiched policy gradient (Wang et al. 2025, arXiv 2510.09541): ratio-free; a completion of positive
# advantage raises a lower bound of its log-likelihood (the ELBO), one of advantage <= 0 lowers a mix of that
# and an upper bound (the EUBO), both read from m block-wise masked samples. The line numbers below are
# facebookresearch/SPG @ a1c7120, spg/spg_trainer.py.


def spg_input(sequences, is_prompt, p_mask_prompt, mask_id, generator, *, completion_mask, block_length,
              num_samples, min_t=0.0, max_t=1.0, **rollout):
    """SPG's block-wise masking, forward_process with forward_type "block_random" (spg_trainer.py L334-378),
    m = num_samples samples per sequence. The completion is cut into gen_length / block_length blocks; per
    sequence a permutation of the block slots, taken modulo the number of blocks holding completion tokens,
    gives sample j its block k (L342-345). Sample j masks, of the action tokens (~is_prompt):
      - in block k, n of its ml completion tokens, n ~ U{max(int(ml min_t), 1) .. min(int(ml max_t), ml)},
        chosen uniformly (L353-362): the block being denoised, at a random noise level;
      - every one in the blocks after k (L350) and every one after the completion (its first EOS; L370-377);
      - in the blocks before k, each with probability p_mask_prompt, as SPG's released code does: its
        prompt masking reads ~is_mask, the prompt and the earlier blocks (L374), so the blocks the paper
        calls clean are noised like the prompt;
    and each conditioning token (is_prompt: the prompt and a canvas's given cells, wherever they lie) with
    probability p_mask_prompt, as d1's estimator does. A canvas cell is never one of a block's ml tokens, and
    k runs over the blocks holding a completion token (without a canvas: SPG's 0 .. cnb - 1). Every masked
    completion token is counted, in any block, as SPG's loss counts them (its block_mask, L347-352, is never
    read). With block_length = gen_length and min_t = max_t = 1 this is d1's input, the same draw at m = 1.
    SPG's randperm and randint loops become sorts and scalings of uniforms: the same laws, without
    data-dependent shapes (the dry run's fake tensors). sequences, is_prompt (N, L), completion_mask (N, T);
    all randomness on the CPU from `generator`. Returns a dict: inputs (m, N, L); counted (m, N, T),
    M = masked & completion_mask; t (m, N, 1), each sample's empirical masking ratio sum_i M_i / L_b (L534);
    length (N, 1), L_b; block (m, N), k (-1 where no block holds a completion token)."""
    N, L = sequences.shape
    T, m, device = completion_mask.shape[1], num_samples, sequences.device
    P, num_blocks = L - T, T // block_length

    def uniform(*shape):  # on the CPU from `generator`: the same draw on any device
        return torch.rand(shape, generator=generator).to(device)

    u = uniform(m, N, L)  # drawn first: at m = 1 the draw of d1's estimator_input
    slot_keys, count_keys, pick_keys = uniform(N, num_blocks), uniform(m, N, 1), uniform(m, N, T)
    completion, action = completion_mask.bool(), ~is_prompt[:, P:]  # (N, T) each
    position = torch.arange(T, device=device)
    end = torch.where(completion, position + 1, 0).amax(dim=1, keepdim=True)  # (N, 1): after the first EOS
    # k: slot j of a random permutation of the block slots, modulo the count of blocks holding a completion
    # token, names the slot-th of those blocks
    holding = completion.view(N, num_blocks, block_length).any(dim=2)  # (N, nb)
    count = holding.sum(dim=1, keepdim=True)  # (N, 1), SPG's cnb
    slots = slot_keys.argsort(dim=1)[:, :m] % count.clamp(min=1)  # (N, m)
    named = holding.unsqueeze(1) & ((holding.cumsum(dim=1) - 1).unsqueeze(1) == slots.unsqueeze(2))
    block = torch.where(count > 0, named.float().argmax(dim=2), -1).T  # (m, N)
    # block k: n ~ U{low..high} of its ml completion tokens, the n whose keys sort first
    candidates = completion & (position // block_length == block.unsqueeze(2))  # (m, N, T)
    ml = candidates.sum(dim=2, keepdim=True)  # (m, N, 1)
    low, high = (ml * min_t).floor().clamp(min=1), torch.minimum((ml * max_t).floor(), ml)
    n_mask = low + (count_keys * (high - low + 1)).floor()
    rank = torch.where(candidates, pick_keys, 2.0).argsort(dim=2).argsort(dim=2)  # candidates rank first
    chosen = candidates & (rank < n_mask)
    later = position >= (block.unsqueeze(2) + 1) * block_length  # (m, N, T)
    earlier = position < block.unsqueeze(2) * block_length
    forced = chosen | (action & (later | (position >= end)))  # actions only: a canvas cell is conditioning
    noised = is_prompt.expand(m, N, L).clone()
    noised[..., P:] |= earlier & action
    masked = noised & (u < p_mask_prompt)
    masked[..., P:] |= forced
    counted = masked[..., P:] & completion  # (m, N, T)
    length = completion.sum(dim=1, keepdim=True)  # (N, 1)
    t = counted.sum(dim=2, keepdim=True) / length.clamp(min=1)  # (m, N, 1)
    return {"inputs": torch.where(masked, mask_id, sequences), "counted": counted, "t": t, "length": length,
            "block": block}


def spg_logprobs(policy, estimate, rows, sequences, attention_mask, prompt_length, *, eubo_beta):
    """Per-token terms of SPG's two bounds on log pi(o | q) for the batch's `rows`, from ONE forward of their
    m samples (_get_per_seq_logps, L433-559). With M_ij the counted mask of sample j and t_j its ratio:
      channel 0, the ELBO (L520-532, L544): (1/m) sum_j M_ij logp_ij / t_j, whose sum over the completion is
        L_b (1/m) sum_j (sum_i M_ij logp_ij / sum_i M_ij), L_b x SPG's per_seq_logps;
      channel 1, the EUBO (the paper's Sec. 3; L533-546): K_i log(a_i) / beta x L_b / sum_i K_i, with
        a_i = (1/m) sum_j M_ij p_ij^beta / t_j and K_i = 1[a_i > 0] (masked in some sample), whose sum is
        L_b x SPG's per_seq_logps_negative under "eubo".
    a_i is taken in log space in fp32 (SPG: softmax in the logits' dtype, then pow), and a token masked in no
    sample reads 0 on both channels with a zero, not NaN, gradient. Returns (n, 2, T) in fp32."""
    inputs = estimate["inputs"][:, rows]  # (m, n, L)
    m, n, L = inputs.shape
    mask = None if attention_mask is None else attention_mask[rows].repeat(m, 1)
    logits = policy(inputs.reshape(m * n, L), mask, slice(prompt_length, None))  # (m n, T, V)
    logp = token_logprobs(logits, sequences[rows, prompt_length:].repeat(m, 1)).view(m, n, -1).float()
    counted, t = estimate["counted"][:, rows], estimate["t"][:, rows].float()  # (m, n, T), (m, n, 1)
    t = torch.where(t > 0, t, torch.ones_like(t))  # t = 0 only where nothing is counted
    elbo = (counted * logp / t).mean(dim=0)  # (n, T)
    # log a_i = logsumexp_j(beta logp_ij - log t_j over the samples masking i) - log m; a token masked in no
    # sample gets zeros in place of -inf (logsumexp of all -inf has a NaN gradient) and reads 0 below
    read = counted.any(dim=0)  # K (n, T)
    log_terms = torch.where(counted, eubo_beta * logp - torch.log(t), -math.inf)
    log_a = torch.logsumexp(torch.where(read, log_terms, 0.0), dim=0) - math.log(m)  # (n, T)
    scale = estimate["length"][rows].float() / read.sum(dim=1, keepdim=True).clamp(min=1)  # L_b / sum_i K_i
    eubo = torch.where(read, log_a, 0.0) * scale / eubo_beta
    return torch.stack([elbo, eubo], dim=1)


def spg_sequence_weights(advantages, num_generations):
    """SPG's advantages are d1's, A = r - mean of the group (L717-720; --scale-rewards group divides by the
    std, as for d1): (N, 1) unchanged."""
    return advantages


def spg_loss(logp, mask, weights, num_groups, *, omega):
    """SPG's loss (compute_loss, L87-126; the bound per sign, L545-556): per row S_b = L_b x the ELBO when
    A_b > 0, else L_b x (omega EUBO + (1 - omega) ELBO) (omega 1: "eubo", mix_weight: "mix", 0: "elbo");
        loss = -sum_b A_b S_b / sum_b L_b,
    normalised, as SPG's, by the micro-batch's completion tokens (num_groups unused). logp (n, 2, T) of
    spg_logprobs, mask (n, T) of 0/1, weights (n, 1) = A."""
    elbo = (logp[:, 0] * mask).sum(dim=1, keepdim=True)  # (n, 1)
    eubo = (logp[:, 1] * mask).sum(dim=1, keepdim=True)
    bound = torch.where(weights > 0, elbo, omega * eubo + (1 - omega) * elbo)
    return -(weights * bound).sum() / mask.sum().clamp(min=1)


# --spg-bound -> omega, the EUBO's share in the bound of a completion with A <= 0 (SPG's logp_estimation);
# None: --spg-mix-weight
SPG_EUBO_WEIGHT = {"eubo": 1.0, "mix": None, "elbo": 0.0}


def spg_flags(parser):
    """SPG's settings; the released runs: --spg-bound mix, --spg-samples 2, --block-length 32."""
    add = parser.add_argument
    add("--spg-bound", default="mix", choices=list(SPG_EUBO_WEIGHT),
        help="SPG: the bound of a completion with advantage <= 0: the EUBO, a mix with the ELBO, or the ELBO")
    add("--spg-mix-weight", type=float, default=0.5, help="SPG: the EUBO's weight in --spg-bound mix")
    add("--spg-eubo-beta", type=float, default=1.5, help="SPG: the EUBO's beta (released 1.5; countdown 2.0)")
    add("--spg-samples", type=int, default=2,
        help="SPG: m, masked samples (forward rows) per sequence, at most gen_length / block_length")


def spg_check(args, sampler):
    """Refuse half of SPG (its estimator or its objective alone) and settings its masks cannot draw."""
    if (args.objective == "spg") != (args.estimator == "spg"):
        raise SystemExit("--objective spg reads the two bounds that --estimator spg computes, and nothing "
                         "else reads them: pass --estimator spg --objective spg together, or neither")
    if args.estimator != "spg":
        return
    num_blocks = sampler["gen_length"] // sampler["block_length"]
    if not 1 <= args.spg_samples <= num_blocks:  # SPG asserts num_t <= num_blocks (L341)
        raise SystemExit(f"--spg-samples {args.spg_samples}: SPG draws each sample's block from the "
                         f"{num_blocks} block(s) of {sampler['block_length']} tokens without replacement; "
                         f"pass 1 to {num_blocks}, or a smaller --block-length")
    if args.spg_eubo_beta <= 0:
        raise SystemExit(f"--spg-eubo-beta {args.spg_eubo_beta}: the EUBO's beta must be > 0")
    if not 0 <= args.spg_mix_weight <= 1:
        raise SystemExit(f"--spg-mix-weight {args.spg_mix_weight}: a weight in [0, 1]")


ESTIMATORS["spg"] = lambda args, sampler: (  # SPG masks the sampler's blocks
    functools.partial(spg_input, block_length=sampler["block_length"], num_samples=args.spg_samples),
    functools.partial(spg_logprobs, eubo_beta=args.spg_eubo_beta), args.spg_samples)
RATIO_FREE_OBJECTIVES["spg"] = lambda args: (spg_sequence_weights, functools.partial(
    spg_loss, omega=args.spg_mix_weight if SPG_EUBO_WEIGHT[args.spg_bound] is None
    else SPG_EUBO_WEIGHT[args.spg_bound]))
FLAGS.append(spg_flags)
CHECKS.append(spg_check)


# -----------------------------------------------------------------------------
# IGPO, inpainting-guided policy optimisation (Zhao et al. 2025, "Inpainting-Guided Policy Optimization for
# Diffusion Large Language Models", arXiv 2509.10396): a group whose completions are all wrong has no
# advantage and no gradient, so it is sampled again with chunks of the reference answer written into the
# completion (hints the sampler keeps), and up to max_replacements of its failed rows become correct hinted
# ones. The line numbers below are facebookresearch/igpo @ e85eaea (I:), trainer_igpo.py and
# utils/generate.py. What differs from their released code, and why:
# - a group is regenerated when none of its completions is correct (their all_wrong reads the device's batch,
#   I:trainer_igpo.py:1282-1286,1420-1422, which their run makes one group: per-device batch 8 = G 8);
# - every draw (ratios, chunks, the pick of the correct rows) comes from a torch.Generator of
#   (seed, step, rank, group), theirs from the global `random` and torch RNGs (the same laws);
# - their sampler ends every row early when a block is all <|endoftext|> (I:utils/generate.py:911-920); ours
#   samples every position, for the hinted rows as for the plain ones;
# - the 30-token free tail (I:utils/generate.py:502) is at most a third of gen_length: the tiny task's 20
#   tokens would otherwise leave no room for a hint;
# - an infilling task's canvas is merged under the hints (its given tokens win): theirs has no canvas;
# - the loss keeps d1's completion mask (up to the first EOS); theirs trains every position
#   (I:trainer_igpo.py:617,681-686), and reads the hints' entropies from its old-policy pass (mu > 1 only),
#   here from a pass of their estimator's input (below).

# IGPO's run (I:run_igpo.sh:5,147-148,156; max_spacing from I:trainer_igpo.py:877 and its config default)
INPAINT_RATIO_RANGE = (0.2, 0.6)  # the share of chunks revealed, r ~ U(low, high), sorted within the group
INPAINT_CHUNK_SIZES = (5, 10)     # chunk lengths in tokens, inclusive
INPAINT_FREE_TAIL = 30            # the last completion positions never hinted
INPAINT_MAX_SPACING = 100         # the cap on a stretched gap between two revealed chunks
INPAINT_MAX_REPLACEMENTS = 4      # failed rows of a group replaced by correct hinted ones, at most
INPAINT_ENTROPY_KEEP = 0.2        # the share of a row's hint tokens kept in the loss, by entropy
# a tag in the generators' seeds: (seed, step, rank, IGPO_STREAM, ...) never meets the rollout's
# (seed, step, rank, batch) streams
IGPO_STREAM = 0x16B0


def hint_chunks(num_tokens, inpaint_ratio, generator, min_chunk=5, max_chunk=10, reveal_last=True):
    """IGPO's chunking (create_spacing_scaled_inpainting_sequence, I:utils/generate.py:551-594): the first
    num_tokens reference tokens cut from the start into chunks of min_chunk..max_chunk tokens (a remainder
    shorter than min_chunk dropped, never revealed), int(n (1 - inpaint_ratio)) of the n chunks hidden, drawn
    uniformly without replacement, and the last chunk revealed whatever the draw (their
    inpaint_last_chunk_end, True as called, I:utils/generate.py:799-815). Returns the revealed (start, end)
    in order."""
    chunks, i = [], 0
    while i < num_tokens:
        size = min(int(torch.randint(min_chunk, max_chunk + 1, (1,), generator=generator)), num_tokens - i)
        if size < min_chunk:  # theirs: too short a chunk is hard to inpaint
            break
        chunks.append((i, i + size))
        i += size
    hidden = set(torch.randperm(len(chunks), generator=generator)[:int(len(chunks) * (1 - inpaint_ratio))]
                 .tolist())
    return [c for k, c in enumerate(chunks) if k not in hidden or (reveal_last and k == len(chunks) - 1)]


def place_hints(ref_ids, revealed, gen_length, free_tail, mask_id, max_spacing=INPAINT_MAX_SPACING):
    """IGPO's placement (scale_chunk_positions and its caller, I:utils/generate.py:520-524,597-640,671-724):
    the revealed chunks of ref_ids written into an all-[MASK] completion (gen_length,), stretched by
    s = clamp(effective / len(ref_ids), 1, 1.5) over the effective region effective = gen_length - free_tail:
    the first chunk at int(start s), each next one after the previous placed end by its original gap times s,
    capped at max_spacing; a chunk that crosses the effective region is cut there, and the chunks after it
    dropped."""
    effective = max(0, gen_length - free_tail)
    hints = torch.full((gen_length,), mask_id, dtype=torch.long)
    if not ref_ids:
        return hints
    scale = min(1.5, max(1.0, effective / len(ref_ids)))  # the whole reference's length, as theirs
    placed_end = original_end = None
    for start, end in revealed:
        if placed_end is None:
            at = int(start * scale)
        else:  # the original gap from the previous revealed chunk, stretched, capped
            at = placed_end + min(int((start - original_end) * scale), max_spacing)
        if at >= effective:
            break
        placed_end, original_end = min(at + end - start, effective), end
        hints[at:placed_end] = torch.tensor(ref_ids[start:start + placed_end - at])
    return hints


def hint_canvas(ref_ids, inpaint_ratio, gen_length, free_tail, mask_id, generator,
                chunk_sizes=INPAINT_CHUNK_SIZES, max_spacing=INPAINT_MAX_SPACING):
    """One row's hints (gen_length,): hint_chunks over the reference cut to the effective region
    (I:utils/generate.py:533-534), then place_hints."""
    num_tokens = min(len(ref_ids), max(0, gen_length - free_tail))
    revealed = hint_chunks(num_tokens, inpaint_ratio, generator, *chunk_sizes) if num_tokens else []
    return place_hints(ref_ids, revealed, gen_length, free_tail, mask_id, max_spacing)


def hint_entropy(model, sequences, attention_mask, given, prompt_length, mask_id):
    """The policy's predictive entropy -sum_v p_v log p_v at each completion position (n, T), fp32, one row
    at a time, read from IGPO's estimator input (d1_masking: every completion token masked, hints included,
    the prompt clean, I:trainer_igpo.py:962-978,1005): their per-token entropy (I:trainer_igpo.py:1119-1125).
    Their mu inputs are all that one input, so one filter is theirs at every inner iteration; d1's estimator
    also masks prompt tokens (p_mask_prompt), which this pass does not. One forward per replaced row.
    sequences (n, L); given (n, T): a canvas's given tokens, kept; attention_mask (n, L) or None."""
    completion = sequences[:, prompt_length:]
    inputs = torch.cat([sequences[:, :prompt_length], torch.where(given, completion, mask_id)], dim=1)
    rows = []
    for i in range(len(inputs)):  # one row's (T, V) fp32 logits at a time
        mask = None if attention_mask is None else attention_mask[i:i + 1]
        logp = torch.log_softmax(model(inputs[i:i + 1], mask, slice(prompt_length, None)).float(), dim=-1)
        rows.append(-(logp.exp() * logp).sum(dim=-1))
    return torch.cat(rows)


def keep_top_entropy_hints(entropy, hint_mask, completion_mask, keep_ratio):
    """IGPO's entropy filter (I:trainer_igpo.py:1764-1826): in each row, of its hint tokens in the loss, only
    the max(1, int(n keep_ratio)) of highest entropy stay; every other token is untouched. entropy (N, T),
    hint_mask and completion_mask (N, T) bool. Returns the filtered completion mask."""
    kept = completion_mask.clone()
    candidates = hint_mask & completion_mask
    for i in candidates.any(dim=1).nonzero().flatten().tolist():
        positions = candidates[i].nonzero().flatten()
        top = entropy[i, positions].topk(max(1, int(len(positions) * keep_ratio))).indices
        kept[i, positions] = False
        kept[i, positions[top]] = True
    return kept


# IGPO's correct: its correctness reward at full marks (3.0, I:trainer_igpo.py:1282-1286,1568); per task the
# reward whose full marks (1.0) mean a correct completion
CORRECTNESS_REWARDS = {"gsm8k": rewards.gsm8k_correctness_reward, "math500": rewards.math_correctness_reward,
                       "countdown": rewards.countdown_reward, "sudoku": rewards.sudoku_reward,
                       "tiny_sudoku": rewards.tiny_sudoku_solved_reward,
                       "tiny_countdown": rewards.countdown_reward}


def correctness(task):
    """The task's predicate correct(texts, record) -> [bool] of texts completing one record."""
    reward = CORRECTNESS_REWARDS[task]

    def correct(texts, record):
        columns = {k: [v] * len(texts) for k, v in data.record_columns(record).items()}
        return [r >= 1.0 for r in reward(texts, **columns)]
    return correct


@torch.no_grad()
def inpaint_zero_std_groups(model, tokenizer, records, rollout, correct, sampler, *, num_generations, mask_id,
                            noise_seed, batch_size=None, stats=None, ratio_range=INPAINT_RATIO_RANGE,
                            chunk_sizes=INPAINT_CHUNK_SIZES, free_tail=INPAINT_FREE_TAIL,
                            max_spacing=INPAINT_MAX_SPACING, max_replacements=INPAINT_MAX_REPLACEMENTS,
                            entropy_keep=INPAINT_ENTROPY_KEEP):
    """IGPO's rescue of the all-wrong groups (I:trainer_igpo.py:1423-1632), after a step's rollout:
    1. the groups where correct() holds for no completion are sampled again, G rows each, row j of a group
       hinted with inpaint ratio r_j, r ~ U(ratio_range) sorted ascending (I:trainer_igpo.py:1459-1470,1482);
       the hints are the record's "completion" (the SFT target, tokenised without special tokens, as
       I:utils/generate.py:517) by hint_canvas, merged into the task's canvas (its given tokens win);
    2. of a group's hinted rows, those correct() accepts, k = min(their count, max_replacements) of them (a
       random k when more, else in order: increasing r), overwrite the group's rows 0..k-1 (one attempt,
       I:trainer_igpo.py:1431,1560-1611); nothing changes in a group with no correct hinted row;
    3. the hints of the replaced rows are actions of the policy, in the loss as IGPO trains them, filtered by
       keep_top_entropy_hints on hint_entropy when entropy_keep < 1.
    rollout: grpo.rollout's (sequences (N, L), attention_mask, canvas, completion_mask (N, T), texts),
    groups of G contiguous rows; noise_seed: (seed, step, rank); batch_size: rows per sampler call; stats:
    generate's (the hinted samples' forward passes added). Returns (sequences, completion_mask, texts,
    hint_mask (N, T) of the replaced rows' hint positions, metrics); the inputs are not modified."""
    sequences, attention_mask, canvas, completion_mask, texts = rollout
    G, T, device = num_generations, sampler["gen_length"], sequences.device
    P = sequences.shape[1] - T
    failed = [g for g, record in enumerate(records) if not any(correct(texts[g * G:(g + 1) * G], record))]
    hint_mask = torch.zeros_like(completion_mask, dtype=torch.bool)
    metrics = {"igpo_groups": float(len(failed)), "igpo_replaced": 0.0, "igpo_hint_tokens": 0.0}
    if not failed:
        return sequences, completion_mask, texts, hint_mask, metrics
    sequences, completion_mask, texts = sequences.clone(), completion_mask.clone(), list(texts)
    # 1. hints, G per failed group, then the sampler on every hinted row
    low, high = ratio_range
    draws, hints = [], []
    for g in failed:
        draws.append(data.generator(*noise_seed, IGPO_STREAM, 0, g))
        ratios = (low + (high - low) * torch.rand(G, generator=draws[-1])).sort().values
        ref_ids = tokenizer(records[g]["completion"] or "", add_special_tokens=False)["input_ids"]
        hints += [hint_canvas(ref_ids, float(r), T, free_tail, mask_id, draws[-1], chunk_sizes, max_spacing)
                  for r in ratios]
    rows = torch.tensor([g * G + j for g in failed for j in range(G)], device=device)
    hints = torch.stack(hints).to(device)  # (F G, T)
    task_canvas = None if canvas is None else canvas[rows]
    start = hints if task_canvas is None else torch.where(task_canvas != mask_id, task_canvas, hints)
    prompt_mask = None if attention_mask is None else attention_mask[rows, :P]
    batch_size, samples = batch_size or len(rows), []
    for b in range(0, len(rows), batch_size):  # as generate_records batches the rollout
        batch = slice(b, b + batch_size)
        samples.append(generate(model, sequences[rows[batch], :P], canvas=start[batch], mask_id=mask_id,
                                attention_mask=None if prompt_mask is None else prompt_mask[batch],
                                stats=stats,
                                generator=data.generator(*noise_seed, IGPO_STREAM, 1, b, device=device),
                                **sampler))
    hinted = torch.cat(samples)  # (F G, L)
    # the task's canvas alone is the conditioning: the hints are actions (IGPO trains them)
    hinted_mask, hinted_texts = read_completions(tokenizer, hinted[:, P:], task_canvas, mask_id)
    new_hint = hints != mask_id  # (F G, T): the positions the hints fix, less the task's given ones
    if task_canvas is not None:
        new_hint &= task_canvas == mask_id
    # 2. correct hinted rows into rows 0..k-1 of their group
    replaced = []
    for k, g in enumerate(failed):
        accepted = torch.tensor(correct(hinted_texts[k * G:(k + 1) * G], records[g]), dtype=torch.bool)
        chosen = accepted.nonzero().flatten()
        if len(chosen) > max_replacements:  # theirs: a random subset (I:trainer_igpo.py:1578-1584)
            chosen = chosen[torch.randperm(len(chosen), generator=draws[k])[:max_replacements]]
        for i, j in enumerate(chosen.tolist()):
            source, target = k * G + j, g * G + i
            sequences[target], completion_mask[target] = hinted[source], hinted_mask[source]
            texts[target], hint_mask[target] = hinted_texts[source], new_hint[source]
            replaced.append(target)
    metrics["igpo_replaced"] = float(len(replaced))
    replaced = torch.tensor(replaced, dtype=torch.long, device=device)
    # 3. the entropy filter on the replaced rows' hint tokens
    if len(replaced) and entropy_keep < 1:
        given = (torch.zeros_like(hint_mask[replaced]) if canvas is None else canvas[replaced] != mask_id)
        entropy = torch.zeros(hint_mask.shape, device=device)
        entropy[replaced] = hint_entropy(model, sequences[replaced], None if attention_mask is None
                                         else attention_mask[replaced], given, P, mask_id)
        completion_mask = keep_top_entropy_hints(entropy, hint_mask, completion_mask, entropy_keep)
    metrics["igpo_hint_tokens"] = float((hint_mask & completion_mask).sum())
    return sequences, completion_mask, texts, hint_mask, metrics


def igpo_settings(args, sampler):
    """inpaint_zero_std_groups' keyword settings from grpo.py's command line (the free tail at most a third
    of gen_length)."""
    return {"ratio_range": (args.inpaint_ratio_low, args.inpaint_ratio_high),
            "chunk_sizes": (args.inpaint_chunk_min, args.inpaint_chunk_max),
            "free_tail": min(args.inpaint_free_tail, sampler["gen_length"] // 3),
            "max_spacing": args.inpaint_max_spacing, "max_replacements": args.inpaint_max_replacements,
            "entropy_keep": args.inpaint_entropy_keep}


def igpo_step(args, model, tokenizer, records, rollout, sampler, *, mask_id, noise_seed, stats=None):
    """grpo.py's hook: inpaint_zero_std_groups with the command line's settings and the task's correctness.
    Returns (sequences, completion_mask, texts, metrics); completion_mask is the loss's (the replaced rows'
    hint tokens filtered by entropy), which grpo.py also logs as completion_length."""
    sequences, completion_mask, texts, _, metrics = inpaint_zero_std_groups(
        model, tokenizer, records, rollout, correctness(args.task), sampler,
        num_generations=args.num_generations, mask_id=mask_id, noise_seed=noise_seed,
        batch_size=args.generation_batch_size, stats=stats,
        **igpo_settings(args, sampler))
    return sequences, completion_mask, texts, metrics


def igpo_flags(parser):
    """IGPO's settings, its run's values as defaults."""
    add = parser.add_argument
    add("--inpaint-zero-std-groups", action="store_true",
        help="IGPO: sample the groups with no correct completion again with hints from the reference "
             "completion, and replace failed rows with correct hinted ones")
    add("--inpaint-ratio-low", type=float, default=INPAINT_RATIO_RANGE[0],
        help="IGPO: the lowest share of reference chunks revealed (r ~ U(low, high), sorted in the group)")
    add("--inpaint-ratio-high", type=float, default=INPAINT_RATIO_RANGE[1],
        help="IGPO: the highest share of reference chunks revealed")
    add("--inpaint-chunk-min", type=int, default=INPAINT_CHUNK_SIZES[0],
        help="IGPO: the shortest reference chunk, in tokens")
    add("--inpaint-chunk-max", type=int, default=INPAINT_CHUNK_SIZES[1],
        help="IGPO: the longest reference chunk, in tokens")
    add("--inpaint-free-tail", type=int, default=INPAINT_FREE_TAIL,
        help="IGPO: the last completion tokens never hinted (at most a third of gen_length)")
    add("--inpaint-max-spacing", type=int, default=INPAINT_MAX_SPACING,
        help="IGPO: the longest stretched gap between two revealed chunks, in tokens")
    add("--inpaint-max-replacements", type=int, default=INPAINT_MAX_REPLACEMENTS,
        help="IGPO: failed rows of a group replaced by correct hinted ones, at most (1 to G)")
    add("--inpaint-entropy-keep", type=float, default=INPAINT_ENTROPY_KEEP,
        help="IGPO: the share of a replaced row's hint tokens kept in the loss, highest entropy first "
             "(1: every hint token)")


def igpo_check(args, sampler):
    """Refuse settings IGPO's draws cannot make, a task without a correctness reward and the estimator
    that reads the sampler's commit steps (a hint has none)."""
    if not args.inpaint_zero_std_groups:
        return
    if args.task not in CORRECTNESS_REWARDS:
        raise SystemExit(f"--inpaint-zero-std-groups replaces failed rows with correct ones: --task "
                         f"{args.task} has no correctness reward (tasks: {sorted(CORRECTNESS_REWARDS)})")
    if not 0 < args.inpaint_ratio_low <= args.inpaint_ratio_high < 1:  # IGPO special-cases 0 and 1
        raise SystemExit(f"--inpaint-ratio-low {args.inpaint_ratio_low} --inpaint-ratio-high "
                         f"{args.inpaint_ratio_high}: shares of chunks revealed, 0 < low <= high < 1")
    if not 1 <= args.inpaint_chunk_min <= args.inpaint_chunk_max:
        raise SystemExit(f"--inpaint-chunk-min {args.inpaint_chunk_min} --inpaint-chunk-max "
                         f"{args.inpaint_chunk_max}: chunk lengths, 1 <= min <= max")
    if args.inpaint_free_tail < 0 or args.inpaint_max_spacing < 0:
        raise SystemExit("--inpaint-free-tail and --inpaint-max-spacing are numbers of tokens, >= 0")
    if not 1 <= args.inpaint_max_replacements <= args.num_generations:
        raise SystemExit(f"--inpaint-max-replacements {args.inpaint_max_replacements}: rows of a group of "
                         f"{args.num_generations}, 1 to {args.num_generations}")
    if not 0 < args.inpaint_entropy_keep <= 1:
        raise SystemExit(f"--inpaint-entropy-keep {args.inpaint_entropy_keep}: a share in (0, 1]")
    if args.estimator in ("stepmerge", "ar", "spg"):  # each reads how the completion was sampled, or its span
        raise SystemExit(f"--estimator {args.estimator} reads what the sampler did (the commit steps, the "
                         "left-to-right order, the completion's blocks), and a hint was never sampled: drop "
                         "--inpaint-zero-std-groups, or use --estimator d1 or coupled")


FLAGS.append(igpo_flags)
CHECKS.append(igpo_check)


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
