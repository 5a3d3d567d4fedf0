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
    python generate.py --model out/sft --task tiny_sudoku --prompt "1024\\n0230\\n3002\\n2043"   # fills the 0s
    python generate.py --model checkpoints/LLaDA-8B-Instruct --prompt "What is 12 * 7?" --gen-length 128
    python generate.py --bench --bench-model out/sft out/grpo    # the fast sampler's modes side by side
"""

import argparse
import itertools
import os
import time

import torch
import torch.nn.functional as F


def num_transfer_tokens(block_masked, steps):
    """How many tokens each step commits: the masked count of each row of the block split evenly over
    the steps, the remainder going to the earliest ones. block_masked (B, block_length) -> (B, steps)."""
    n = block_masked.sum(dim=1, keepdim=True)  # (B, 1)
    step = torch.arange(steps, device=n.device)[None, :]  # (1, steps)
    return n // steps + (step < n % steps).long()


def left_pad(prompts, pad_id, device):
    """(B, Lp) left-padded ids and the (B, Lp) 0/1 mask of real tokens (None when nothing is padded).
    RoPE depends only on relative positions, so with the padded keys masked a prompt's completion does
    not depend on the other prompts of its batch (d1 pads without a mask)."""
    length = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (length - len(p)) + p for p in prompts], device=device)
    if all(len(p) == length for p in prompts):
        return ids, None
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def inverse_cdf_sample(probs, u):
    """One token per row of probs (N, V), non-negative: the first whose cumulative probability reaches u * total,
    u (N, 1) in (0, 1]. A draw from probs / total with one uniform number (Gumbel-max needs one per token); never
    a zero-probability token (u > 0), never past the last token (u <= 1)."""
    cdf = probs.cumsum(dim=-1)
    return torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(1)


CACHE_MODES = ("none", "prefix", "dual")


@torch.no_grad()
def generate(model, prompt_ids, steps, gen_length, block_length, temperature=0.0, cfg_scale=0.0,
             remasking="low_confidence", mask_id=126336, attention_mask=None, generator=None, canvas=None,
             cache="none", threshold=None, stats=None):
    """Sample gen_length tokens after prompt_ids (B, Lp). Returns the (B, Lp + gen_length) tokens.

    Rows of the batch are independent (at temperature 0; at T > 0 they share the generator's stream). Sampling
    noise (Gumbel; in the fast modes one uniform number per position) is drawn in float64 from `generator` when
    given (d1 draws it in the model's dtype, bf16, in its rollouts and in float32 in evaluation): low-precision
    Gumbel noise rounds away the tails of the distribution, which samples at a lower temperature than asked.
    attention_mask (B, Lp) marks real prompt tokens when prompts are left-padded (None: every position attends
    everywhere, as LLaDA and d1 do). canvas (B, gen_length), optional, is the completion to start from instead of
    all [MASK]: its non-mask tokens are kept and only its masked positions are sampled (infilling); each block's
    steps split the masks the block actually has.
    `model(x, attention_mask, positions)` returns the logits of the positions only (a slice, or in the fast modes
    a (B, L) bool mask of the block's still-masked positions), as model.LLaDA.

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
    - with either option, a pass runs only the rows that commit something at that step (LLaDA's sampler runs
      every row at every step with a pass), the LM head runs over the block's still-masked positions only, and
      at temperature > 0 a position's token is drawn from softmax(logits / temperature) with one uniform number
      (inverse CDF), the same distribution as LLaDA's Gumbel-max, which needs a noise number per vocabulary entry.
    - stats, a dict, is filled (added to, so one dict can sum a loop of calls) with forward_passes (model
      calls; cfg's two halves are one call), row_forward_passes (the rows each call ran, summed) and
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

    # the fast sampler runs only the rows with something to commit; LLaDA's runs every row at every step
    fast = cache != "none" or threshold is not None
    for block in range(num_blocks):
        start, end = Lp + block * block_length, Lp + (block + 1) * block_length
        transfers = num_transfer_tokens(x[:, start:end] == mask_id, steps_per_block)  # (B, steps_per_block)
        # with a cache, the block's first pass runs the whole sequence, and the later ones run only these
        queries = slice(start, None) if cache == "prefix" else slice(start, end)
        past_kv, cached_rows = None, None
        for i in itertools.count():
            still_masked = x[:, start:end] == mask_id  # (B, block_length)
            if threshold is None:
                if i == steps_per_block:
                    break
                k = transfers[:, i]  # (B,) tokens each row commits at this step
                active = k > 0
            else:
                active = still_masked.any(dim=1)
            if not active.any():  # nothing to commit (a block with fewer masks than steps, or done): no pass
                if threshold is None:
                    continue
                break
            # a row inactive now stays so for the rest of the block (k never grows, masks never return)
            rows = active.nonzero().squeeze(1) if fast else None  # None: every row
            pick = (lambda t: t) if rows is None else (lambda t: t[rows])  # noqa: E731
            both = (lambda t: t) if rows is None else (lambda t: t[torch.cat([rows, rows + B])])  # noqa: E731
            masked = pick(still_masked)  # (rows, block_length)
            positions = slice(start, end)  # LLaDA's sampler: the LM head over the block
            if fast:  # only the block's still-masked positions can be committed: the LM head over those alone
                positions = torch.zeros(len(masked), x.shape[1], dtype=torch.bool, device=device)
                positions[:, start:end] = masked
                positions = positions.repeat(2, 1) if cfg_scale > 0 else positions
            inputs = pick(x)
            if cfg_scale > 0:  # one batched pass for the conditional and the unconditional (prompt masked) rows
                inputs = torch.cat([inputs, torch.where(pick(prompt_index), torch.full_like(inputs, mask_id), inputs)])
            mask_rows = None if attention_mask is None else (both if cfg_scale > 0 else pick)(attention_mask)
            if cache == "none":
                logits = model(inputs, mask_rows, positions)
            elif past_kv is None:  # the block's first pass: the whole sequence, and every layer's keys/values
                logits, past_kv = model(inputs, mask_rows, positions, return_kv=True)
                cached_rows = rows
            else:
                if len(rows) < len(cached_rows):  # rows whose block is done leave the cache
                    keep = torch.isin(cached_rows, rows)
                    keep = keep if cfg_scale == 0 else torch.cat([keep, keep])
                    past_kv = [(keys[keep], values[keep]) for keys, values in past_kv]
                    cached_rows = rows
                logits = model(inputs, mask_rows, positions, past_kv=past_kv, queries=queries)
            counts["forward_passes"] += 1
            counts["row_forward_passes"] += B if rows is None else len(rows)
            if cfg_scale > 0:
                cond_logits, uncond_logits = logits.chunk(2)
                logits = uncond_logits + (cfg_scale + 1) * (cond_logits - uncond_logits)
            # only the block's masked positions are sampled and scored (the fast modes' logits are those already)
            logits = (logits if fast else logits[masked]).double()  # (masked positions, V)
            logits[:, mask_id] = -torch.inf  # never commit [MASK]: the position would stay masked for good
            if temperature == 0:
                sampled = logits.argmax(dim=-1)
            elif fast:  # the same distribution from one uniform number per position, not one per vocabulary entry
                u = 1 - torch.rand((len(logits), 1), dtype=torch.float64, device=device, generator=generator)
                sampled = inverse_cdf_sample(F.softmax(logits / temperature, dim=-1), u)  # u in (0, 1]
            else:  # LLaDA's Gumbel-max, the noise drawn for every row and position as d1 draws it (the same tokens)
                u = torch.rand((B, block_length, logits.shape[-1]), dtype=torch.float64, device=device,
                               generator=generator)[masked]
                gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
                sampled = (logits + temperature * gumbel).argmax(dim=-1)
            x0 = torch.zeros_like(masked, dtype=torch.long)  # (rows, block_length); unmasked entries never commit
            x0[masked] = sampled
            if remasking == "low_confidence":
                confidence = torch.full(masked.shape, -torch.inf, dtype=torch.float64, device=device)
                confidence[masked] = F.softmax(logits, dim=-1).gather(-1, sampled[:, None]).squeeze(-1)
            else:
                confidence = pick(torch.rand((B, block_length), dtype=torch.float64, device=device, generator=generator))
                confidence = torch.where(masked, confidence, -torch.inf)
            if threshold is None:
                k = pick(k)
            else:  # every masked position at least tau confident, and at least one (every row here has a mask)
                k = (confidence >= threshold).sum(dim=-1).clamp(min=1)
            kmax = int(k.max())
            # commit the k_b most confident positions of each row b, with no loop over rows:
            # take the top max(k) and keep the first k_b of them
            top = confidence.topk(kmax, dim=-1).indices  # (rows, kmax)
            keep = torch.arange(kmax, device=device)[None, :] < k[:, None]
            commit = torch.zeros_like(x0, dtype=torch.bool)
            commit.scatter_(1, top, keep)
            if rows is None:
                x[:, start:end] = torch.where(commit, x0, x[:, start:end])
            else:
                x[rows, start:end] = torch.where(commit, x0, x[rows, start:end])
    if stats is not None:
        for key, value in counts.items():
            stats[key] = stats.get(key, 0) + value
    return x


def forward_passes_per_token(stats):
    """Forward passes per generated token from generate's `stats`: each pass costs every row of its batch."""
    return stats["row_forward_passes"] / max(stats["generated_tokens"], 1)


def read_completions(tokenizer, completion_ids, canvas, mask_id):
    """How d1 reads sampled completions (N, gen_length): the mask (N, gen_length) of the tokens up to and including
    the first EOS, less the given tokens of an infilling canvas (the policy's actions are what it sampled), and the
    reward texts, each whole completion decoded with special tokens dropped."""
    is_eos = completion_ids == tokenizer.eos_token_id
    completion_mask = (is_eos.cumsum(dim=1) - is_eos.long()) == 0  # no EOS strictly before
    if canvas is not None:
        completion_mask &= canvas == mask_id
    return completion_mask, tokenizer.batch_decode(completion_ids, skip_special_tokens=True)


def completion_text(tokenizer, completion_ids, stop_ids):
    """Decode a completion cut before its first stop token (EOS / end-of-turn)."""
    ids = completion_ids.tolist()
    for j, t in enumerate(ids):
        if t in stop_ids:
            ids = ids[:j]
            break
    return tokenizer.decode(ids, skip_special_tokens=False)


# -----------------------------------------------------------------------------
# The benchmark: the fast sampler's modes side by side, in one run

BENCH_THRESHOLD = 0.9  # Fast-dLLM's tau
# (a) speed at d1's rollout shape: batch, prompt length, gen_length, block_length, steps, temperature
# (batch 4, under d1's 6 rollouts per device, keeps the CPU run short)
BENCH_SPEED_SHAPE = (4, 200, 256, 32, 128, 0.9)
# (b) quality on a trained tiny_sudoku model, greedy, with several blocks per completion so that stale
# caches can matter (the answer is 19 characters + EOS)
BENCH_QUALITY_SHAPE = {"gen_length": 20, "block_length": 5, "steps": 20, "batch_size": 250}
BENCH_MODES = [(cache, threshold) for threshold in (None, BENCH_THRESHOLD) for cache in CACHE_MODES]


def mode_name(cache, threshold):
    return ("plain" if cache == "none" else cache) + ("" if threshold is None else f" + threshold {threshold}")


def same_token_share(tokenizer, texts, reference_texts, canvases, mask_id):
    """The share of sampled token positions where two lists of completions agree: positions up to the
    longer completion of each pair, less the given tokens of its canvas (canvases: lists of ids, [MASK]
    where the sampler fills in, or None)."""
    same = total = 0
    for text, reference, canvas in zip(texts, reference_texts, canvases):
        a, b = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in (text, reference))
        for j in range(max(len(a), len(b))):
            if canvas is None or j >= len(canvas) or canvas[j] == mask_id:
                same += j < min(len(a), len(b)) and a[j] == b[j]
                total += 1
    return same / max(total, 1)


@torch.no_grad()  # a context, not a global switch: tests call bench in process
def bench(args):
    """Prints one table: plain, prefix and dual cache, each without and with threshold decoding, on
    (a) a random ~60M model at d1's rollout shape (speed) and (b) each trained tiny_sudoku checkpoint of
    --bench-model (held-out accuracy and tokens identical to the plain sampler's)."""
    import checkpoint as C
    import data

    header = (f"{'workload':<30} {'sampler':<24} {'tok/s':>8} {'x plain':>8} {'fwd/token':>9} "
              f"{'accuracy':>8} {'same tokens':>11}")
    print(header + "\n" + "-" * len(header), flush=True)

    B, Lp, gen_length, block_length, steps, temperature = BENCH_SPEED_SHAPE
    model = C.build_model("bench-60m").eval()
    workload = f"(a) bench-60m random B{B} {Lp}+{gen_length}"
    prompt = torch.randint(0, model.cfg.vocab_size - 2, (B, Lp), generator=torch.Generator().manual_seed(0))
    model(prompt)  # warm-up
    plain = None
    for cache, threshold in BENCH_MODES:
        stats = {}
        t0 = time.perf_counter()
        generate(model, prompt, steps, gen_length, block_length, temperature, mask_id=model.cfg.mask_token_id,
                 generator=torch.Generator().manual_seed(0), cache=cache, threshold=threshold, stats=stats)
        tokens_per_s = B * gen_length / (time.perf_counter() - t0)
        plain = plain or tokens_per_s
        print(f"{workload:<30} {mode_name(cache, threshold):<24} {tokens_per_s:>8.1f} {tokens_per_s / plain:>8.2f} "
              f"{forward_passes_per_token(stats):>9.3f} {'-':>8} {'-':>11}", flush=True)

    if not args.bench_model:
        print("(b) skipped: pass --bench-model DIR [DIR ...], trained tiny_sudoku checkpoints (e.g. out/sft out/grpo)")
        return
    examples = data.test_examples("tiny_sudoku", "data/files")
    q = BENCH_QUALITY_SHAPE
    for path in args.bench_model:
        bench_quality(path, examples)
    print(f"(a) {steps} steps in blocks of {block_length}, temperature {temperature}; (b) gen_length "
          f"{q['gen_length']}, blocks of {q['block_length']}, {q['steps']} steps, greedy, batch {q['batch_size']}; "
          "fwd/token: forward passes x rows / generated tokens")


def bench_quality(path, examples):
    """The benchmark's workload (b) on one trained tiny_sudoku checkpoint: a row per sampler mode."""
    import checkpoint as C
    import data
    import evaluate

    model, tokenizer = C.load_model(path).eval(), C.load_tokenizer(path)
    q = BENCH_QUALITY_SHAPE
    workload = f"(b) {os.path.basename(os.path.normpath(path))} {len(examples)} held-out"
    canvases = [data.encode_canvas(tokenizer, e, q["gen_length"], model.cfg.mask_token_id) for e in examples]
    reference = None
    for cache, threshold in BENCH_MODES:
        result = evaluate.evaluate_examples(model, tokenizer, "tiny_sudoku", examples, progress=False, cache=cache,
                                            threshold=threshold, **q)
        reference = reference or result
        same = same_token_share(tokenizer, result["completions"], reference["completions"], canvases,
                                model.cfg.mask_token_id)
        print(f"{workload:<30} {mode_name(cache, threshold):<24} {result['tokens_per_s']:>8.1f} "
              f"{result['tokens_per_s'] / reference['tokens_per_s']:>8.2f} {result['forward_passes_per_token']:>9.3f} "
              f"{100 * result['accuracy']:>7.1f}% {100 * same:>10.1f}%", flush=True)


# -----------------------------------------------------------------------------
# CLI

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Sample from a dLLM checkpoint, or benchmark the sampler.")
    parser.add_argument("--model", help="checkpoint folder (LLaDA's layout or a LoRA adapter folder)")
    parser.add_argument("--prompt", help="the user message; the chat template is applied")
    parser.add_argument("--prefill", default="", help="text appended after the assistant header (d1 eval: <reasoning>)")
    parser.add_argument("--task", default=None, choices=["tiny_sudoku"],
                        help="an infilling task: tiny_sudoku starts from the puzzle's answer grid with its given cells "
                             "written (the --prompt rows, 0 = blank) and fills the blanks, with the task's lengths")
    parser.add_argument("--gen-length", type=int, default=None, help="tokens to generate (default 128; the task's)")
    parser.add_argument("--block-length", type=int, default=None, help="tokens per semi-autoregressive block (default 32)")
    parser.add_argument("--steps", type=int, default=None, help="diffusion steps in total, split over blocks (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    parser.add_argument("--cfg-scale", type=float, default=0.0, help="classifier-free guidance scale")
    parser.add_argument("--remasking", default="low_confidence", choices=["low_confidence", "random"],
                        help="which masked positions to commit first")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--bench", action="store_true",
                        help="benchmark plain / prefix / dual cache, without and with threshold decoding")
    parser.add_argument("--bench-model", nargs="+", default=[], metavar="DIR",
                        help="trained tiny_sudoku checkpoints for the benchmark's quality workload (b), one part "
                             "of the table each")
    args = parser.parse_args()
    for path in args.bench_model:
        if not args.bench or not os.path.isdir(path):
            parser.error(f"--bench-model {path!r}: checkpoint folders, with --bench")
    if args.bench:
        bench(args)
        raise SystemExit(0)
    if not args.model or args.prompt is None:
        parser.error("--model and --prompt are required (or --bench)")
    import checkpoint as C
    import data

    # the task's sampler lengths (tiny_sudoku: one block of 20, the grid and its EOS), else a chat answer's
    lengths = data.generation_defaults(args.task) if args.task else {"gen_length": 128, "block_length": 32, "steps": 64}
    gen_length = args.gen_length or lengths["gen_length"]
    block_length = args.block_length or min(lengths["block_length"], gen_length)
    steps = args.steps or lengths["steps"]
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = C.load_model(args.model, args.device, dtype).eval()
    tokenizer = C.load_tokenizer(args.model)
    user = args.prompt.replace("\\n", "\n")
    prompt = data.encode_prompt(tokenizer, [{"role": "user", "content": user}], args.prefill)
    prompt_ids = torch.tensor([prompt], device=args.device)
    canvas = None
    if args.task == "tiny_sudoku":
        try:
            ids = data.encode_canvas(tokenizer, {"canvas": data.tiny_sudoku_canvas(user)}, gen_length,
                                     model.cfg.mask_token_id)
        except ValueError as err:
            raise SystemExit(f"--task tiny_sudoku: {err}") from None
        canvas = torch.tensor([ids], device=args.device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device.startswith("cuda")):
        out = generate(model, prompt_ids, steps, gen_length, block_length, args.temperature,
                       args.cfg_scale, args.remasking, model.cfg.mask_token_id, canvas=canvas,
                       generator=torch.Generator(args.device).manual_seed(args.seed))
    print(completion_text(tokenizer, out[0, prompt_ids.shape[1]:], C.stop_token_ids(tokenizer)))
