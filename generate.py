"""
The sampler: reverse diffusion with low-confidence remasking, decoded in semi-autoregressive blocks
(LLaDA, Nie et al. 2025, Sec. 2.4 and Appendix B). GRPO's rollouts, evaluation and this CLI all call
the one `generate()` below.

    x = prompt ++ [MASK] * gen_length
    for each block of block_length tokens, left to right:       (gen_length / block_length blocks)
        for each of steps / num_blocks steps:
            logits = model(x)                                    (one forward pass)
            x0 = argmax(logits + temperature * Gumbel)           (a sample; temperature 0 = greedy)
            confidence = softmax(logits)[x0]  or  uniform random ("random" remasking)
            commit the k most confident masked positions of the block to x0, where the block's masked
            count is split evenly over its steps, the remainder going to the earliest steps.

Classifier-free guidance (cfg_scale > 0): a second pass with the prompt masked,
logits = uncond + (cfg_scale + 1) * (cond - uncond).

Usage:
    python generate.py --model out/sft --prompt "1024\\n0300\\n0012\\n4000"
    python generate.py --bench          # sampler vs bare forward passes, tiny and ~60M models
"""

import argparse
import itertools
import time

import torch
import torch.nn.functional as F


def num_transfer_tokens(block_masked, steps):
    """How many tokens each step commits: the masked count of each row of the block split evenly over
    the steps, the remainder going to the earliest ones. block_masked (B, block_length) -> (B, steps)."""
    n = block_masked.sum(dim=1, keepdim=True)  # (B, 1)
    step = torch.arange(steps, device=n.device)[None, :]  # (1, steps)
    return n // steps + (step < n % steps).long()


CACHE_MODES = ("none", "prefix", "dual")


@torch.no_grad()
def generate(model, prompt_ids, steps, gen_length, block_length, temperature=0.0, cfg_scale=0.0,
             remasking="low_confidence", mask_id=126336, attention_mask=None, generator=None, canvas=None,
             cache="none", threshold=None, stats=None):
    """Sample gen_length tokens after prompt_ids (B, Lp). Returns the (B, Lp + gen_length) tokens.

    Rows of the batch are independent. Gumbel noise is drawn in float64 (as d1 does in its rollouts) from
    `generator` when given. attention_mask (B, Lp) marks real prompt tokens when prompts are left-padded
    (None: every position attends everywhere, as LLaDA and d1 do). canvas (B, gen_length), optional, is
    the completion to start from instead of all [MASK]: its non-mask tokens are kept and only its masked
    positions are sampled (infilling); each block's steps split the masks the block actually has.
    `model(x, attention_mask, positions)` returns the logits of the positions (a slice) only, as model.LLaDA.

    The fast sampler (Fast-dLLM, Wu et al. 2025), as keyword options; the defaults are LLaDA's sampler:
    - cache="prefix": the first forward pass of a block runs the whole sequence and keeps every layer's keys
      and values; the block's other steps run the block and everything after it as queries, reading the
      positions before the block (prompt, finished blocks) from that cache. cache="dual": the positions after
      the block are read from the cache too, so a step runs the block's tokens alone. The cache is refreshed
      at every block's first pass; the approximation is only its staleness within a block.
    - threshold=tau: each step commits every masked position of the block whose confidence is >= tau, and
      at least the most confident one (Fast-dLLM's parallel decoding); a block ends when its masks are gone,
      so the number of steps varies and `steps` is not used. A row whose block is done commits nothing while
      the other rows finish theirs, so a row's tokens do not depend on its batch.
    - stats, a dict, is filled (added to, so one dict can sum a loop of calls) with forward_passes (model
      calls, each over the whole batch; cfg's two halves are one call), row_forward_passes (calls x rows) and
      generated_tokens (positions sampled): forward passes per generated token = row / generated."""
    if gen_length % block_length != 0:
        raise ValueError(f"gen_length {gen_length} must be a multiple of block_length {block_length}")
    num_blocks = gen_length // block_length
    if steps % num_blocks != 0:
        raise ValueError(f"steps {steps} must be a multiple of the number of blocks "
                         f"({gen_length} / {block_length} = {num_blocks})")
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"remasking must be 'low_confidence' or 'random', not {remasking!r}")
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}, not {cache!r}")
    if threshold is not None and (remasking != "low_confidence" or not 0 < threshold <= 1):
        raise ValueError(f"threshold {threshold}: a confidence in (0, 1], with remasking='low_confidence'")
    steps_per_block = steps // num_blocks
    B, Lp = prompt_ids.shape
    device = prompt_ids.device
    x = torch.full((B, Lp + gen_length), mask_id, dtype=torch.long, device=device)
    x[:, :Lp] = prompt_ids
    if canvas is not None:
        x[:, Lp:] = canvas
    prompt_index = torch.zeros_like(x, dtype=torch.bool)
    prompt_index[:, :Lp] = True
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask.to(device), torch.ones(B, gen_length, dtype=attention_mask.dtype,
                                                                          device=device)], dim=1)
    if cfg_scale > 0:  # one batched pass for the conditional and the unconditional (prompt masked) rows
        attention_mask = None if attention_mask is None else attention_mask.repeat(2, 1)
    counts = {"forward_passes": 0, "row_forward_passes": 0, "generated_tokens": int((x[:, Lp:] == mask_id).sum())}

    for block in range(num_blocks):
        start, end = Lp + block * block_length, Lp + (block + 1) * block_length
        transfers = num_transfer_tokens(x[:, start:end] == mask_id, steps_per_block)  # (B, steps_per_block)
        # with a cache, the block's first pass runs the whole sequence, and the later ones run only these
        queries = slice(start, None) if cache == "prefix" else slice(start, end)
        past_kv = None
        for i in itertools.count():
            still_masked = x[:, start:end] == mask_id  # (B, block_length)
            if threshold is None:
                if i == steps_per_block:
                    break
                k = transfers[:, i]  # (B,) tokens each row commits at this step
                if int(k.max()) == 0:  # nothing to commit (a block with fewer masks than steps): no forward pass
                    continue
            elif not still_masked.any():  # every row's block is done
                break
            inputs = x
            if cfg_scale > 0:
                inputs = torch.cat([x, torch.where(prompt_index, torch.full_like(x, mask_id), x)])
            if cache == "none":
                logits = model(inputs, attention_mask, slice(start, end))
            elif past_kv is None:  # the block's first pass: the whole sequence, and every layer's keys/values
                logits, past_kv = model(inputs, attention_mask, slice(start, end), return_kv=True)
            else:
                logits = model(inputs, attention_mask, slice(start, end), past_kv=past_kv, queries=queries)
            counts["forward_passes"] += 1
            counts["row_forward_passes"] += B
            if cfg_scale > 0:
                cond_logits, uncond_logits = logits.chunk(2)
                logits = uncond_logits + (cfg_scale + 1) * (cond_logits - uncond_logits)
            # only the current block can be committed: the logits and everything below are of it alone
            logits = logits.double()  # (B, block_length, V)
            logits[..., mask_id] = -torch.inf  # never commit [MASK]: the position would stay masked for good
            if temperature > 0:
                u = torch.rand(logits.shape, dtype=torch.float64, device=device, generator=generator)
                gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
                x0 = (logits + temperature * gumbel).argmax(dim=-1)
            else:
                x0 = logits.argmax(dim=-1)  # (B, block_length)
            if remasking == "low_confidence":
                confidence = F.softmax(logits, dim=-1).gather(-1, x0[..., None]).squeeze(-1)
            else:
                confidence = torch.rand(x0.shape, dtype=torch.float64, device=device, generator=generator)
            confidence = torch.where(still_masked, confidence, -torch.inf)
            if threshold is not None:  # every masked position at least tau confident, at least one per unfinished row
                k = (confidence >= threshold).sum(dim=-1).clamp(min=1) * still_masked.any(dim=-1)
            kmax = int(k.max())
            # commit the k_b most confident positions of each row b, with no loop over rows:
            # take the top max(k) and keep the first k_b of them
            top = confidence.topk(kmax, dim=-1).indices  # (B, kmax)
            keep = torch.arange(kmax, device=device)[None, :] < k[:, None]
            commit = torch.zeros_like(still_masked)
            commit.scatter_(1, top, keep)
            x[:, start:end] = torch.where(commit, x0, x[:, start:end])
    if stats is not None:
        for key, value in counts.items():
            stats[key] = stats.get(key, 0) + value
    return x


def forward_passes_per_token(stats):
    """Forward passes per generated token from generate's `stats`: each pass costs every row of its batch."""
    return stats["row_forward_passes"] / max(stats["generated_tokens"], 1)


def completion_text(tokenizer, completion_ids, stop_ids):
    """Decode a completion cut before its first stop token (EOS / end-of-turn)."""
    ids = completion_ids.tolist()
    for j, t in enumerate(ids):
        if t in stop_ids:
            ids = ids[:j]
            break
    return tokenizer.decode(ids, skip_special_tokens=False)


# -----------------------------------------------------------------------------
# The benchmark: how much of the sampler's time is the model's forward passes?


def bench(args):
    import model as M

    def time_it(fn, repeats):
        fn()  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t0) / repeats

    torch.set_grad_enabled(False)
    settings = [  # (preset, batch, prompt length, gen_length, block_length, steps)
        ("tiny", 16, 24, 32, 16, 16),
        ("bench-60m", 2, 32, 64, 32, 32),
    ]
    tokenizer = M.build_tiny_tokenizer()
    print(f"{'model':>10} {'params':>8} {'B':>3} {'Lp':>4} {'gen':>4} {'steps':>5} | {'sampler s':>9} "
          f"{'forwards s':>10} {'sampler/fwd':>11} | {'tok/s':>8}")
    for preset, B, Lp, gen_length, block_length, steps in settings:
        model = M.build_model(preset, tokenizer if preset == "tiny" else None).eval()
        mask_id = model.cfg.mask_token_id
        prompt = torch.randint(0, model.cfg.vocab_size - 2, (B, Lp), generator=torch.Generator().manual_seed(0))
        full = torch.randint(0, model.cfg.vocab_size - 2, (B, Lp + gen_length))
        repeats = 1 if preset != "tiny" else 3
        t_sampler = time_it(lambda: generate(model, prompt, steps, gen_length, block_length, 0.9,
                                             mask_id=mask_id, generator=torch.Generator().manual_seed(0)), repeats)
        block = slice(Lp, Lp + block_length)  # the sampler's forwards return one block's logits
        t_forward = time_it(lambda: [model(full, None, block) for _ in range(steps)], repeats)
        print(f"{preset:>10} {M.num_parameters(model) / 1e6:>7.1f}M {B:>3} {Lp:>4} {gen_length:>4} {steps:>5} | "
              f"{t_sampler:>9.3f} {t_forward:>10.3f} {t_sampler / t_forward:>11.2f} | {B * gen_length / t_sampler:>8.1f}")


# -----------------------------------------------------------------------------
# CLI

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Sample from a dLLM checkpoint, or benchmark the sampler.")
    parser.add_argument("--model", help="checkpoint folder (LLaDA's layout or a LoRA adapter folder)")
    parser.add_argument("--prompt", help="the user message; the chat template is applied")
    parser.add_argument("--prefill", default="", help="text appended after the assistant header (d1 eval: <reasoning>)")
    parser.add_argument("--gen-length", type=int, default=128, help="tokens to generate")
    parser.add_argument("--block-length", type=int, default=32, help="tokens per semi-autoregressive block")
    parser.add_argument("--steps", type=int, default=64, help="diffusion steps in total (split over blocks)")
    parser.add_argument("--temperature", type=float, default=0.0, help="Gumbel noise scale; 0 = greedy")
    parser.add_argument("--cfg-scale", type=float, default=0.0, help="classifier-free guidance scale")
    parser.add_argument("--remasking", default="low_confidence", choices=["low_confidence", "random"],
                        help="which masked positions to commit first")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Gumbel noise")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--bench", action="store_true", help="time the sampler against its bare forward passes")
    args = parser.parse_args()
    if args.bench:
        bench(args)
        raise SystemExit(0)
    if not args.model or args.prompt is None:
        parser.error("--model and --prompt are required (or --bench)")
    import model as M

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = M.load_model(args.model, args.device, dtype).eval()
    tokenizer = M.load_tokenizer(args.model)
    prompt = M.encode_prompt(tokenizer, [{"role": "user", "content": args.prompt.replace("\\n", "\n")}], args.prefill)
    prompt_ids = torch.tensor([prompt], device=args.device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device.startswith("cuda")):
        out = generate(model, prompt_ids, args.steps, args.gen_length, args.block_length, args.temperature,
                       args.cfg_scale, args.remasking, model.cfg.mask_token_id,
                       generator=torch.Generator(args.device).manual_seed(args.seed))
    print(completion_text(tokenizer, out[0, prompt_ids.shape[1]:], M.stop_token_ids(tokenizer)))
