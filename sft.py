"""
Stage 1 of d1: masked SFT, the completion-only supervised fine-tuning of LLaDA (Nie et al. 2025, App. B.1).

For each example x = prompt ++ response, the response padded with EOS (to --max-seq-length as d1 does, or
to the micro-batch's longest) and every pad trained on as a response token: that is how the model learns
to stop and to fill the tail of a long canvas with EOS. Draw t ~ U(0, 1) per sequence,
p = (1 - eps) t + eps, mask every response token with probability p (never the prompt), and minimise

    loss = sum over masked tokens of CE(logits_i, x_i) / p  /  number of response tokens

(d1 divides by the response tokens of the micro-batch, pads included). Chat tasks build x as d1 does: the
chat template over the user turn and the reply, the prompt boundary one token into the assistant header
(see data.sft_tokens). The model learns to fill any fraction of the answer from the prompt and the rest of
the answer, which is what the sampler in generate.py asks of it. The loss is forward_mask and sft_loss,
just below.

How this script differs from d1's SFT: no Trainer (a plain loop), hand-written DDP and LoRA, the global
batch given in global units, the masks drawn from (seed, step) for the whole global batch so that a run
is the same at any world size, and exact resume from the newest checkpoint (see also the README's table
of differences from d1).

    python sft.py                                    # the tiny default: 4x4 Sudoku on a laptop CPU
    torchrun --standalone --nproc_per_node=2 sft.py  # the same run over 2 CPU processes (gloo)
    torchrun --standalone --nproc_per_node=8 sft.py --model checkpoints/LLaDA-8B-Instruct --task s1k \\
        --lora-r 128 --lora-alpha 256 --lora-dropout 0.05 --lora-targets q_proj,k_proj,v_proj \\
        --batch-size 8 --micro-batch-size 1 --lr 1e-5 --lr-schedule linear --warmup-steps 0 \\
        --adam-beta2 0.999 --max-seq-length 4096 --pad-to max-length --overlong truncate \\
        --grad-checkpointing --max-steps 2500 \\
        --out-dir out/sft-s1k        # d1's recipe: 20 epochs of s1K at batch 8 (see the README)
    torchrun --nnodes 2 --nproc_per_node=8 --rdzv-backend c10d --rdzv-endpoint HOST:PORT \\
        sft.py ...                   # on each node
"""

import argparse
import contextlib
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
from evaluate import evaluate_examples

# -----------------------------------------------------------------------------
# The masked-diffusion loss, LLaDA's SFT objective (above the script, so that the tests can import it)


def forward_mask(input_ids, prompt_lengths, mask_id, eps=1e-3, generator=None, noise=None):
    """LLaDA's forward process for SFT. Per sequence t ~ U(0, 1), p = (1 - eps) t + eps; each response
    token is replaced by [MASK] with probability p; prompt tokens never are.
    The uniforms come from `noise` = (t (B,), u (B, >= L)) when the caller draws them (sft.py draws them
    for its whole global batch, so that a row's mask does not depend on how the batch is split over
    ranks), else from `generator`, on the CPU. Returns (noisy_ids (B, L), masked (B, L) bool, p (B, 1))."""
    B, L = input_ids.shape
    device = input_ids.device
    t, u = noise if noise is not None else (torch.rand(B, generator=generator),
                                            torch.rand(B, L, generator=generator))
    t, u = t.to(device), u[:, :L].to(device)
    p = ((1 - eps) * t + eps)[:, None]  # (B, 1)
    is_response = torch.arange(L, device=device)[None, :] >= prompt_lengths[:, None]
    masked = (u < p) & is_response
    noisy = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    return noisy, masked, p


def sft_loss(logits, input_ids, masked, p, prompt_lengths, start=0):
    """LLaDA's SFT loss (its appendix, eq. for SFT): the cross-entropy of every masked response token,
    weighted 1/p, summed and divided by the number of response tokens (d1's normalisation).
    logits (B, L - start, V) are those of positions start.. (the model's `positions=slice(start, None)`;
    start <= the shortest prompt, so every response position is there), input_ids/masked (B, L), p (B, 1),
    prompt_lengths (B,). The cross-entropy runs in fp32 chunks recomputed in backward
    (M.chunked_cross_entropy): the masked rows of the logits, in their own dtype, are what backward keeps."""
    L = input_ids.shape[1]
    masked, targets = masked[:, start:], input_ids[:, start:]
    ce = M.chunked_cross_entropy(logits[masked], targets[masked])  # (num_masked,)
    num_response = (L - prompt_lengths).sum().clamp(min=1)
    return (ce / p.expand_as(masked)[masked]).sum() / num_response


def micro_batch_loss(model, input_ids, prompt_lengths, start, mask_id, mask_eps, noise, device):
    """One micro-batch's loss: its forward mask (noise: its uniforms), the logits of positions start.. (the
    shortest prompt: the LM head over response positions only), sft_loss. input_ids (B, L), prompt_lengths
    (B,). The (B, L - start, V) logits are freed on return: only the loss's saved rows outlive backward."""
    noisy, masked, p = forward_mask(input_ids, prompt_lengths, mask_id, mask_eps, noise=noise)
    with M.autocast(device):
        logits = model(noisy, positions=slice(start, None))  # (B, L - start, V)
    return sft_loss(logits, input_ids, masked, p, prompt_lengths, start)


def dry_run(args, micro, accumulation, world_size):
    """--dry-run: one rank's first optimiser step (a micro-batch of micro x --max-seq-length tokens, its
    backward, the optimiser step) on fake tensors at the checkpoint's shape, read from its config.json alone,
    in the dtypes and autocast of a CUDA run. Prints each phase's peak memory, FLOPs and H100 time; returns
    the exit status."""
    if args.model in M.PRESETS:
        tokenizer = C.build_tiny_tokenizer()
        config = C.preset_config(args.model, tokenizer)
    elif os.path.isdir(args.model):
        tokenizer, config = dryrun.checkpoint_shape(args.model)
    else:
        return f"--model {args.model!r} is neither a checkpoint folder nor a preset"
    L, P, lora = args.max_seq_length, args.dry_run_prompt_tokens, args.lora_r > 0
    notes = [f"one rank: a micro-batch of {micro} x {L} tokens, prompts of {P}, x {accumulation} accumulated",
             "t = 1: every response token masked (the loss's worst case)",
             "AdamW's moments live from the start (a second step's view), and the gradients too when a step "
             "accumulates micro-batches"]
    input_ids = torch.full((micro, L), tokenizer.eos_token_id)
    prompt_lengths = torch.full((micro,), P)
    noise = (torch.ones(micro), torch.zeros(micro, L))  # t = 1 and u = 0: p = 1 everywhere
    world = dryrun.fake_world(world_size) if args.fsdp else contextlib.nullcontext()
    with world as mesh, dryrun.session() as run, dryrun.cuda_like_autocast():
        model = dryrun.build_model(config, torch.bfloat16 if lora else torch.float32).train()
        if lora:
            M.add_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout,
                       tuple(args.lora_targets.split(",")), args.seed)
        model.gradient_checkpointing = args.grad_checkpointing
        if args.fsdp:  # one rank's slices, gathered as on a GPU (bf16)
            ddp.shard_model(model, "cuda", mesh)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, args.adam_beta2),
                                      weight_decay=args.weight_decay, foreach=True)  # CUDA's default
        dryrun.materialise_optimizer_state(optimizer, trainable, keep_grads=accumulation > 1)

        def optimiser_step(*_):  # the micro-batch's phase ends where the optimiser's begins
            run.end()
            run.begin("optimiser step")

        optimizer.register_step_pre_hook(optimiser_step)
        run.begin("forward and backward of a micro-batch", repeat=accumulation)
        loss = micro_batch_loss(model, input_ids, prompt_lengths, P, C.mask_token_id(tokenizer),
                                args.mask_eps, noise, "cpu")
        (loss / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm or float("inf"))
        optimizer.step()
        run.end()
    return dryrun.finish(run, args.dry_run_gpu_memory, notes)


# -----------------------------------------------------------------------------
# The script: what follows runs as `python sft.py` (or under torchrun), never on import

if __name__ == "__main__":
    # -----------------------------------------------------------------------------
    # CLI

    parser = argparse.ArgumentParser(description="Masked SFT of a diffusion LM (stage 1 of d1).")
    # Model and data
    parser.add_argument("--model", default="tiny",
                        help="a checkpoint folder (LLaDA's layout) or a preset name "
                        f"({', '.join(M.PRESETS)}); presets start from random weights and the character "
                        "tokenizer")
    parser.add_argument("--task", default="tiny_sudoku", choices=data.TASKS, help="training data (see data/)")
    parser.add_argument("--split", default=None,
                        help="data split (default: 'sft' for the tiny tasks, else 'train')")
    parser.add_argument("--data-dir", default="data/files", help="where downloaded datasets live")
    parser.add_argument("--num-examples", type=int, default=None, help="use only this many training examples")
    parser.add_argument("--max-seq-length", type=int, default=4096, help="prompt + response tokens at most")
    parser.add_argument("--overlong", default="drop", choices=["drop", "truncate"],
                        help="what to do with longer examples "
                        "(d1 truncates; they are counted in the log either way)")
    parser.add_argument("--pad-to", default="longest", choices=["longest", "max-length"],
                        help="pad responses with EOS to the micro-batch's longest, "
                        "or to --max-seq-length as d1 does")
    # Memory: full fine-tuning sharded over the ranks, recomputed activations, or LoRA (r > 0)
    parser.add_argument("--fsdp", action="store_true",
                        help="full fine-tuning sharded over the ranks with FSDP2 (torch's fully_shard per "
                        "block): weights, gradients and AdamW state split; needs torchrun")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--lora-r", type=int, default=0, help="LoRA rank; 0 trains every weight")
    parser.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (scaling alpha / r)")
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input")
    parser.add_argument("--lora-targets", default=",".join(M.LORA_TARGETS),
                        help="comma-separated module names")
    # Optimisation
    parser.add_argument("--batch-size", type=int, default=128,
                        help="global batch: examples per optimiser step")
    parser.add_argument("--micro-batch-size", type=int, default=None,
                        help="examples per forward pass on one rank (default: batch-size / world size)")
    parser.add_argument("--max-steps", type=int, default=300, help="optimiser steps")
    parser.add_argument("--max-seconds", type=float, default=0,
                        help="also stop after this much training time "
                        "(the lr schedule spans whichever ends first); 0 = off")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--lr-schedule", default="cosine", choices=["cosine", "constant", "linear"],
                        help="after warm-up")
    parser.add_argument("--warmup-steps", type=int, default=100, help="linear warm-up steps")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    parser.add_argument("--adam-beta2", type=float, default=0.99, help="AdamW beta2 (beta1 0.9)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping; 0 = off")
    parser.add_argument("--mask-eps", type=float, default=1e-3,
                        help="the smallest masking rate p (LLaDA's eps)")
    # Evaluation, logging, checkpoints (where the run writes, how often, and --resume: checkpoint.py)
    C.add_run_flags(parser, out_dir="out/sft", eval_every=100, save_every=100)
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the model init, data order and masks")
    dryrun.add_flags(parser)
    args = parser.parse_args()

    # -----------------------------------------------------------------------------
    # Distributed init and the batch arithmetic

    rank, world_size, device = ddp.init()
    if args.dry_run and args.dry_run_world_size:  # dry-run one rank of that world: its share of the batch
        world_size = args.dry_run_world_size
    # torch's global RNG draws LoRA dropout alone, which must differ across ranks (rank 0 keeps the run's
    # seed); whatever must agree across ranks (init, masks) comes from explicit generators
    torch.manual_seed(args.seed if rank == 0 else data.derive_seed(args.seed, rank))
    micro = args.micro_batch_size or args.batch_size // world_size
    if micro == 0 or args.batch_size % (micro * world_size) != 0:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of micro-batch-size x world "
                         f"size ({micro} x {world_size})")
    accumulation = args.batch_size // (micro * world_size)
    if args.log_every < 1:
        raise SystemExit(f"--log-every {args.log_every}: print every N >= 1 steps")
    ddp.print0(f"args: {json.dumps(vars(args))}")
    ddp.print0(f"world {world_size} | global batch {args.batch_size} = {micro} per micro-batch x "
               f"{accumulation} accumulation x {world_size} ranks | device {device}")

    # -----------------------------------------------------------------------------
    # Model and tokenizer

    if args.fsdp and (args.lora_r > 0 or world_size == 1):
        raise SystemExit("--fsdp shards full fine-tuning over 2 or more torchrun processes: drop --lora-r "
                         "(LoRA's states are small; DDP replicates them) and launch with torchrun")
    if args.lora_r > 0 and args.model in M.PRESETS:
        raise SystemExit("--lora-r needs a pretrained base: pass --model CHECKPOINT_DIR "
                         "(a preset starts from random weights)")
    if args.dry_run:  # the first step on fake tensors at the checkpoint's shape, then stop
        if ddp.is_distributed():
            raise SystemExit("--dry-run runs as one process: python sft.py --dry-run --dry-run-world-size N")
        raise SystemExit(dry_run(args, micro, accumulation, world_size))
    if device.type == "cuda" and args.lora_r == 0:  # refuse before loading what cannot fit
        M.check_full_finetuning_fits(M.config_parameters(M.PRESETS[args.model] if args.model in M.PRESETS
                                                         else C.read_config(args.model)),
                                     torch.cuda.get_device_properties(device).total_memory,
                                     world_size, args.fsdp)
    if args.model in M.PRESETS:
        tokenizer = C.build_tiny_tokenizer()
        model = C.build_model(args.model, tokenizer, seed=args.seed)
    elif os.path.isdir(args.model):
        tokenizer = C.load_tokenizer(args.model)
        # a frozen base under LoRA can sit in bf16 on a GPU; weights that train stay fp32 (autocast runs
        # bf16); under FSDP the weights stay on the CPU until fully_shard moves each block's slice to the GPU
        model = C.load_model(args.model, "cpu" if args.fsdp else device,
                             torch.bfloat16 if device.type == "cuda" and args.lora_r > 0 else torch.float32)
    else:
        raise SystemExit(f"--model {args.model!r} is neither a checkpoint folder nor a preset "
                         f"({', '.join(M.PRESETS)})")
    if args.lora_r > 0:
        M.add_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout,
                   tuple(args.lora_targets.split(",")), args.seed)
    model.gradient_checkpointing = args.grad_checkpointing
    if args.fsdp:
        ddp.shard_model(model, device)  # block by block: the GPU never holds the full fp32 model
    else:
        model.to(device)
    mask_id = C.mask_token_id(tokenizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ddp.print0(f"model: {M.num_parameters(model) / 1e6:.2f}M parameters, "
               f"{sum(p.numel() for p in trainable) / 1e6:.2f}M trained "
               f"({'LoRA r=%d' % args.lora_r if args.lora_r else 'full'}), mask id {mask_id}")

    # -----------------------------------------------------------------------------
    # Data: tokenise prompt and response (data.sft_tokens: d1's chat layout, or the canvas layout of
    # infilling tasks)

    split = args.split or ("sft" if args.task in data.TINY_TASKS else "train")
    if args.eval_examples > 0 and args.task == "s1k":
        ddp.print0("s1k has no test set: no held-out accuracy during SFT "
                   "(run evaluate.py on a d1 task afterwards)")
    try:
        examples = data.load_examples(args.task, split, data_dir=args.data_dir, limit=args.num_examples,
                                      seed=args.seed)
        # held-out examples for the accuracy printed during and after training
        eval_examples = (data.test_examples(args.task, args.data_dir, args.eval_examples)
                         if args.eval_examples > 0 and args.task != "s1k" else [])
    except (FileNotFoundError, ValueError) as err:  # a missing or malformed file: its message says what to do
        raise SystemExit(str(err)) from None
    if not examples or examples[0]["completion"] is None:
        raise SystemExit(f"task {args.task} split {split} has no SFT completions")
    sequences, dropped, truncated = [], 0, 0
    for ex in examples:
        prompt_ids, response_ids = data.sft_tokens(tokenizer, ex)
        if len(prompt_ids) + len(response_ids) > args.max_seq_length:
            if args.overlong == "drop" or len(prompt_ids) >= args.max_seq_length:
                dropped += 1
                continue
            response_ids = response_ids[: args.max_seq_length - len(prompt_ids)]
            truncated += 1
        sequences.append((prompt_ids, response_ids))
    if not sequences:
        raise SystemExit(f"no example fits --max-seq-length {args.max_seq_length}")
    ddp.print0(f"data: {args.task}/{split} {len(sequences)} examples ({dropped} dropped, {truncated} "
               f"truncated as longer than {args.max_seq_length} tokens)")


    def padded_length(indices):
        return (args.max_seq_length if args.pad_to == "max-length"
                else max(sum(map(len, sequences[i])) for i in indices))


    def collate(indices):
        """(B, L) token ids with the response padded by EOS (d1: the tokenizer's pad token, which it sets
        to EOS), and prompt lengths (B,)."""
        length = padded_length(indices)
        rows, prompt_lengths = [], []
        for i in indices:
            prompt_ids, response_ids = sequences[i]
            pad = length - len(prompt_ids) - len(response_ids)
            rows.append(prompt_ids + response_ids + [tokenizer.eos_token_id] * pad)
            prompt_lengths.append(len(prompt_ids))
        return torch.tensor(rows, device=device), torch.tensor(prompt_lengths, device=device)


    eval_settings = data.generation_defaults(args.task)

    # -----------------------------------------------------------------------------
    # Optimiser and resume

    optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, args.adam_beta2),
                                  weight_decay=args.weight_decay)
    start_step = (C.resume(args.out_dir, vars(args), model, optimizer, rank, world_size, ddp.print0)[0]
                  if args.resume else 0)
    ddp.broadcast_parameters(model)
    metrics_path = os.path.join(args.out_dir, C.METRICS_NAME)
    ddp.stop_on_sigterm()


    def held_out_accuracy():
        model.eval()
        with ddp.unsharded(model):  # FSDP: ranks run different numbers of forward passes here
            result = evaluate_examples(model, tokenizer, args.task, eval_examples, device=device,
                                       progress=False, **eval_settings)
        model.train()
        return result["accuracy"]


    def get_lr(step):
        """Linear warm-up over --warmup-steps, then --lr-schedule: constant, linear decay to 0 (the Trainer
        default d1's SFT used) or cosine decay to 10% of --lr at --max-steps; without --max-seconds a
        function of the step alone, so a resumed run needs nothing else. Under --max-seconds the schedule
        runs over the time budget when that ends first (run_tiny.sh's baseline anneals within GRPO's wall
        time): the step it sees is the share of the budget spent, averaged over ranks so that every rank
        sets the same lr."""
        if args.max_seconds > 0:
            spent = ddp.all_reduce_mean({"spent": (time.time() - t_start) / args.max_seconds})["spent"]
            step = max(step, int(spent * args.max_steps))
        if step < args.warmup_steps:
            return args.lr * (step + 1) / args.warmup_steps
        progress = min(1.0, (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps))
        cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        return args.lr * {"constant": 1.0, "linear": 1 - progress, "cosine": cosine}[args.lr_schedule]


    # -----------------------------------------------------------------------------
    # The loop

    model.train()
    # a time-budgeted run's bar counts seconds (its step budget is only a bound), any other run's counts steps
    timed = args.max_seconds > 0
    bar = tqdm(total=args.max_seconds if timed else args.max_steps, initial=0 if timed else start_step,
               unit="s" if timed else "step", desc="sft", disable=rank != 0, dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}]" if timed else None)
    t_start = time.time()
    final_step = args.max_steps
    for step in range(start_step, args.max_steps):
        t0 = time.time()
        lr = get_lr(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = data.step_indices(step, args.batch_size, len(sequences), args.seed)  # the global batch
        # the masking noise of the whole global batch, from (seed, step): every rank draws the same, so a
        # row's mask is the same whatever the world size and micro-batch size
        g = data.generator(args.seed, step)
        t_noise = torch.rand(args.batch_size, generator=g)
        u_noise = torch.rand(args.batch_size, padded_length(batch), generator=g)
        loss_sum, tokens = 0.0, 0
        # micro-batch j of the global batch belongs to rank j % world_size
        for j in range(rank, args.batch_size // micro, world_size):
            rows = slice(j * micro, (j + 1) * micro)
            input_ids, prompt_lengths = collate(batch[rows])
            # the LM head on response positions only: from the shortest prompt of the micro-batch to the end
            loss = micro_batch_loss(model, input_ids, prompt_lengths, int(prompt_lengths.min()), mask_id,
                                    args.mask_eps, (t_noise[rows], u_noise[rows]), device)
            (loss / accumulation).backward()
            loss_sum += loss.item()
            tokens += input_ids.numel()
        ddp.all_reduce_gradients(trainable)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            trainable, args.max_grad_norm if args.max_grad_norm > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        metrics = ddp.all_reduce_mean({"loss": loss_sum / accumulation, "tokens": tokens})
        tokens = round(metrics["tokens"] * world_size)  # the step's tokens over all ranks, pads included
        dt = time.time() - t0
        # the time budget is decided on all ranks together, so that no rank waits for one that stopped
        out_of_time = args.max_seconds > 0 and ddp.any_rank(time.time() - t_start > args.max_seconds)
        last_step = step == args.max_steps - 1 or out_of_time
        record = {"step": step + 1, "loss": metrics["loss"], "lr": lr, "grad_norm": float(grad_norm),
                  "dt_ms": dt * 1000, "tokens": tokens, "tok_per_s": tokens / dt}
        if (args.eval_every > 0 and (step + 1) % args.eval_every == 0) or last_step:
            if eval_examples:
                record["eval_accuracy"] = held_out_accuracy()
        C.log_jsonl(metrics_path, record)
        bar.update(min(time.time() - t_start, args.max_seconds) - bar.n if timed else 1)
        if rank == 0 and ((step + 1) % args.log_every == 0 or "eval_accuracy" in record or last_step):
            bar.write(f"step {step + 1:05d}/{args.max_steps} | loss {record['loss']:.4f} | lr {lr:.2e} | "
                      f"grad {record['grad_norm']:.3f} | dt {record['dt_ms']:.0f}ms | "
                      f"tok/s {record['tok_per_s']:.0f}"
                      + (f" | held-out {100 * record['eval_accuracy']:.1f}%" if "eval_accuracy" in record
                         else ""))
        if last_step:
            final_step = step + 1
            break
        # SIGTERM (a preemption) on any rank: every rank stops after this same step, with a checkpoint
        preempted = ddp.any_rank(ddp.sigterm_received())
        if preempted or (args.save_every > 0 and (step + 1) % args.save_every == 0):
            C.save_checkpoint(args.out_dir, step + 1, model, optimizer, tokenizer, args.model, vars(args))
        if preempted:
            bar.close()
            ddp.exit_after_preemption(step + 1)
    bar.close()
    ddp.assert_parameters_identical(model)

    # -----------------------------------------------------------------------------
    # Final model: LLaDA's layout (or the adapter folder), plus a last resumable checkpoint

    C.save_checkpoint(args.out_dir, final_step, model, optimizer, tokenizer, args.model, vars(args))
    C.save_final_model(model, tokenizer, args.out_dir, args.model, vars(args))
    if rank == 0:
        steps_done = final_step - start_step
        elapsed = time.time() - t_start
        print(f"done: {steps_done} steps in {elapsed:.1f}s ({steps_done / max(elapsed, 1e-9):.2f} steps/s); "
              f"model in {args.out_dir}", flush=True)
    ddp.cleanup()
