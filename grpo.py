"""
Stage 2 of d1: diffu-GRPO (Zhao, Gupta, Zheng, Grover 2025, "d1: Scaling Reasoning in Diffusion Large
Language Models via Reinforcement Learning", Sec. 3.2 and Algorithm 1).

Each step, top to bottom:
  1. rollouts: for each prompt q of the step, G completions o_1..o_G from the sampler (generate.py);
     completion_mask keeps the tokens up to and including the first EOS;
  2. rewards r_i: the task's weighted reward functions (rewards.py);
  3. advantages A_i = r_i - mean(r_1..r_G) over the group (d1 does not divide by the std; optional);
  4. the one-pass log-prob estimate, d1's heart: mask every completion token and each prompt token with
     probability p_mask_prompt, run ONE forward pass, read log pi(o_k | q) = -CE(logits_k, o_k) at every
     completion position. Iteration k of the mu inner iterations uses its own prompt mask, drawn from its
     own seed, and the old, reference and current policies all see that same mask;
  5. before the inner loop, without grad: old log-probs for each of the mu masks (mu > 1) and reference
     log-probs (beta > 0; with LoRA the reference is the base model with the adapters switched off);
  6. mu inner iterations, iteration k on mask k: ratio = exp(logp - old_logp_k) per token,
        loss_tok = -min(ratio A, clip(ratio, 1 - eps, 1 + eps_high) A) + beta KL_k,
        KL_k = exp(ref - logp) - (ref - logp) - 1,
     loss = sum(loss_tok * mask) / sum(mask); one optimiser step per iteration.

Beyond d1, two switches (the defaults are d1's, and with them a run is bit-identical to this script before them):
  --estimator coupled (DiffuCoder's coupled-GRPO, Gong et al. 2025): step 4 with two passes per iteration whose
     masks over the completion's action tokens are complementary at a random ratio t ~ U(0.2, 0.8) per sequence;
     each token's log-prob is read from the pass that masked it, the other pass's tokens as context, weighted
     1/(2t) or 1/(2(1 - t)) (an antithetic pair of ELBO samples; coupled_estimator_input below). Twice d1's
     forward passes; the prompt is masked as d1 masks it.
  --objective wd1 (Tang et al. 2025): step 6 becomes the ratio-free weighted log-likelihood
        loss = -(1/P) sum_groups sum_i (w+_i - w-_i) log pi(o_i | q),  w+ = softmax_G(A), w- = softmax_G(-A),
     P the number of groups, log pi(o_i | q) the sum of the estimated token log-probs; step 5 vanishes (no old,
     no reference log-probs: mu forward passes per rollout batch instead of up to 3 mu). wd1 refuses --beta,
     --epsilon, --epsilon-high and --sync-ref-every: it has no ratio, no KL term and no reference policy.
  `python estimator_stats.py` measures each estimator's bias and variance against a Monte-Carlo ELBO.

Where this script departs from d1's released code (each a bug there; the README's table lists every difference):
  - masks come from a torch.Generator per iteration, never from reseeding the global RNGs (which in d1
    makes the next rollouts a function of the last mask seed);
  - each precomputed mask is used exactly once per rollout batch (d1's counter skips half of them under
    gradient accumulation);
  - mu = 1 with beta > 0 works (it crashes in d1); beta = 0 skips the reference pass;
  - --sync-ref-every really mixes the policy into the reference, exactly on the effective weights (silently a
    no-op in d1 with LoRA);
  - log-probs that enter a ratio are computed with dropout off, so the first ratio is exactly 1.

Infilling tasks (the tiny Sudoku default) give the sampler a canvas: the completion with the given cells
already written. Those tokens are context, not actions: the loss skips them and the estimator treats them
as prompt tokens (masking them like actions, as d1 masks a whole completion, made RL stall on the tiny task).

    python grpo.py                                     # the tiny default, after `python sft.py`
    torchrun --standalone --nproc_per_node=2 grpo.py   # the same over 2 CPU processes (gloo)
    torchrun --standalone --nproc_per_node=8 grpo.py --model checkpoints/LLaDA-8B-Instruct-SFT --task gsm8k \\
        --lora-r 128 --lora-alpha 64 --lora-targets q_proj,k_proj,v_proj,up_proj --prompts-per-step 16 \\
        --num-generations 6 --gradient-accumulation-steps 2 --max-prompt-length 200 --max-completion-length 256 \\
        --block-length 32 --diffusion-steps 128 --temperature 0.9 --num-iterations 12 --beta 0.04 --epsilon 0.5 \\
        --lr 3e-6 --lr-schedule constant_with_warmup --warmup-ratio 0.0001 --adam-beta2 0.99 --weight-decay 0.1 \\
        --max-grad-norm 0.2 --grad-checkpointing --max-steps 642 --save-every 8 --eval-every 8 \\
        --eval-examples 256 --out-dir out/grpo-gsm8k   # 7,704 updates; the README has every task's budget
    torchrun --nnodes 2 --nproc_per_node=8 --rdzv-backend c10d --rdzv-endpoint HOST:PORT grpo.py ...  # each node
"""

import argparse
import contextlib
import copy
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint as C
import data
import ddp
import model as M
import rewards
from evaluate import evaluate_examples
from generate import CACHE_MODES, forward_passes_per_token, generate, left_pad, read_completions

# -----------------------------------------------------------------------------
# The one-pass estimator's input and the objectives (defined before the script so that the tests and
# estimator_stats.py can import them)


LOGPROB_CHUNK_ELEMENTS = 2**28  # ~1 GiB of fp32 logits at a time in token_logprobs


def token_logprobs(logits, targets):
    """log p(target) at every position: -CE(logits_i, target_i). logits (B, L, V), targets (B, L) -> (B, L).
    Computed in fp32 chunks of rows to bound the (B, L, V) fp32 copy; each chunk is flattened to
    (rows * L, V), which needs no copy (cross_entropy over a transposed (B, V, L) view made one)."""
    B, L, V = logits.shape
    rows = max(1, LOGPROB_CHUNK_ELEMENTS // max(1, L * V))
    return torch.cat([-F.cross_entropy(logits[i:i + rows].float().flatten(0, 1), targets[i:i + rows].flatten(),
                                       reduction="none").view(-1, L) for i in range(0, B, rows)])


def conditioning_mask(sequences, prompt_length, canvas, mask_id):
    """is_prompt (N, L): the tokens the policy conditions on, the prompt and, in infilling tasks, the canvas
    tokens the sampler was given (the rest of the completion is the policy's actions)."""
    is_prompt = torch.ones_like(sequences, dtype=torch.bool)
    is_prompt[:, prompt_length:] = False if canvas is None else canvas != mask_id
    return is_prompt


def estimator_input(sequences, is_prompt, p_mask_prompt, mask_id, generator):
    """d1's one-pass log-prob estimator, its input (d1 Sec. 3.2): every completion token masked and each
    prompt token masked independently with probability p_mask_prompt. sequences (N, L); is_prompt (N, L)
    bool marks the conditioning tokens: the prompt, and in infilling tasks the canvas tokens the sampler
    was given (they are context, not actions). The random matrix is drawn on the CPU for the whole batch
    from `generator`, so the same seed gives the same mask on any device and for any chunking of the batch."""
    u = torch.rand(sequences.shape, generator=generator).to(sequences.device)
    masked = ~is_prompt | (u < p_mask_prompt)
    return torch.where(masked, torch.full_like(sequences, mask_id), sequences)


# DiffuCoder's released coupled-GRPO draws its masking ratio from U(0.2, 0.8): a ratio near 0 or 1 would give
# the 1/t or 1/(1 - t) weight below an unbounded variance
COUPLED_MASK_RATIO_RANGE = (0.2, 0.8)


def coupled_estimator_input(sequences, is_prompt, p_mask_prompt, mask_id, generator,
                            ratio_range=COUPLED_MASK_RATIO_RANGE):
    """Coupled sampling's input (DiffuCoder, Gong et al. 2025, coupled-GRPO): two passes whose masks over the
    action tokens (~is_prompt) are complementary. Per sequence t ~ U(ratio_range) and u ~ U(0, 1) per token;
    pass 1 masks the action tokens with u < t, pass 2 the others, so every action token is masked in exactly
    one pass and is read there with the other pass's tokens as context. The conditioning tokens (is_prompt)
    are masked as in d1's estimator, each with probability p_mask_prompt, the same draw in both passes.
    Each token's log-prob is weighted by the inverse of its pass's masking rate, halved because the two
    passes are two samples of LLaDA's ELBO, log p(x) >= E_t[(1/t) sum_{i masked at t} log p(x_i | x_t)]:
        log pi(o | q) ~ 1/2 [ (1/t) sum_{i in M_1} log p(o_i | x^1) + 1/(1-t) sum_{i in M_2} log p(o_i | x^2) ],
    an antithetic (t, 1 - t) pair (DiffuCoder also averages this with d1's fully masked pass; we do not).
    sequences, is_prompt (N, L); all randomness on the CPU from `generator`, as estimator_input.
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


def group_advantages(rewards, num_generations, scale_rewards="none"):
    """A_i = r_i - mean(r_1..r_G) within each group of G contiguous completions (d1 does not divide by the
    group's std, TRL's default; scale_rewards="group" does, with TRL's + 1e-4). rewards (N,) -> (N, 1)."""
    grouped = rewards.view(-1, num_generations)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + 1e-4)
    return advantages.reshape(-1, 1)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, epsilon, epsilon_high, beta):
    """The clipped diffu-GRPO objective (d1 eq. 3, with the k3 KL estimate), averaged over the masked-in
    completion tokens. logp, old_logp, ref_logp (N, T) per-token log-probs (ref_logp None when beta = 0),
    advantages (N, 1), mask (N, T) of 0/1. Returns (loss, mean KL, fraction of tokens whose ratio was clipped)."""
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    loss_tok = -torch.min(ratio * advantages, clipped * advantages)
    denominator = mask.sum().clamp(min=1)
    kl = torch.zeros((), device=logp.device)
    if beta > 0:
        delta = ref_logp - logp
        kl_tok = torch.exp(delta) - delta - 1  # k3: an unbiased, non-negative estimate of KL(pi || ref)
        loss_tok = loss_tok + beta * kl_tok
        kl = (kl_tok * mask).sum() / denominator
    # a token is clipped when the clip, not the ratio, sets its term of the min
    was_clipped = ((ratio < 1 - epsilon) & (advantages < 0)) | ((ratio > 1 + epsilon_high) & (advantages > 0))
    clip_fraction = (was_clipped.float() * mask).sum() / denominator
    return (loss_tok * mask).sum() / denominator, kl.detach(), clip_fraction.detach()


def d1_clip_ratio(logp, old_logp, advantages, mask, epsilon, epsilon_high):
    """The clip_ratio d1 logs (TRL's definition at d1's pinned commit): the share of tokens whose unclipped term is
    below the clipped one, i.e. outside the range on the side where the clip does not bind (ratio < 1 - eps with
    A > 0, ratio > 1 + eps with A < 0). grpo_loss's clip fraction counts where it binds; this one compares with
    d1's logs. Arguments as grpo_loss's."""
    ratio = torch.exp(logp - old_logp)
    unclipped, clipped = ratio * advantages, torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * advantages
    return (((unclipped < clipped).float() * mask).sum() / mask.sum().clamp(min=1)).detach()


def learning_rate(optimizer_step, peak, schedule, warmup_steps, total_steps):
    """The lr of an optimiser step: linear warm-up to `peak` over warmup_steps, then `schedule` over the rest
    of total_steps: constant, linear decay to 0, or cosine decay to 10% of peak. constant_with_warmup is HF's
    schedule as d1 runs it (peak x step / warmup_steps, so the first step's lr is 0). A function of the step
    alone, so a resumed run needs nothing else."""
    if schedule == "constant_with_warmup":
        return peak * (optimizer_step / warmup_steps if optimizer_step < warmup_steps else 1.0)
    if optimizer_step < warmup_steps:
        return peak * (optimizer_step + 1) / warmup_steps
    progress = min(1.0, (optimizer_step - warmup_steps) / max(1, total_steps - warmup_steps))
    cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return peak * {"constant": 1.0, "linear": 1 - progress, "cosine": cosine}[schedule]


def wd1_weights(grouped_advantages):
    """wd1's group-relative weights (Tang et al. 2025, the weighted log-likelihood objective, as in their released
    trainer): w+ = softmax(A) over the group up-weights high-advantage completions, w- = softmax(-A) over the group
    up-weights low-advantage ones for the negative (unlearning) term. grouped_advantages (P, G) -> w+ - w- (P, G)."""
    return torch.softmax(grouped_advantages, dim=1) - torch.softmax(-grouped_advantages, dim=1)


def wd1_loss(logp, mask, weights, num_groups):
    """wd1's ratio-free objective: minus the weighted log-likelihood of the completions,
        loss = -(1 / num_groups) sum_i (w+_i - w-_i) log pi(o_i | q),  log pi(o_i | q) = sum_k logp_ik mask_ik,
    with the log-likelihood of the current policy alone (no old or reference policy). logp (N, T), mask (N, T)
    of 0/1, weights (N, 1) = w+ - w- of each completion's group, num_groups the number of groups the N rows
    stand for (N / G, fractional when a micro-batch splits a group)."""
    sequence_logp = (logp * mask).sum(dim=1, keepdim=True)  # (N, 1)
    return -(weights * sequence_logp).sum() / num_groups


# -----------------------------------------------------------------------------
# The script: what follows runs as `python grpo.py` (or under torchrun), never on import

if __name__ == "__main__":
    # -----------------------------------------------------------------------------
    # CLI

    parser = argparse.ArgumentParser(description="diffu-GRPO: RL for a diffusion LM (stage 2 of d1).")
    # Model and data
    parser.add_argument("--model", default="out/sft", help="the starting checkpoint: a folder in LLaDA's layout "
                        "(e.g. sft.py's --out-dir) or a LoRA adapter folder (its training continues)")
    parser.add_argument("--base-model", default=None, help="the base model folder of an adapter --model "
                        "(default: the one its adapter_config.json names; d1's adapters name a hub id)")
    parser.add_argument("--task", default="tiny_sudoku", choices=data.TASKS, help="prompts and rewards")
    parser.add_argument("--split", default=None, help="prompt split (default: 'rl' for tiny_sudoku, else 'train')")
    parser.add_argument("--data-dir", default="data/files", help="where downloaded datasets live")
    parser.add_argument("--lora-r", type=int, default=0, help="add LoRA adapters of this rank; 0 trains every weight")
    parser.add_argument("--lora-alpha", type=float, default=64.0, help="LoRA alpha (d1: 64 with r 128)")
    parser.add_argument("--lora-targets", default=",".join(M.LORA_TARGETS), help="comma-separated module names")
    parser.add_argument("--fsdp", action="store_true", help="full fine-tuning sharded over the ranks with FSDP2 "
                        "(torch's fully_shard per block), the reference copy too; needs torchrun")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    # Rollouts (d1: temperature 0.9, 256 tokens, blocks of 32, 128 steps)
    parser.add_argument("--prompts-per-step", type=int, default=8, help="global number of prompts per step")
    parser.add_argument("--num-generations", type=int, default=8, help="G: completions per prompt (one group)")
    parser.add_argument("--generation-batch-size", type=int, default=None,
                        help="completions per sampler call on one rank (default: all of the rank's rollouts)")
    parser.add_argument("--max-completion-length", type=int, default=None, help="gen_length (task default)")
    parser.add_argument("--block-length", type=int, default=None, help="sampler block length (task default)")
    parser.add_argument("--diffusion-steps", type=int, default=None, help="sampler steps (task default)")
    parser.add_argument("--temperature", type=float, default=1.0, help="rollout temperature (d1: 0.9)")
    parser.add_argument("--max-prompt-length", type=int, default=0,
                        help="keep only the last N prompt tokens in rollouts (d1: 200, TRL's left truncation); 0 = all")
    parser.add_argument("--rollout-cache", default="none", choices=CACHE_MODES,
                        help="the rollout sampler's key/value cache (generate.py, Fast-dLLM): none, prefix or dual")
    parser.add_argument("--rollout-threshold", type=float, default=None,
                        help="rollouts commit every position at least this confident per step (Fast-dLLM: 0.9); "
                             "default: the fixed step schedule")
    # diffu-GRPO
    parser.add_argument("--num-iterations", type=int, default=4, help="mu: inner updates per rollout batch (d1: 12)")
    parser.add_argument("--objective", default="grpo", choices=["grpo", "wd1"],
                        help="grpo: d1's clipped ratio objective; wd1: ratio-free weighted log-likelihood (Tang et al. 2025)")
    parser.add_argument("--estimator", default="d1", choices=["d1", "coupled"],
                        help="log-prob estimate: d1's one pass with the completion fully masked, or coupled: two passes "
                        "with complementary masks over the completion (DiffuCoder's coupled-GRPO)")
    parser.add_argument("--beta", type=float, default=None, help="KL coefficient; 0 skips the reference "
                        "(default 0.04 with --objective grpo; wd1 has no KL term)")
    parser.add_argument("--epsilon", type=float, default=None, help="clip range of the ratio (default 0.5; grpo only)")
    parser.add_argument("--epsilon-high", type=float, default=None, help="upper clip (default: --epsilon)")
    parser.add_argument("--p-mask-prompt", type=float, default=0.15, help="prompt masking rate of the estimator")
    parser.add_argument("--random-masking", action=argparse.BooleanOptionalAction, default=True,
                        help="a fresh mask seed per step and iteration (else one fixed seed, as d1's option)")
    parser.add_argument("--scale-rewards", default="none", choices=["none", "group"],
                        help="divide advantages by the group's std (+1e-4); d1 does not")
    parser.add_argument("--sync-ref-every", type=int, default=0,
                        help="mix the policy into the reference every N optimiser steps (TRL's ref_model_sync_steps; d1: 64)")
    parser.add_argument("--ref-mix-alpha", type=float, default=0.6, help="ref = alpha policy + (1 - alpha) ref")
    # Optimisation (d1: lr 3e-6, betas (0.9, 0.99), weight decay 0.1, max grad norm 0.2)
    parser.add_argument("--max-steps", type=int, default=400, help="rollout batches")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1, help="micro-batches per optimiser step")
    parser.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (d1, 8B with LoRA: 3e-6)")
    # the tiny default anneals, which steadies its held-out accuracy from one evaluation to the next
    parser.add_argument("--lr-schedule", default="cosine",
                        choices=["constant", "cosine", "linear", "constant_with_warmup"],
                        help="after warm-up; constant_with_warmup is HF's, lr x step / warm-up (d1's)")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="linear warm-up, in optimiser steps (default 5, or from --warmup-ratio)")
    parser.add_argument("--warmup-ratio", type=float, default=0.0,
                        help="warm-up as a share of the run's max_steps x mu optimiser steps, rounded up as HF "
                             "does (d1: 1e-4)")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    parser.add_argument("--adam-beta2", type=float, default=0.99, help="AdamW beta2 (beta1 0.9)")
    parser.add_argument("--max-grad-norm", type=float, default=0.2, help="gradient clipping; 0 = off")
    # Evaluation, logging, checkpoints (where the run writes, how often, and --resume: checkpoint.py)
    C.add_run_flags(parser, out_dir="out/grpo", eval_every=50, save_every=50)
    parser.add_argument("--seed", type=int, default=0, help="seed of prompts order, rollouts and masks")
    args = parser.parse_args()
    # flags that only the ratio objective reads: refused with wd1, given their defaults with grpo
    if args.objective == "wd1":
        # wd1 estimates the current policy's likelihood alone: no ratio to clip, no reference to regularise towards
        for flag, value in (("--beta", args.beta), ("--epsilon", args.epsilon), ("--epsilon-high", args.epsilon_high),
                            ("--sync-ref-every", args.sync_ref_every)):
            if value:
                raise SystemExit(f"{flag} does not apply to --objective wd1: it has no ratio, no KL term and no "
                                 f"reference policy. Drop {flag}, or use --objective grpo.")
        args.beta = 0.0
    else:
        args.beta = 0.04 if args.beta is None else args.beta
        args.epsilon = 0.5 if args.epsilon is None else args.epsilon
    if args.warmup_ratio and args.warmup_steps is not None:
        raise SystemExit("give --warmup-steps or --warmup-ratio, not both")
    if not 0 <= args.warmup_ratio <= 1:
        raise SystemExit(f"--warmup-ratio {args.warmup_ratio}: a share of the run's optimiser steps, in [0, 1]")
    if args.warmup_ratio:  # HF's get_warmup_steps, over this run's optimiser steps
        warmup_steps = math.ceil(args.warmup_ratio * args.max_steps * args.num_iterations)
    else:
        args.warmup_steps = warmup_steps = 5 if args.warmup_steps is None else args.warmup_steps

    # -----------------------------------------------------------------------------
    # Distributed init and the batch arithmetic

    rank, world_size, device = ddp.init()
    torch.manual_seed(args.seed)  # nothing below draws from torch's global RNG; rollouts and masks use generators
    if args.log_every < 1:
        raise SystemExit(f"--log-every {args.log_every}: print every N >= 1 steps")
    if args.max_prompt_length < 0:
        raise SystemExit(f"--max-prompt-length {args.max_prompt_length}: give a number of tokens, or 0 to keep whole prompts")
    if args.prompts_per_step % world_size != 0:
        raise SystemExit(f"--prompts-per-step {args.prompts_per_step} must be a multiple of the world size {world_size}: "
                         "each rank owns whole groups")
    prompts_per_rank = args.prompts_per_step // world_size
    rollouts_per_rank = prompts_per_rank * args.num_generations
    if rollouts_per_rank % args.gradient_accumulation_steps != 0:
        raise SystemExit(f"the {rollouts_per_rank} rollouts of a rank must split into --gradient-accumulation-steps "
                         f"{args.gradient_accumulation_steps} micro-batches")
    micro = rollouts_per_rank // args.gradient_accumulation_steps
    generation_batch = args.generation_batch_size or rollouts_per_rank
    defaults = data.generation_defaults(args.task)
    gen_length = args.max_completion_length or defaults["gen_length"]
    block_length = args.block_length or min(defaults["block_length"], gen_length)
    diffusion_steps = args.diffusion_steps or defaults["steps"]
    epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    if args.rollout_threshold is not None and not 0 < args.rollout_threshold <= 1:
        raise SystemExit(f"--rollout-threshold {args.rollout_threshold}: a confidence in (0, 1] (Fast-dLLM uses 0.9)")
    ddp.print0(f"args: {json.dumps(vars(args))}")
    ddp.print0(f"world {world_size} | {args.prompts_per_step} prompts x G={args.num_generations} per step = "
               f"{prompts_per_rank} prompts ({rollouts_per_rank} rollouts) per rank | micro-batch {micro} x "
               f"{args.gradient_accumulation_steps} accumulation | mu {args.num_iterations} optimiser steps per rollout batch")

    # -----------------------------------------------------------------------------
    # Model, reference and tokenizer

    if not os.path.isdir(args.model):
        raise SystemExit(f"--model {args.model!r} is not a folder. The tiny default starts from the SFT checkpoint: "
                         "run `python sft.py` first (it writes out/sft), or pass --model DIR.")
    tokenizer = C.load_tokenizer(args.model, args.base_model)
    lora = C.is_adapter(args.model) or args.lora_r > 0
    if args.fsdp and (lora or world_size == 1):
        raise SystemExit("--fsdp shards full fine-tuning over 2 or more torchrun processes: drop --lora-r and "
                         "start from a full checkpoint (LoRA's states are small; DDP replicates them), launch with torchrun")
    if device.type == "cuda" and not lora:  # refuse before loading what cannot fit
        M.check_full_finetuning_fits(M.config_parameters(C.read_config(args.model)),
                                     torch.cuda.get_device_properties(device).total_memory, world_size, args.fsdp,
                                     reference=args.beta > 0)
    # a frozen base under LoRA can sit in bf16 on a GPU; weights that train stay fp32 (autocast runs bf16)
    # (under FSDP the weights stay on the CPU until fully_shard moves each block's slice to the GPU)
    model = C.load_model(args.model, "cpu" if args.fsdp else device,
                         torch.bfloat16 if device.type == "cuda" and lora else torch.float32, args.base_model)
    if C.is_adapter(args.model):
        base_model = C.adapter_base(args.model, args.base_model)  # continue training the given adapter
    elif args.lora_r > 0:
        base_model = args.model
        M.add_lora(model, args.lora_r, args.lora_alpha, 0.0, tuple(args.lora_targets.split(",")), args.seed)
    else:
        base_model = args.model
    if not args.fsdp:
        model.to(device)
    model.gradient_checkpointing = args.grad_checkpointing
    # the reference policy: LoRA -> the base (adapters off), plus a dense delta per adapted layer once synced;
    # full fine-tuning -> a frozen copy of the starting model
    ref_model = None
    if args.beta > 0 and not lora:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    if args.fsdp:  # the reference sharded the same way, so that mixing it with the policy is slice by slice
        ddp.shard_model(model, device)
        if ref_model is not None:
            ddp.shard_model(ref_model, device)
    mask_id = C.mask_token_id(tokenizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ddp.print0(f"model: {args.model} ({M.num_parameters(model) / 1e6:.2f}M parameters, "
               f"{sum(p.numel() for p in trainable) / 1e6:.2f}M trained, {'LoRA' if lora else 'full'})")

    # -----------------------------------------------------------------------------
    # Data: prompts for rollouts, and held-out prompts for greedy evaluation

    split = args.split or ("rl" if args.task == "tiny_sudoku" else "train")
    try:
        prompts = data.load_examples(args.task, split, data_dir=args.data_dir, seed=args.seed)
        eval_examples = data.test_examples(args.task, args.data_dir, args.eval_examples) if args.eval_examples > 0 else []
    except (FileNotFoundError, ValueError) as err:  # a missing or malformed data file: the message says what to do
        raise SystemExit(str(err)) from None
    reward_functions = rewards.reward_functions(args.task)
    ddp.print0(f"data: {len(prompts)} prompts from {args.task}/{split}, {len(eval_examples)} held-out; rewards: "
               + ", ".join(f"{fn.__name__} x{w}" for fn, w in reward_functions))


    # -----------------------------------------------------------------------------
    # Optimiser and resume

    optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, args.adam_beta2), weight_decay=args.weight_decay)
    start_step, resumed = C.resume(args.out_dir, vars(args), model, optimizer, rank, world_size, ddp.print0) \
        if args.resume else (0, None)
    if resumed:  # the reference as the killed run left it: LoRA's synced deltas, or the synced full copy
        M.set_reference_deltas(model, resumed.get("ref_deltas") or {})
        if resumed.get("ref_model") is not None:
            C.load_full_state_dict(ref_model, lambda: resumed["ref_model"])
    ddp.broadcast_parameters(model)
    metrics_path = os.path.join(args.out_dir, C.METRICS_NAME)
    ddp.stop_on_sigterm()


    def save(step):
        # the reference's state too; under FSDP its full copy is gathered onto rank 0 (a collective: every rank calls)
        ref_state = C.full_state_dict(ref_model) if ref_model is not None and args.sync_ref_every else None
        C.save_checkpoint(args.out_dir, step, model, optimizer, tokenizer, base_model, vars(args),
                          {"ref_deltas": M.reference_deltas(model), "ref_model": ref_state})


    # -----------------------------------------------------------------------------
    # Rollouts


    sampler_stats = {}  # the last rollout's forward passes and generated tokens (generate's stats)


    @torch.no_grad()
    def rollout(step, prompt_indices):
        """G completions of each prompt. Returns the (N, Lp + gen_length) sequences, the prompt attention
        mask (or None), the canvas the sampler started from (or None), the completion mask (N, gen_length)
        of the sampled tokens up to and including the first EOS, and the completion texts;
        N = len(prompt_indices) * G, each group contiguous. The sampling noise of a generation batch comes from
        (seed, step, rank, batch), so a run reproduces exactly at the same world size."""
        # d1 (TRL) keeps the last max_prompt_length tokens of a longer prompt
        rows = [data.encode_prompt(tokenizer, prompts[i]["prompt"], prompts[i]["prefill"])[-args.max_prompt_length:]
                for i in prompt_indices for _ in range(args.num_generations)]
        prompt_ids, prompt_mask = left_pad(rows, tokenizer.eos_token_id, device)
        canvas = None  # infilling tasks start from a canvas; the others from an all-[MASK] completion
        if prompts[prompt_indices[0]].get("canvas") is not None:
            canvas = torch.tensor([data.encode_canvas(tokenizer, prompts[i], gen_length, mask_id)
                                   for i in prompt_indices for _ in range(args.num_generations)], device=device)
        model.eval()
        outputs = []
        sampler_stats.clear()
        for b in range(0, len(rows), generation_batch):
            with M.autocast(device):
                outputs.append(generate(
                    model, prompt_ids[b:b + generation_batch], diffusion_steps, gen_length, block_length,
                    args.temperature, mask_id=mask_id,
                    attention_mask=None if prompt_mask is None else prompt_mask[b:b + generation_batch],
                    generator=data.generator(args.seed, step, rank, b, device=device),
                    canvas=None if canvas is None else canvas[b:b + generation_batch],
                    cache=args.rollout_cache, threshold=args.rollout_threshold, stats=sampler_stats))
        sequences = torch.cat(outputs)
        completion_ids = sequences[:, prompt_ids.shape[1]:]
        completion_mask, texts = read_completions(tokenizer, completion_ids, canvas, mask_id)  # as d1 reads them
        return sequences, prompt_mask, canvas, completion_mask, texts


    # -----------------------------------------------------------------------------
    # Log-probs under the policies (the estimator's forward pass), the reference policy and its sync


    def completion_logprobs(policy, perturbed, sequences, attention_mask, prompt_length):
        """log pi(o_k | q) at every completion position (N, gen_length), from one forward pass."""
        with M.autocast(device):
            logits = policy(perturbed, attention_mask, slice(prompt_length, None))  # (N, gen_length, V)
        return token_logprobs(logits, sequences[:, prompt_length:])


    @contextlib.contextmanager
    def reference_policy():
        """The model as the reference policy: the frozen copy (full fine-tuning), or the base with adapters off and,
        once synced, each adapted layer's reference delta added (LoRA)."""
        if ref_model is not None:
            yield ref_model
        else:
            with M.adapters_disabled(model):
                yield model


    def sync_reference():
        """ref_W = alpha * W_policy + (1 - alpha) * ref_W on the effective weights, every --sync-ref-every optimiser
        steps (TRL's sync_ref_model, as d1 configures it; in d1 it is a silent no-op under LoRA)."""
        alpha = args.ref_mix_alpha
        if ref_model is not None:
            with torch.no_grad():
                for p_ref, p in zip(ref_model.parameters(), model.parameters()):
                    p_ref.mul_(1 - alpha).add_(p.detach(), alpha=alpha)
        elif lora:
            M.sync_lora_reference(model, alpha)


    # -----------------------------------------------------------------------------
    # The loop

    def held_out_accuracy():
        """Greedy accuracy on the held-out prompts (evaluate.py's function, sharded over the ranks)."""
        with ddp.unsharded(model):  # FSDP: ranks run different numbers of forward passes here
            return evaluate_examples(model, tokenizer, args.task, eval_examples, device=device, progress=False,
                                     **defaults)["accuracy"]


    if start_step == 0 and eval_examples:  # the starting point of the accuracy curve
        accuracy = held_out_accuracy()
        C.log_jsonl(metrics_path, {"step": 0, "eval_accuracy": accuracy})
        ddp.print0(f"step 00000/{args.max_steps} | held-out {100 * accuracy:.1f}% (the starting checkpoint)")
    bar = tqdm(total=args.max_steps, initial=start_step, desc="grpo", disable=rank != 0, dynamic_ncols=True)
    optimizer_step = start_step * args.num_iterations
    for step in range(start_step, args.max_steps):
        last_step = step == args.max_steps - 1
        t0 = time.time()

        # 1. rollouts
        # this rank's prompts: its share of the step's global batch, whole groups per rank
        prompt_indices = ddp.shard(data.step_indices(step, args.prompts_per_step, len(prompts), args.seed), rank, world_size)
        with ddp.unsharded(model):  # FSDP: the sampler skips steps with nothing to commit, so counts differ by rank
            sequences, prompt_mask, canvas, completion_mask, texts = rollout(step, prompt_indices)
        N, prompt_length = sequences.shape[0], sequences.shape[1] - gen_length
        attention_mask = None if prompt_mask is None else torch.cat(
            [prompt_mask, torch.ones(N, gen_length, dtype=prompt_mask.dtype, device=device)], dim=1)
        t_rollout = time.time() - t0

        # 2. rewards: the weighted sum of the task's functions, each called with d1's column names
        columns = {key: [prompts[i][key] for i in prompt_indices for _ in range(args.num_generations)]
                   for key in data.record_columns(prompts[0])}
        per_function = {fn.__name__: torch.tensor(fn(texts, **columns), dtype=torch.float32) for fn, _ in reward_functions}
        reward = sum(w * per_function[fn.__name__] for fn, w in reward_functions)  # (N,)

        # 3. advantages within each group of G
        grouped = reward.view(-1, args.num_generations)
        advantages = group_advantages(reward, args.num_generations, args.scale_rewards)  # (N, 1)
        if args.objective == "wd1":  # each completion's w+ - w- within its group
            grouped_advantages = advantages.view(-1, args.num_generations)
            likelihood_weights = wd1_weights(grouped_advantages).reshape(-1, 1).to(device)  # (N, 1)
        advantages = advantages.to(device)  # broadcast over tokens

        # 4-5. one prompt mask per inner iteration; old and reference log-probs for all of them, no grad
        t1 = time.time()
        mask_generators = [data.generator(args.seed, step, k) if args.random_masking else data.generator(args.seed)
                           for k in range(args.num_iterations)]
        is_prompt = conditioning_mask(sequences, prompt_length, canvas, mask_id)
        # d1: one pass, the completion fully masked and the prompt at p_mask_prompt; coupled: two passes with
        # complementary masks over the completion, (inputs, weights) per iteration
        make_input = estimator_input if args.estimator == "d1" else coupled_estimator_input
        perturbed = [make_input(sequences, is_prompt, args.p_mask_prompt, mask_id, g) for g in mask_generators]
        micro_batches = [slice(j, j + micro) for j in range(0, N, micro)]

        def estimated_logprobs(policy, k, mb):
            """log pi(o_k | q) at the completion positions of micro-batch mb, on iteration k's masks (N_mb, gen_length)."""
            mask = None if attention_mask is None else attention_mask[mb]
            if args.estimator == "d1":
                return completion_logprobs(policy, perturbed[k][mb], sequences[mb], mask, prompt_length)
            inputs, weights = perturbed[k]
            with M.autocast(device):
                return coupled_logprobs(policy, inputs[:, mb], weights[:, mb], sequences[mb], mask, prompt_length)

        def logprobs_no_grad(policy, k):
            with torch.no_grad():
                return torch.cat([estimated_logprobs(policy, k, mb) for mb in micro_batches])

        model.eval()  # dropout off for every log-prob that enters a ratio
        # wd1 is ratio-free: it needs neither old log-probs nor (beta = 0) reference ones
        old_logps = None
        if args.num_iterations > 1 and args.objective == "grpo":
            old_logps = [logprobs_no_grad(model, k) for k in range(args.num_iterations)]
        ref_logps = None
        if args.beta > 0:
            with reference_policy() as ref:
                ref_logps = [logprobs_no_grad(ref, k) for k in range(args.num_iterations)]

        # 6. mu inner iterations, iteration k on mask k, one optimiser step each
        stats = {"loss": 0.0, "kl": 0.0, "clip_ratio": 0.0, "clip_ratio_d1": 0.0, "grad_norm": 0.0,
                 "first_ratio_error": 0.0}
        for k in range(args.num_iterations):
            lr = learning_rate(optimizer_step, args.lr, args.lr_schedule, warmup_steps,
                               args.max_steps * args.num_iterations)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for mb in micro_batches:
                logp = estimated_logprobs(model, k, mb)
                if args.objective == "wd1":  # ratio-free: the weighted log-likelihood of the current policy alone
                    loss = wd1_loss(logp, completion_mask[mb].float(), likelihood_weights[mb], len(logp) / args.num_generations)
                    kl = clip_fraction = clip_d1 = torch.zeros(())
                else:
                    old = old_logps[k][mb] if old_logps is not None else logp.detach()  # mu = 1: ratio 1
                    if k == 0:  # the policy has not moved yet: the ratio must be exactly 1
                        stats["first_ratio_error"] = max(stats["first_ratio_error"], (logp.detach() - old).abs().max().item())
                    loss, kl, clip_fraction = grpo_loss(logp, old, None if ref_logps is None else ref_logps[k][mb],
                                                          advantages[mb], completion_mask[mb].float(), args.epsilon,
                                                          epsilon_high, args.beta)
                    clip_d1 = d1_clip_ratio(logp.detach(), old, advantages[mb], completion_mask[mb].float(),
                                            args.epsilon, epsilon_high)
                (loss / len(micro_batches)).backward()
                for name, value in (("loss", loss), ("kl", kl), ("clip_ratio", clip_fraction),
                                    ("clip_ratio_d1", clip_d1)):
                    stats[name] += value.item() / len(micro_batches) / args.num_iterations
            ddp.all_reduce_gradients(trainable)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm if args.max_grad_norm > 0 else float("inf"))
            stats["grad_norm"] += float(grad_norm) / args.num_iterations
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            optimizer_step += 1
            if args.sync_ref_every > 0 and optimizer_step % args.sync_ref_every == 0:
                sync_reference()  # the next rollout batch's reference log-probs see it
        t_update = time.time() - t1

        # metrics, all-reduced over ranks
        group_std = grouped.std(dim=1)
        local = {"reward": reward.mean().item(), "reward_std": group_std.mean().item(),
                 "prompt_length": float(prompt_length if prompt_mask is None else prompt_mask.sum(dim=1).float().mean()),
                 "zero_std_ratio": (group_std < 1e-6).float().mean().item(),
                 "completion_length": completion_mask.sum(dim=1).float().mean().item(),
                 **{f"rewards/{name}": v.mean().item() for name, v in per_function.items()}, **stats}
        metrics = ddp.all_reduce_mean(local)
        dt = time.time() - t0
        record = {"step": step + 1, **metrics, "lr": lr, "rollout_s": t_rollout, "update_s": t_update,
                  "tok_per_s": args.prompts_per_step * args.num_generations * gen_length / dt}
        record["rollout_forward_passes_per_token"] = forward_passes_per_token(sampler_stats)  # rank 0's
        # steps 4-6's forward passes over the rollout batch: old, reference and current log-probs (coupled: 2 each)
        record["update_forward_passes"] = ((len(old_logps or []) + len(ref_logps or []) + args.num_iterations)
                                           * (1 if args.estimator == "d1" else 2))
        if (args.eval_every > 0 and (step + 1) % args.eval_every == 0) or last_step:
            if eval_examples:
                record["eval_accuracy"] = held_out_accuracy()
        C.log_jsonl(metrics_path, record)
        bar.update(1)
        if rank == 0 and ((step + 1) % args.log_every == 0 or "eval_accuracy" in record or last_step):
            bar.write(f"step {step + 1:05d}/{args.max_steps} | reward {record['reward']:.3f} | loss {record['loss']:+.4f} | "
                      f"kl {record['kl']:.4f} | clip {record['clip_ratio']:.3f} | lr {lr:.2e} | "
                      f"rollout {t_rollout:.1f}s update {t_update:.1f}s | tok/s {record['tok_per_s']:.0f}"
                      + (f" | held-out {100 * record['eval_accuracy']:.1f}%" if "eval_accuracy" in record else ""))
        # SIGTERM (a preemption) on any rank: every rank stops after this same step, with a checkpoint
        preempted = not last_step and ddp.any_rank(ddp.sigterm_received())
        if not last_step and (preempted or args.save_every > 0 and (step + 1) % args.save_every == 0):
            save(step + 1)
        if preempted:
            bar.close()
            ddp.exit_after_preemption(step + 1)
    bar.close()
    ddp.assert_parameters_identical(model)

    # -----------------------------------------------------------------------------
    # Final model (LLaDA's layout, or the adapter folder) and a last resumable checkpoint

    save(args.max_steps)
    C.save_final_model(model, tokenizer, args.out_dir, base_model, vars(args))
    ddp.print0(f"done: model in {args.out_dir}")
    ddp.cleanup()
