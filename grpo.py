"""
Stage 2 of d1: diffu-GRPO (Zhao, Gupta, Zheng, Grover 2025, "d1: Scaling Reasoning in Diffusion Large
Language Models via Reinforcement Learning", Sec. 3.2 and Algorithm 1).

Each step, top to bottom (the functions below, in this order):
  1. rollout: for each prompt q of the step, G completions o_1..o_G from the sampler (generate.py);
     completion_mask keeps the tokens up to and including the first EOS;
  2. score_completions: rewards r_i, the task's weighted reward functions (rewards.py);
  3. group_advantages: A_i = r_i - mean(r_1..r_G) over the group (d1 does not divide by the std);
  4. the one-pass log-prob estimate, d1's heart (estimator_input, completion_logprobs): mask every
     completion token and each prompt token with probability p_mask_prompt, run ONE forward pass, read
     log pi(o_k | q) = -CE(logits_k, o_k) at every completion position. Iteration k of the mu inner iterations
     has its own mask, and the old, reference and current policies all see that same mask;
  5. old_and_reference_logprobs, before the inner loop and without grad: old log-probs for each of the mu
     masks (mu > 1) and reference log-probs (beta > 0; with LoRA the reference is the base with its adapters
     switched off);
  6. update: mu inner iterations, iteration k on mask k, one optimiser step each, on grpo_loss:
        ratio = exp(logp - old_logp_k),  KL_k = exp(ref - logp) - (ref - logp) - 1,
        loss_tok = -min(ratio A, clip(ratio, 1 - eps, 1 + eps_high) A) + beta KL_k,
        loss = sum(loss_tok * mask) / sum(mask).

Infilling tasks (the tiny Sudoku default) give the sampler a canvas, the completion with the given cells
already written: those tokens are context, not actions, so the estimator treats them as prompt tokens and
the loss skips them. Other estimators and objectives (--estimator, --objective) live in objectives.py; the
README's table lists where this script differs from d1's released code.

    python grpo.py                                     # the tiny default, after `python sft.py`
    torchrun --standalone --nproc_per_node=2 grpo.py   # the same over 2 CPU processes (gloo)
    torchrun --standalone --nproc_per_node=8 grpo.py --model checkpoints/LLaDA-8B-Instruct-SFT --task gsm8k \\
        --lora-r 128 --lora-alpha 64 --lora-targets q_proj,k_proj,v_proj,up_proj --prompts-per-step 16 \\
        --num-generations 6 --gradient-accumulation-steps 2 --max-prompt-length 200 \\
        --max-completion-length 256 --block-length 32 --diffusion-steps 128 --temperature 0.9 \\
        --num-iterations 12 --beta 0.04 --epsilon 0.5 --lr 3e-6 --lr-schedule constant_with_warmup \\
        --warmup-ratio 0.0001 --adam-beta2 0.99 --weight-decay 0.1 --max-grad-norm 0.2 --grad-checkpointing \\
        --max-steps 642 --save-every 8 --eval-every 8 --eval-examples 256 --out-dir out/grpo-gsm8k
        # 7,704 optimiser updates; the README has every task's budget
    torchrun --nnodes 2 --nproc_per_node=8 --rdzv-backend c10d --rdzv-endpoint HOST:PORT grpo.py ...  # a node
"""

import argparse
import contextlib
import copy
import functools
import json
import math
import os
import time

import torch
from tqdm import tqdm

import checkpoint as C
import data
import ddp
import dryrun
import model as M
import objectives
import rewards
from evaluate import evaluate_examples
from generate import (CACHE_MODES, forward_passes_per_token, generate_records, read_completions,
                      sequence_attention_mask)
from model import token_logprobs

# -----------------------------------------------------------------------------
# 1. Rollouts


@torch.no_grad()
def rollout(model, tokenizer, records, sampler, *, num_generations, mask_id, device, max_prompt_length=0,
            batch_size=None, noise_seed=None, stats=None, record=None):
    """G completions of each record, each group contiguous: N = len(records) * G rows. Batch b of the sampler
    draws its noise from (*noise_seed, b), so a run reproduces exactly. Returns the sequences (N, L), their
    attention mask (N, L) or None, the canvas (N, gen_length) or None, the completion mask (N, gen_length)
    of the tokens up to and including the first EOS, less a canvas's given tokens, and the reward texts.
    record, a dict, receives what the sampler recorded: unmask_step (N, gen_length) (generate's record)."""
    model.eval()
    with M.autocast(device):
        sequences, prompt_mask, canvas = generate_records(
            model, tokenizer, [r for r in records for _ in range(num_generations)], sampler, mask_id=mask_id,
            device=device, max_prompt_length=max_prompt_length, batch_size=batch_size, noise_seed=noise_seed,
            stats=stats, record=record)  # d1 (TRL) keeps the last max_prompt_length tokens of a longer prompt
    gen_length = sampler["gen_length"]
    completion_mask, texts = read_completions(tokenizer, sequences[:, -gen_length:], canvas, mask_id)
    attention_mask = sequence_attention_mask(prompt_mask, gen_length, cfg_scale=0)
    return sequences, attention_mask, canvas, completion_mask, texts


# -----------------------------------------------------------------------------
# 2-3. Rewards and group-relative advantages


def score_completions(reward_functions, texts, records, num_generations):
    """r_i = sum of weight x reward function over the completion texts (N,), each function called with d1's
    column names of its record (G contiguous texts per record). Returns (rewards (N,), {name: (N,)})."""
    columns = {key: [r[key] for r in records for _ in range(num_generations)]
               for key in data.record_columns(records[0])}
    per_function = {fn.__name__: torch.tensor(fn(texts, **columns), dtype=torch.float32)
                    for fn, _ in reward_functions}
    return sum(w * per_function[fn.__name__] for fn, w in reward_functions), per_function


def group_advantages(rewards, num_generations, scale_rewards="none"):
    """A_i = r_i - mean(r_1..r_G) within each group of G contiguous completions (d1 does not divide by the
    group's std, TRL's default; scale_rewards="group" does, with TRL's + 1e-4). rewards (N,) -> (N, 1)."""
    grouped = rewards.view(-1, num_generations)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + 1e-4)
    return advantages.reshape(-1, 1)


def rollout_metrics(rewards, per_function, completion_mask, attention_mask, prompt_length, num_generations):
    """What a step logs about its rollouts: mean reward (and per function), mean group std, the share of
    groups whose rewards are all equal (no advantage, no gradient), prompt and completion lengths."""
    group_std = rewards.view(-1, num_generations).std(dim=1)
    return {"reward": rewards.mean().item(), "reward_std": group_std.mean().item(),
            "prompt_length": float(prompt_length if attention_mask is None
                                   else attention_mask[:, :prompt_length].sum(dim=1).float().mean()),
            "zero_std_ratio": (group_std < 1e-6).float().mean().item(),
            "completion_length": completion_mask.sum(dim=1).float().mean().item(),
            **{f"rewards/{name}": v.mean().item() for name, v in per_function.items()}}


# -----------------------------------------------------------------------------
# 4. d1's one-pass estimate of log pi(o_k | q)


def conditioning_mask(sequences, prompt_length, canvas, mask_id):
    """is_prompt (N, L): the tokens the policy conditions on, the prompt and, in infilling tasks, the canvas
    tokens the sampler was given (the rest of the completion is the policy's actions)."""
    is_prompt = torch.ones_like(sequences, dtype=torch.bool)
    is_prompt[:, prompt_length:] = False if canvas is None else canvas != mask_id
    return is_prompt


def estimator_input(sequences, is_prompt, p_mask_prompt, mask_id, generator, **rollout):
    """d1's perturbed sequence (Sec. 3.2): every action token masked, each conditioning token (is_prompt)
    masked independently with probability p_mask_prompt. sequences, is_prompt (N, L). The uniforms are drawn
    on the CPU for the whole batch from `generator`: a seed gives the same mask on any device and for any
    split of the batch into micro-batches."""
    u = torch.rand(sequences.shape, generator=generator).to(sequences.device)
    masked = ~is_prompt | (u < p_mask_prompt)
    return torch.where(masked, torch.full_like(sequences, mask_id), sequences)


def completion_logprobs(policy, perturbed, rows, sequences, attention_mask, prompt_length):
    """log pi(o_k | q) at every completion position of the batch's `rows` (n, T), from ONE forward pass over
    their perturbed sequences."""
    mask = None if attention_mask is None else attention_mask[rows]
    logits = policy(perturbed[rows], mask, slice(prompt_length, None))  # (n, T, V)
    return token_logprobs(logits, sequences[rows, prompt_length:])


# the --estimator choices, each (args, sampler) -> (input of the whole batch, log-probs of some of its rows,
# forward rows per sequence); the alternatives are objectives.py's
ESTIMATORS = {"d1": lambda args, sampler: (estimator_input, completion_logprobs, 1), **objectives.ESTIMATORS}


# -----------------------------------------------------------------------------
# 5. Old and reference log-probs, once per rollout batch


@contextlib.contextmanager
def reference_policy(model, ref_model):
    """The reference policy: the frozen copy (full fine-tuning), or the model with its adapters off and, once
    synced, each adapted layer's reference delta added (LoRA)."""
    if ref_model is not None:
        yield ref_model
    else:
        with M.adapters_disabled(model):
            yield model


def policy_logprobs(policy, logprobs, estimate, micro_batches, sequences, attention_mask, prompt_length,
                    device):
    """An estimator's per-token log-probs (N, T) of the whole batch under `policy`, micro-batch by
    micro-batch, without grad."""
    with torch.no_grad(), M.autocast(device):
        return torch.cat([logprobs(policy, estimate, mb, sequences, attention_mask, prompt_length)
                          for mb in micro_batches])


def sync_reference(model, ref_model, alpha):
    """ref_W = alpha W_policy + (1 - alpha) ref_W on the effective weights (TRL's sync_ref_model): the frozen
    copy's weights, or with LoRA each adapted layer's reference delta."""
    if ref_model is not None:
        with torch.no_grad():
            for p_ref, p in zip(ref_model.parameters(), model.parameters()):
                p_ref.mul_(1 - alpha).add_(p.detach(), alpha=alpha)
    else:
        M.sync_lora_reference(model, alpha)


# -----------------------------------------------------------------------------
# 6. The loss and the mu-iteration update


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, epsilon, epsilon_high, beta):
    """The clipped diffu-GRPO objective (d1 eq. 3, with the k3 KL estimate), averaged over the masked-in
    completion tokens. logp, old_logp, ref_logp (N, T) per-token log-probs (ref_logp None when beta = 0),
    advantages (N, 1), mask (N, T) of 0/1. Returns (loss, mean KL, share of tokens clipped)."""
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
    """The clip_ratio d1 logs (TRL's definition at d1's pinned commit): the share of tokens whose unclipped
    term is below the clipped one, i.e. outside the range on the side where the clip does not bind (ratio
    < 1 - epsilon with A > 0, ratio > 1 + epsilon_high with A < 0). grpo_loss's clip fraction counts where it
    binds; this one compares with d1's logs. Arguments as grpo_loss's."""
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


def old_and_reference_logprobs(model, ref_model, logprobs, estimates, batch, micro_batches, *,
                               objective="grpo", beta=0.0, device="cpu"):
    """Step 5, once per rollout batch, without grad and with dropout off: the old policy's per-token log-probs
    of each estimate (mu > 1 under the grpo objective: with mu = 1 the ratio is 1, and a ratio-free objective
    has none) and the reference's (beta > 0), each a list of (N, T) or None. logprobs: an estimator's
    (ESTIMATORS); batch: the rollout's sequences, attention_mask and prompt_length."""
    model.eval()  # dropout off for every log-prob that enters a ratio
    reading = (micro_batches, batch["sequences"], batch["attention_mask"], batch["prompt_length"], device)
    old_logps = ref_logps = None
    if len(estimates) > 1 and objective == "grpo":
        old_logps = [policy_logprobs(model, logprobs, e, *reading) for e in estimates]
    if beta > 0:
        with reference_policy(model, ref_model) as ref:
            ref_logps = [policy_logprobs(ref, logprobs, e, *reading) for e in estimates]
    return old_logps, ref_logps


def update(model, optimizer, trainable, logprobs, estimates, batch, micro_batches, learning_rates, *,
           old_logps=None, ref_logps=None, ref_model=None, objective="grpo", ratio_free_loss=None,
           epsilon=0.5, epsilon_high=0.5, beta=0.0, max_grad_norm=0.0, first_step=0, sync_ref_every=0,
           ref_mix_alpha=0.6, device="cpu"):
    """Step 6 on one rollout batch: one optimiser step per estimate k (mu of them), each accumulating the loss
    of every micro-batch, its gradients averaged over the ranks and clipped; with sync_ref_every > 0 the
    reference is mixed after each optimiser step first_step + k + 1 that it divides. batch: the rollout's
    sequences, attention_mask, prompt_length, completion_mask, advantages (N, 1), num_generations, and a
    ratio-free objective's per-sequence weights; old_logps / ref_logps: step 5's; learning_rates[k]: step k's
    lr; ratio_free_loss: a ratio-free objective's loss (objectives.py), used when objective is not "grpo".
    Returns the metrics, averaged over the steps (first_ratio_error: the largest over the first step's
    micro-batches)."""
    stats = {"loss": 0.0, "kl": 0.0, "clip_ratio": 0.0, "clip_ratio_d1": 0.0, "grad_norm": 0.0,
             "first_ratio_error": 0.0}
    mu, mask = len(estimates), batch["completion_mask"].float()
    for k, estimate in enumerate(estimates):
        for group in optimizer.param_groups:
            group["lr"] = learning_rates[k]
        for mb in micro_batches:
            with M.autocast(device):
                logp = logprobs(model, estimate, mb, batch["sequences"], batch["attention_mask"],
                                batch["prompt_length"])
            if objective == "grpo":
                old = old_logps[k][mb] if old_logps is not None else logp.detach()  # mu = 1: ratio 1
                if k == 0:  # the policy has not moved yet: the ratio must be exactly 1
                    error = (logp.detach() - old).abs().max().item()
                    stats["first_ratio_error"] = max(stats["first_ratio_error"], error)
                ref = None if ref_logps is None else ref_logps[k][mb]
                loss, kl, clip = grpo_loss(logp, old, ref, batch["advantages"][mb], mask[mb], epsilon,
                                           epsilon_high, beta)
                clip_d1 = d1_clip_ratio(logp.detach(), old, batch["advantages"][mb], mask[mb], epsilon,
                                        epsilon_high)
            else:  # ratio-free: a loss of the current policy alone (objectives.py)
                groups = len(logp) / batch["num_generations"]
                loss = ratio_free_loss(logp, mask[mb], batch["weights"][mb], groups)
                kl = clip = clip_d1 = torch.zeros(())
            (loss / len(micro_batches)).backward()
            for name, value in (("loss", loss), ("kl", kl), ("clip_ratio", clip), ("clip_ratio_d1", clip_d1)):
                stats[name] += value.item() / len(micro_batches) / mu
        ddp.all_reduce_gradients(trainable)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm or math.inf)
        stats["grad_norm"] += float(grad_norm) / mu
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if sync_ref_every > 0 and (first_step + k + 1) % sync_ref_every == 0:
            sync_reference(model, ref_model, ref_mix_alpha)  # the next rollout batch's reference sees it
    return stats


# -----------------------------------------------------------------------------
# The dry run: the first step on fake tensors (dryrun.py), before a GPU is spent on it


def dry_run(args, sampler, micro_batches, prompts_per_rank, epsilon_high, world_size):
    """--dry-run: one rank's first step of this command (a rollout batch, its old and reference log-probs, one
    of the mu updates and its optimiser step) on fake tensors at the checkpoint's shape, read from its
    config.json alone, in the dtypes and autocast of a CUDA run. Prints each phase's peak memory, FLOPs and
    H100 time; returns the exit status."""
    tokenizer, config = dryrun.checkpoint_shape(args.model)
    mask_id, lora, G = C.mask_token_id(tokenizer), args.lora_r > 0, args.num_generations
    make_input, logprobs, _ = ESTIMATORS[args.estimator](args, sampler)
    ratio_free_loss = (objectives.RATIO_FREE_OBJECTIVES[args.objective](args)[1] if args.objective != "grpo"
                       else None)
    N, P = prompts_per_rank * G, args.max_prompt_length or args.dry_run_prompt_tokens
    records = dryrun.synthetic_prompts(tokenizer, prompts_per_rank, P)
    notes = [f"one rank: {N} rollouts ({prompts_per_rank} prompts x G {G}) of prompts of {P} tokens",
             "every completion position an action (no EOS): the longest completion mask",
             f"old and reference log-probs, the update and its optimiser step: one of mu "
             f"{args.num_iterations}, FLOPs and time x mu",
             "AdamW's moments (and with --sync-ref-every and LoRA the reference's deltas) live from the "
             "start, as from a run's second step"]
    if args.inpaint_zero_std_groups:
        notes.append("not modelled: IGPO's second rollout of the all-wrong groups and its entropy pass")
    chunks = 1  # the ar estimator's chunks of positions, alike: the first is run, FLOPs and time x chunks
    if args.estimator == "ar":
        micro = micro_batches[0].stop - micro_batches[0].start
        chunks = objectives.ar_chunks(micro, sampler["gen_length"])[1]
        logprobs = functools.partial(logprobs, max_chunks=1)
        notes.append(f"--estimator ar: the first of its {chunks} chunks of positions per micro-batch, FLOPs "
                     f"and time x {chunks} (the other log-probs 0)")
    world = dryrun.fake_world(world_size) if args.fsdp else contextlib.nullcontext()
    with world as mesh, dryrun.session() as run, dryrun.cuda_like_autocast():
        model = dryrun.build_model(config, torch.bfloat16 if lora else torch.float32)
        if lora:
            M.add_lora(model, args.lora_r, args.lora_alpha, 0.0, tuple(args.lora_targets.split(",")))
        model.gradient_checkpointing = args.grad_checkpointing
        ref_model = None  # full fine-tuning's frozen copy: the same shape
        if args.beta > 0 and not lora:
            ref_model = dryrun.build_model(config, torch.float32).requires_grad_(False)
        for m in (model, ref_model) if args.fsdp else ():  # one rank's slices, gathered as a GPU's (bf16)
            if m is not None:
                ddp.shard_model(m, "cuda", mesh)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, args.adam_beta2),
                                      weight_decay=args.weight_decay, foreach=True)  # CUDA's default
        dryrun.materialise_optimizer_state(optimizer, trainable)
        if args.sync_ref_every > 0 and lora:  # the reference's dense deltas, live from the first sync on
            M.sync_lora_reference(model, args.ref_mix_alpha)

        def optimiser_step(*_):  # the update's phase ends where the optimiser's begins
            run.end()
            run.begin("optimiser step", repeat=args.num_iterations)

        optimizer.register_step_pre_hook(optimiser_step)

        def sample():
            with ddp.unsharded(model):  # FSDP: the weights gathered for the whole rollout, as in a run
                rollout(model, tokenizer, records, sampler, num_generations=G, mask_id=mask_id, device="cpu",
                        max_prompt_length=P, batch_size=args.generation_batch_size,
                        noise_seed=(args.seed, 0, 0))

        calls = -(-N // (args.generation_batch_size or N))  # the rollout's sampler calls, each like the first
        notes += dryrun.sample_one_block(run, model, sample, sampler, prompt_length=P, name="rollout",
                                         calls=calls)
        sequences = torch.full((N, P + sampler["gen_length"]), mask_id)
        batch = {"sequences": sequences, "attention_mask": None, "prompt_length": P, "num_generations": G,
                 "completion_mask": torch.ones(N, sampler["gen_length"], dtype=torch.bool),
                 "advantages": torch.zeros(N, 1), "weights": torch.zeros(N, 1)}
        is_prompt = conditioning_mask(sequences, P, None, mask_id)
        # every position committed at the first step: any commit steps cost the same K passes (stepmerge)
        unmask_step = torch.ones(N, sampler["gen_length"], dtype=torch.long)
        estimates = [make_input(sequences, is_prompt, args.p_mask_prompt, mask_id,
                                data.generator(args.seed, 0, k), completion_mask=batch["completion_mask"],
                                unmask_step=unmask_step)
                     for k in range(args.num_iterations)]
        reading = (micro_batches, sequences, None, P, "cpu")
        with run.phase("old and reference log-probs", repeat=args.num_iterations * chunks):  # of one estimate
            old_logps = ([policy_logprobs(model, logprobs, estimates[0], *reading)]
                         if args.num_iterations > 1 and args.objective == "grpo" else None)
            ref_logps = None
            if args.beta > 0:
                with reference_policy(model, ref_model) as ref:
                    ref_logps = [policy_logprobs(ref, logprobs, estimates[0], *reading)]
        run.begin("update: one of mu steps", repeat=args.num_iterations * chunks)
        update(model, optimizer, trainable, logprobs, estimates[:1], batch, micro_batches, [args.lr],
               old_logps=old_logps, ref_logps=ref_logps,
               ref_model=ref_model, objective=args.objective, ratio_free_loss=ratio_free_loss,
               epsilon=args.epsilon, epsilon_high=epsilon_high,
               beta=args.beta, max_grad_norm=args.max_grad_norm, device="cpu")
        run.end()
    return dryrun.finish(run, args.dry_run_gpu_memory, notes)


def check_arguments(args):
    """The defaults that depend on other flags, filled in, and the settings that cannot run, refused with a
    message that says what to do. Returns the warm-up's optimiser steps."""
    if args.objective != "grpo":  # ratio-free: no ratio to clip, no KL, no reference: those flags do nothing
        for flag, value in (("--beta", args.beta), ("--epsilon", args.epsilon),
                            ("--epsilon-high", args.epsilon_high), ("--sync-ref-every", args.sync_ref_every)):
            if value:
                raise SystemExit(f"{flag} does not apply to --objective {args.objective}: it has no ratio, "
                                 f"no KL term and no reference policy. Drop {flag}, or use --objective grpo.")
        args.beta = 0.0
    else:
        args.beta = 0.04 if args.beta is None else args.beta
        args.epsilon = 0.5 if args.epsilon is None else args.epsilon
    if args.warmup_ratio and args.warmup_steps is not None:
        raise SystemExit("give --warmup-steps or --warmup-ratio, not both")
    if not 0 <= args.warmup_ratio <= 1:
        raise SystemExit(f"--warmup-ratio {args.warmup_ratio}: a share of the run's optimiser steps, 0 to 1")
    if args.log_every < 1:
        raise SystemExit(f"--log-every {args.log_every}: print every N >= 1 steps")
    if args.max_prompt_length < 0:
        raise SystemExit(f"--max-prompt-length {args.max_prompt_length}: a number of tokens, 0 = all")
    if args.rollout_threshold is not None and not 0 < args.rollout_threshold <= 1:
        raise SystemExit(f"--rollout-threshold {args.rollout_threshold}: a confidence in (0, 1]")
    if args.warmup_ratio:  # HF's get_warmup_steps, over this run's optimiser steps
        return math.ceil(args.warmup_ratio * args.max_steps * args.num_iterations)
    args.warmup_steps = 5 if args.warmup_steps is None else args.warmup_steps
    return args.warmup_steps


# -----------------------------------------------------------------------------
# The driver: what follows runs as `python grpo.py` (or under torchrun), never on import

if __name__ == "__main__":
    # -----------------------------------------------------------------------------
    # CLI

    parser = argparse.ArgumentParser(description="diffu-GRPO: RL for a diffusion LM (stage 2 of d1).")
    add = parser.add_argument
    # Model and data
    add("--model", default="out/sft", help="start: a folder in LLaDA's layout, or a LoRA adapter folder")
    add("--base-model", default=None, help="an adapter's base folder (default: its adapter_config.json's)")
    add("--task", default="tiny_sudoku", choices=data.TASKS, help="prompts and rewards")
    add("--split", default=None, help="prompt split (default: 'rl' for the tiny tasks, else 'train')")
    add("--data-dir", default="data/files", help="where downloaded datasets live")
    add("--lora-r", type=int, default=0, help="add LoRA adapters of this rank; 0 trains every weight")
    add("--lora-alpha", type=float, default=64.0, help="LoRA alpha (d1: 64 with r 128)")
    add("--lora-targets", default=",".join(M.LORA_TARGETS), help="comma-separated module names")
    add("--fsdp", action="store_true", help="shard full fine-tuning and its reference with FSDP2 (torchrun)")
    add("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    # Rollouts (d1: temperature 0.9, 256 tokens, blocks of 32, 128 steps)
    add("--prompts-per-step", type=int, default=8, help="global number of prompts per step")
    add("--num-generations", type=int, default=8, help="G: completions per prompt (one group)")
    add("--generation-batch-size", type=int, default=None, help="rollouts per sampler call (default: all)")
    add("--max-completion-length", type=int, default=None, help="gen_length (task default)")
    add("--block-length", type=int, default=None, help="sampler block length (task default)")
    add("--diffusion-steps", type=int, default=None, help="sampler steps (task default)")
    add("--rollout-order", default="blocks", choices=["blocks", "left-to-right"],
        help="blocks: the task's (or the flags') blocks and steps; left-to-right: one position a step, "
        "block length 1 (JustGRPO's rollouts, read exactly by --estimator ar)")
    add("--temperature", type=float, default=1.0, help="rollout temperature (d1: 0.9)")
    add("--max-prompt-length", type=int, default=0, help="keep a prompt's last N tokens (d1: 200); 0 = all")
    add("--rollout-cache", default="none", choices=CACHE_MODES, help="the sampler's key/value cache")
    add("--rollout-threshold", type=float, default=None, help="commit every position this confident (0.9)")
    # diffu-GRPO
    add("--num-iterations", type=int, default=4, help="mu: optimiser steps per rollout batch (d1: 12)")
    add("--objective", default="grpo", choices=["grpo", *objectives.RATIO_FREE_OBJECTIVES],
        help="grpo: d1's clipped ratio objective; or a ratio-free one of objectives.py")
    add("--estimator", default="d1", choices=list(ESTIMATORS),
        help="d1's one-pass log-prob estimate, or one of objectives.py")
    add("--beta", type=float, default=None, help="KL coefficient; 0 skips the reference (default 0.04)")
    add("--epsilon", type=float, default=None, help="clip range of the ratio (default 0.5)")
    add("--epsilon-high", type=float, default=None, help="upper clip (default: --epsilon)")
    add("--p-mask-prompt", type=float, default=0.15, help="prompt masking rate of the estimator")
    add("--random-masking", action=argparse.BooleanOptionalAction, default=True,
        help="a fresh mask seed per step and iteration (else one fixed seed, as d1's option)")
    add("--scale-rewards", default="none", choices=["none", "group"], help="divide A by the group's std")
    add("--sync-ref-every", type=int, default=0, help="mix the policy into the reference every N steps")
    add("--ref-mix-alpha", type=float, default=0.6, help="ref = alpha policy + (1 - alpha) ref")
    # Optimisation (d1: lr 3e-6, betas (0.9, 0.99), weight decay 0.1, max grad norm 0.2)
    add("--max-steps", type=int, default=400, help="rollout batches, of mu optimiser steps each")
    add("--gradient-accumulation-steps", type=int, default=1, help="micro-batches per optimiser step")
    add("--lr", type=float, default=3e-4, help="peak learning rate (d1, 8B with LoRA: 3e-6)")
    # the tiny default anneals, which steadies its held-out accuracy from one evaluation to the next
    add("--lr-schedule", default="cosine", choices=["constant", "cosine", "linear", "constant_with_warmup"],
        help="after warm-up; constant_with_warmup is HF's, lr x step / warm-up (d1's)")
    add("--warmup-steps", type=int, default=None, help="linear warm-up, in optimiser steps (default 5)")
    add("--warmup-ratio", type=float, default=0.0, help="warm-up as a share of all steps, HF's (d1: 1e-4)")
    add("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    add("--adam-beta2", type=float, default=0.99, help="AdamW beta2 (beta1 0.9)")
    add("--max-grad-norm", type=float, default=0.2, help="gradient clipping; 0 = off")
    # Evaluation, logging, checkpoints (where the run writes, how often, and --resume: checkpoint.py)
    C.add_run_flags(parser, out_dir="out/grpo", eval_every=50, save_every=50)
    add("--seed", type=int, default=0, help="seed of prompts order, rollouts and masks")
    objectives.add_flags(parser)  # the settings of the estimators and objectives beyond d1
    dryrun.add_flags(parser)
    args = parser.parse_args()
    warmup_steps = check_arguments(args)
    ratio_free = args.objective != "grpo"

    # -----------------------------------------------------------------------------
    # Distributed init and the batch arithmetic

    rank, world_size, device = ddp.init()
    if args.dry_run and args.dry_run_world_size:  # dry-run one rank of that world: its share of the batch
        world_size = args.dry_run_world_size
    torch.manual_seed(args.seed)  # nothing draws from the global RNG: rollouts and masks use generators
    if args.prompts_per_step % world_size != 0:
        raise SystemExit(f"--prompts-per-step {args.prompts_per_step} must be a multiple of the world size "
                         f"{world_size}: each rank owns whole groups")
    prompts_per_rank = args.prompts_per_step // world_size
    rollouts_per_rank = prompts_per_rank * args.num_generations
    if rollouts_per_rank % args.gradient_accumulation_steps != 0:
        raise SystemExit(f"the {rollouts_per_rank} rollouts of a rank must split into "
                         f"--gradient-accumulation-steps {args.gradient_accumulation_steps} micro-batches")
    micro = rollouts_per_rank // args.gradient_accumulation_steps
    micro_batches = [slice(j, j + micro) for j in range(0, rollouts_per_rank, micro)]
    defaults = data.generation_defaults(args.task)
    gen_length = args.max_completion_length or defaults["gen_length"]
    block_length = args.block_length or min(defaults["block_length"], gen_length)
    steps = args.diffusion_steps or defaults["steps"]
    if args.rollout_order == "left-to-right":  # one position a step: block length 1, gen_length steps
        if args.block_length not in (None, 1) or args.diffusion_steps not in (None, gen_length):
            raise SystemExit(f"--rollout-order left-to-right samples one position a step (block length 1, "
                             f"{gen_length} steps): drop --block-length and --diffusion-steps")
        block_length, steps = 1, gen_length
    sampler = {"steps": steps, "gen_length": gen_length, "block_length": block_length,
               "temperature": args.temperature, "cache": args.rollout_cache,
               "threshold": args.rollout_threshold}
    epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    make_input, logprobs, passes = ESTIMATORS[args.estimator](args, sampler)
    sequence_weights, ratio_free_loss = (objectives.RATIO_FREE_OBJECTIVES[args.objective](args) if ratio_free
                                         else (None, None))
    objectives.check_args(args, sampler)
    ddp.print0(f"args: {json.dumps(vars(args))}")
    ddp.print0(f"world {world_size} | {args.prompts_per_step} prompts x G={args.num_generations} per step = "
               f"{prompts_per_rank} prompts ({rollouts_per_rank} rollouts) per rank | micro-batch {micro} x "
               f"{args.gradient_accumulation_steps} | mu {args.num_iterations} optimiser steps per batch")

    # -----------------------------------------------------------------------------
    # Model, reference and tokenizer

    if not os.path.isdir(args.model):
        raise SystemExit(f"--model {args.model!r} is not a folder. The tiny default starts from the SFT "
                         "checkpoint: run `python sft.py` first (it writes out/sft), or pass --model DIR.")
    lora = C.is_adapter(args.model) or args.lora_r > 0
    if args.fsdp and (lora or world_size == 1):
        raise SystemExit("--fsdp shards full fine-tuning over 2 or more torchrun processes: drop --lora-r "
                         "and start from a full checkpoint (LoRA's states are small; DDP replicates them)")
    if args.dry_run:  # the first step on fake tensors at the checkpoint's shape, then stop
        if ddp.is_distributed():
            raise SystemExit("--dry-run runs as one process: python grpo.py --dry-run --dry-run-world-size N")
        raise SystemExit(dry_run(args, sampler, micro_batches, prompts_per_rank, epsilon_high, world_size))
    if device.type == "cuda" and not lora:  # refuse before loading what cannot fit
        M.check_full_finetuning_fits(M.config_parameters(C.read_config(args.model)),
                                     torch.cuda.get_device_properties(device).total_memory, world_size,
                                     args.fsdp, reference=args.beta > 0)
    try:  # a frozen base under LoRA sits in bf16 on a GPU; trained weights stay fp32 (autocast runs bf16)
        tokenizer = C.load_tokenizer(args.model, args.base_model)
        dtype = torch.bfloat16 if device.type == "cuda" and lora else torch.float32
        model = C.load_model(args.model, "cpu" if args.fsdp else device, dtype, args.base_model)  # FSDP: CPU
        base_model = C.adapter_base(args.model, args.base_model) if C.is_adapter(args.model) else args.model
    except (FileNotFoundError, ValueError) as err:  # e.g. an adapter whose base is a hub id: --base-model
        raise SystemExit(str(err)) from None
    if args.lora_r > 0 and not C.is_adapter(args.model):
        M.add_lora(model, args.lora_r, args.lora_alpha, 0.0, tuple(args.lora_targets.split(",")), args.seed)
    if not args.fsdp:
        model.to(device)
    model.gradient_checkpointing = args.grad_checkpointing
    # the reference: LoRA -> the base (adapters off), plus a dense delta per adapted layer once synced;
    # full fine-tuning -> a frozen copy of the starting model
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if args.beta > 0 and not lora else None
    for m in (model, ref_model) if args.fsdp else ():  # the reference sharded alike: mixed slice by slice
        if m is not None:
            ddp.shard_model(m, device)
    mask_id = C.mask_token_id(tokenizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ddp.print0(f"model: {args.model} ({M.num_parameters(model) / 1e6:.2f}M parameters, "
               f"{sum(p.numel() for p in trainable) / 1e6:.2f}M trained, {'LoRA' if lora else 'full'})")

    # -----------------------------------------------------------------------------
    # Data: prompts for rollouts, held-out prompts for greedy evaluation; optimiser and resume

    split = args.split or ("rl" if args.task in data.TINY_TASKS else "train")
    try:
        prompts = data.load_examples(args.task, split, data_dir=args.data_dir, seed=args.seed)
        eval_examples = (data.test_examples(args.task, args.data_dir, args.eval_examples)
                         if args.eval_examples > 0 else [])
    except (FileNotFoundError, ValueError) as err:  # a missing or malformed data file: the message says why
        raise SystemExit(str(err)) from None
    reward_functions = rewards.reward_functions(args.task)
    ddp.print0(f"data: {len(prompts)} prompts from {args.task}/{split}, {len(eval_examples)} held-out; "
               "rewards: " + ", ".join(f"{fn.__name__} x{w}" for fn, w in reward_functions))
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, args.adam_beta2),
                                  weight_decay=args.weight_decay)
    start_step, resumed = (C.resume(args.out_dir, vars(args), model, optimizer, rank, world_size, ddp.print0)
                           if args.resume else (0, None))
    if resumed:  # the reference as the stopped run left it: LoRA's synced deltas, or the synced full copy
        M.set_reference_deltas(model, resumed.get("ref_deltas") or {})
        if resumed.get("ref_model") is not None:
            C.load_full_state_dict(ref_model, lambda: resumed["ref_model"])
    ddp.broadcast_parameters(model)
    metrics_path = os.path.join(args.out_dir, C.METRICS_NAME)
    ddp.stop_on_sigterm()

    def save(step):  # a collective under FSDP (the full reference is gathered onto rank 0): every rank calls
        ref_state = C.full_state_dict(ref_model) if ref_model is not None and args.sync_ref_every else None
        C.save_checkpoint(args.out_dir, step, model, optimizer, tokenizer, base_model, vars(args),
                          {"ref_deltas": M.reference_deltas(model), "ref_model": ref_state})

    def held_out_accuracy():  # evaluate.py's greedy evaluation, sharded over the ranks
        with ddp.unsharded(model):  # FSDP: ranks run different numbers of forward passes here
            return evaluate_examples(model, tokenizer, args.task, eval_examples, device=device,
                                     progress=False, **defaults)["accuracy"]

    # -----------------------------------------------------------------------------
    # The loop: the docstring's steps 1-6, then metrics, evaluation and checkpoints

    if start_step == 0 and eval_examples:  # the starting point of the accuracy curve
        accuracy = held_out_accuracy()
        C.log_jsonl(metrics_path, {"step": 0, "eval_accuracy": accuracy})
        ddp.print0(f"step 00000/{args.max_steps} | held-out {100 * accuracy:.1f}% (the starting checkpoint)")
    bar = tqdm(total=args.max_steps, initial=start_step, desc="grpo", disable=rank != 0, dynamic_ncols=True)
    for step in range(start_step, args.max_steps):
        last_step, t0 = step == args.max_steps - 1, time.time()
        # 1. rollouts of this rank's share of the step's prompts (whole groups per rank)
        indices = data.step_indices(step, args.prompts_per_step, len(prompts), args.seed)
        records = [prompts[i] for i in ddp.shard(indices, rank, world_size)]
        # the sampler's pass counts, and its commit steps (recorded for d2-StepMerge alone: a cost per step)
        sampler_stats, rollout_record = {}, {}
        with ddp.unsharded(model):  # FSDP: the sampler skips steps with nothing to commit, so ranks differ
            sequences, attention_mask, canvas, completion_mask, texts = rollout(
                model, tokenizer, records, sampler, num_generations=args.num_generations, mask_id=mask_id,
                device=device, max_prompt_length=args.max_prompt_length,
                batch_size=args.generation_batch_size, noise_seed=(args.seed, step, rank),
                stats=sampler_stats, record=rollout_record if args.estimator == "stepmerge" else None)
        prompt_length, t_rollout = sequences.shape[1] - gen_length, time.time() - t0
        # 2-3. rewards and group-relative advantages
        reward, per_function = score_completions(reward_functions, texts, records, args.num_generations)
        igpo_stats = {}  # IGPO (objectives.py): the groups with no correct completion, sampled with hints
        if args.inpaint_zero_std_groups:
            with ddp.unsharded(model), M.autocast(device):  # FSDP: ranks regenerate different group counts
                rolled = (sequences, attention_mask, canvas, completion_mask, texts)
                sequences, completion_mask, texts, igpo_stats = objectives.igpo_step(
                    args, model, tokenizer, records, rolled, sampler, mask_id=mask_id,
                    noise_seed=(args.seed, step, rank), stats=sampler_stats)
            if igpo_stats["igpo_replaced"]:  # the new rows' rewards
                reward, per_function = score_completions(reward_functions, texts, records,
                                                         args.num_generations)
        advantages = group_advantages(reward, args.num_generations, args.scale_rewards)  # (N, 1)
        batch = {"sequences": sequences, "attention_mask": attention_mask, "prompt_length": prompt_length,
                 "completion_mask": completion_mask, "advantages": advantages.to(device),
                 "num_generations": args.num_generations}
        if ratio_free:  # per-sequence weights of the objective, from the whole groups' advantages
            batch["weights"] = sequence_weights(advantages, args.num_generations).to(device)
        # 4. one estimator input per inner iteration: a fresh mask seed each (random_masking) or a fixed one
        t1 = time.time()
        is_prompt = conditioning_mask(sequences, prompt_length, canvas, mask_id)
        seeds = [(args.seed, step, k) if args.random_masking else (args.seed,)
                 for k in range(args.num_iterations)]
        estimates = [make_input(sequences, is_prompt, args.p_mask_prompt, mask_id, data.generator(*s),
                                completion_mask=completion_mask, **rollout_record) for s in seeds]
        # 5. old and reference log-probs of every estimate, once
        old_logps, ref_logps = old_and_reference_logprobs(model, ref_model, logprobs, estimates, batch,
                                                          micro_batches, objective=args.objective,
                                                          beta=args.beta, device=device)
        # 6. mu optimiser steps, step k on estimate k
        first_step = step * args.num_iterations
        lrs = [learning_rate(first_step + k, args.lr, args.lr_schedule, warmup_steps,
                             args.max_steps * args.num_iterations) for k in range(args.num_iterations)]
        stats = update(model, optimizer, trainable, logprobs, estimates, batch, micro_batches, lrs,
                       old_logps=old_logps, ref_logps=ref_logps, ref_model=ref_model,
                       objective=args.objective, ratio_free_loss=ratio_free_loss, epsilon=args.epsilon,
                       epsilon_high=epsilon_high,
                       beta=args.beta, max_grad_norm=args.max_grad_norm, first_step=first_step,
                       sync_ref_every=args.sync_ref_every, ref_mix_alpha=args.ref_mix_alpha, device=device)
        stats["update_forward_passes"] = (len(old_logps or []) + len(ref_logps or []) + len(lrs)) * passes
        t_update, dt = time.time() - t1, time.time() - t0

        # metrics, all-reduced over ranks; evaluation; one line; checkpoints and a SIGTERM stop
        local = {**rollout_metrics(reward, per_function, completion_mask, attention_mask, prompt_length,
                                   args.num_generations), **stats, **igpo_stats}
        record = {"step": step + 1, **ddp.all_reduce_mean(local), "lr": lrs[-1], "rollout_s": t_rollout,
                  "update_s": t_update, "tok_per_s": rollouts_per_rank * world_size * gen_length / dt,
                  "rollout_forward_passes_per_token": forward_passes_per_token(sampler_stats)}  # rank 0's
        if eval_examples and (last_step or args.eval_every > 0 and (step + 1) % args.eval_every == 0):
            record["eval_accuracy"] = held_out_accuracy()
        C.log_jsonl(metrics_path, record)
        bar.update(1)
        if rank == 0 and ((step + 1) % args.log_every == 0 or "eval_accuracy" in record or last_step):
            line = (f"step {step + 1:05d}/{args.max_steps} | reward {record['reward']:.3f} | loss "
                    f"{record['loss']:+.4f} | kl {record['kl']:.4f} | clip {record['clip_ratio']:.3f} | lr "
                    f"{lrs[-1]:.2e} | rollout {t_rollout:.1f}s update {t_update:.1f}s | tok/s "
                    f"{record['tok_per_s']:.0f}")
            bar.write(line + (f" | held-out {100 * record['eval_accuracy']:.1f}%" if "eval_accuracy" in record
                              else ""))
        preempted = not last_step and ddp.any_rank(ddp.sigterm_received())  # every rank stops after this step
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
