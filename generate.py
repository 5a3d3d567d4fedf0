"""
The sampler: reverse diffusion with low-confidence remasking, decoded in semi-autoregressive blocks
(LLaDA, Nie et al. 2025, Sec. 2.4 and Appendix B). GRPO's rollouts, evaluation and this CLI all call
the one `generate()` below, which checks its arguments and runs `llada_generate`, this pseudocode, or with
any of the fast sampler's options (Fast-dLLM: key/value cache, threshold decoding) `fast_generate`.

    x = prompt ++ [MASK] * gen_length                            (or prompt ++ canvas: infilling)
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
    python generate.py --model out/sft --task tiny_sudoku --prompt "1024\\n0230\\n3002\\n2043"  # fills 0s
    python generate.py --model checkpoints/LLaDA-8B-Instruct --prompt "What is 12 * 7?" --gen-length 128

The fast sampler's modes side by side: `python -m bench.sampler --model out/sft out/grpo` (bench/sampler.py).
"""

import argparse
import itertools

import torch
import torch.nn.functional as F

import checkpoint as C
import data


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


# -----------------------------------------------------------------------------
# LLaDA's sampler, the pseudocode above


def initial_sequence(prompt_ids, gen_length, mask_id, canvas):
    """x (B, Lp + gen_length) = prompt ++ [MASK] * gen_length, or prompt ++ canvas (infilling: the canvas's
    tokens are kept and only its [MASK]s are sampled)."""
    B, Lp = prompt_ids.shape
    x = torch.full((B, Lp + gen_length), mask_id, dtype=torch.long, device=prompt_ids.device)
    x[:, :Lp] = prompt_ids
    if canvas is not None:
        x[:, Lp:] = canvas
    return x


def sequence_attention_mask(attention_mask, gen_length, cfg_scale):
    """The prompt's attention mask (B, Lp) extended over the completion, whose positions are all real, and
    doubled for cfg's unconditional rows; None stays None (every position attends everywhere)."""
    if attention_mask is None:
        return None
    B = len(attention_mask)
    ones = torch.ones(B, gen_length, dtype=attention_mask.dtype, device=attention_mask.device)
    attention_mask = torch.cat([attention_mask, ones], dim=1)
    return attention_mask.repeat(2, 1) if cfg_scale > 0 else attention_mask


def unconditional(x, prompt_length, mask_id):
    """x with its prompt masked: the rows of classifier-free guidance's unconditional pass."""
    x = x.clone()
    x[:, :prompt_length] = mask_id
    return x


def guided(logits, cfg_scale):
    """Classifier-free guidance over a batch of conditional rows followed by their unconditional copies."""
    cond_logits, uncond_logits = logits.chunk(2)
    return uncond_logits + (cfg_scale + 1) * (cond_logits - uncond_logits)


def commit_most_confident(block, x0, confidence, k):
    """block (rows, block_length) with the k[b] most confident positions of each row b set to x0's tokens;
    with no loop over rows: the top max(k) positions of every row, of which row b keeps its first k[b]."""
    kmax = int(k.max())
    top = confidence.topk(kmax, dim=-1).indices  # (rows, kmax)
    keep = torch.arange(kmax, device=k.device)[None, :] < k[:, None]
    commit = torch.zeros_like(x0, dtype=torch.bool).scatter_(1, top, keep)
    return torch.where(commit, x0, block)


def record_commits(unmask_step, rows, offset, masked, block, mask_id, step):
    """unmask_step[rows] (B, gen_length) set to `step` at the block's positions (from `offset` in the
    completion) that were masked before this step (masked) and are not now (block, the rows' block after the
    commit): d2-StepMerge's trajectory (Wang et al. 2025, d2; d2StepMergeTrainer.generate, its
    diffu_grpo_trainer.py L871-879) kept as one global step per token. A sampler never changes a committed
    token, so the state after s steps is every position whose step is <= s."""
    span = slice(offset, offset + block.shape[1])
    unmask_step[rows, span] = torch.where(masked & (block != mask_id), step, unmask_step[rows, span])


SAMPLER_CHUNK_ELEMENTS = 2**27  # float64 numbers (1 GiB) of the samplers' work on the logits at a time


def float64_chunks(logits, mask_id, index=None):
    """The rows logits[index] (every row when index is None) of logits (N, V), in float64 chunks of at most
    SAMPLER_CHUNK_ELEMENTS numbers (at least one row), [MASK] at -inf: yields (span, chunk), span a slice of
    the selected rows and chunk their (span, V) logits. Every operation of the samplers on a chunk is row by
    row, so the tokens do not depend on the chunking; at evaluation's batch 64 x block 32 x 126k vocabulary
    one float64 copy of all the rows would be 1.9 GiB."""
    n = len(logits) if index is None else len(index)
    step = max(1, SAMPLER_CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    for start in range(0, n, step):
        span = slice(start, start + step)
        chunk = (logits[span] if index is None else logits[index[span]]).double()
        chunk[:, mask_id] = -torch.inf  # never commit [MASK]: the position would stay masked for good
        yield span, chunk


def sample_chunks(logits, mask_id, index, scored, draw):
    """x0 (N,) of the rows logits[index] (all rows when index is None) of logits (N_all, V), drawn chunk by
    float64 chunk by draw(span, chunk) -> tokens, and when scored their probability softmax(logits)[x0] (N,)
    (else None)."""
    n = len(logits) if index is None else len(index)
    sampled = torch.empty(n, dtype=torch.long, device=logits.device)
    probability = torch.empty(n, dtype=torch.float64, device=logits.device) if scored else None
    for span, chunk in float64_chunks(logits, mask_id, index):  # (span, V) float64
        sampled[span] = draw(span, chunk)
        if scored:
            probability[span] = F.softmax(chunk, dim=-1).gather(-1, sampled[span, None]).squeeze(-1)
    return sampled, probability


def gumbel_max_step(logits, masked, mask_id, temperature, generator, scored):
    """One step of LLaDA's sampler on logits (B, block_length, V) at its masked positions (B, block_length):
    x0 = argmax(logits + temperature * Gumbel) and, when scored, its probability softmax(logits)[x0], both
    (N,) over the N masked positions (None when not scored). The noise is drawn for every position of the
    block at once, as d1 draws it (the same tokens); the rest of the float64 work runs in chunks of rows."""
    B, block_length, V = logits.shape
    logits = logits.flatten(0, 1)  # (B * block_length, V)
    index = masked.flatten().nonzero().squeeze(1)  # (N,) the masked positions, in logits[masked]'s order
    if temperature > 0:
        u = torch.rand((B, block_length, V), dtype=torch.float64, device=logits.device,
                       generator=generator).flatten(0, 1)  # (B * block_length, V)

    def draw(span, chunk):
        if temperature == 0:
            return chunk.argmax(dim=-1)
        gumbel = -torch.log(-torch.log(u[index[span]].clamp_min(1e-300)))
        return (chunk + temperature * gumbel).argmax(dim=-1)

    return sample_chunks(logits, mask_id, index, scored, draw)


@torch.no_grad()
def llada_generate(model, prompt_ids, steps, gen_length, block_length, temperature=0.0, cfg_scale=0.0,
                   remasking="low_confidence", mask_id=126336, attention_mask=None, generator=None,
                   canvas=None, unmask_step=None):
    """LLaDA's sampler, the pseudocode above, on a batch of independent rows, with left padding under
    attention_mask, an infilling canvas and float64 Gumbel noise. Arguments as generate's, which checks them;
    returns the (B, Lp + gen_length) tokens. Every row runs in every step's pass, the LM head over the
    block. unmask_step (B, gen_length), optional, receives each position's commit step (record_commits)."""
    B, Lp = prompt_ids.shape
    x = initial_sequence(prompt_ids, gen_length, mask_id, canvas)  # prompt ++ [MASK]s, or prompt ++ canvas
    attention_mask = sequence_attention_mask(attention_mask, gen_length, cfg_scale)
    steps_per_block = steps // (gen_length // block_length)
    for block, start in enumerate(range(Lp, Lp + gen_length, block_length)):
        end = start + block_length
        transfers = num_transfer_tokens(x[:, start:end] == mask_id, steps_per_block)  # (B, steps_per_block)
        for i, k in enumerate(transfers.T):  # (B,) tokens each row commits at step i (skipped ones count)
            if not k.any():  # every row's block has fewer masks than steps: no pass, no noise drawn
                continue
            masked = x[:, start:end] == mask_id  # (B, block_length)
            inputs = x if cfg_scale == 0 else torch.cat([x, unconditional(x, Lp, mask_id)])
            logits = model(inputs, attention_mask, slice(start, end))  # (B or 2B, block_length, V)
            if cfg_scale > 0:
                logits = guided(logits, cfg_scale)
            # only the masked positions are sampled and scored (the sampled token's probability)
            sampled, probability = gumbel_max_step(logits, masked, mask_id, temperature, generator,
                                                   remasking == "low_confidence")
            x0 = torch.zeros_like(masked, dtype=torch.long)  # (B, block_length); unmasked ones never commit
            x0[masked] = sampled
            if remasking == "low_confidence":
                confidence = torch.full(masked.shape, -torch.inf, dtype=torch.float64, device=x.device)
                confidence[masked] = probability
            else:
                confidence = torch.rand((B, block_length), dtype=torch.float64, device=x.device,
                                        generator=generator)
                confidence = torch.where(masked, confidence, -torch.inf)
            x[:, start:end] = commit_most_confident(x[:, start:end], x0, confidence, k)
            if unmask_step is not None:
                record_commits(unmask_step, slice(None), start - Lp, masked, x[:, start:end], mask_id,
                               block * steps_per_block + i + 1)
    return x


# -----------------------------------------------------------------------------
# The fast sampler (Fast-dLLM)


def inverse_cdf_sample(probs, u):
    """One token per row of probs (N, V), non-negative: the first whose cumulative probability reaches
    u * total, u (N, 1) in (0, 1]. A draw from probs / total with one uniform number (Gumbel-max needs one per
    token); never a zero-probability token (u > 0), never past the last token (u <= 1)."""
    cdf = probs.cumsum(dim=-1)
    return torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(1)


def inverse_cdf_step(logits, mask_id, temperature, generator, scored):
    """One step of the fast sampler on logits (N, V) of still-masked positions: x0 drawn from
    softmax(logits / temperature) with one uniform number per position (inverse CDF; argmax at temperature 0)
    and, when scored, its probability softmax(logits)[x0], both (N,) (None when not scored), the float64
    work in chunks of rows. The same distribution as Gumbel-max, from one number per position, u in (0, 1]."""
    if temperature > 0:
        u = 1 - torch.rand((len(logits), 1), dtype=torch.float64, device=logits.device,
                           generator=generator)  # (N, 1), drawn for all the rows at once

    def draw(span, chunk):
        if temperature == 0:
            return chunk.argmax(dim=-1)
        return inverse_cdf_sample(F.softmax(chunk / temperature, dim=-1), u[span])

    return sample_chunks(logits, mask_id, None, scored, draw)


@torch.no_grad()
def fast_generate(model, prompt_ids, steps, gen_length, block_length, temperature=0.0, cfg_scale=0.0,
                  remasking="low_confidence", mask_id=126336, attention_mask=None, generator=None,
                  canvas=None, cache="none", threshold=None, unmask_step=None):
    """The fast sampler (Fast-dLLM), LLaDA's with the options generate's docstring describes: a prefix or dual
    key/value cache refreshed at every block's first pass, threshold decoding, a pass over only the rows that
    commit something, the LM head over the block's still-masked positions only, and at temperature > 0 one
    uniform number per position (inverse CDF) instead of Gumbel noise per vocabulary entry. Arguments as
    generate's, which checks them; returns the (B, Lp + gen_length) tokens. unmask_step (B, gen_length),
    optional (without threshold: its steps are fixed), receives each position's commit step."""
    B, Lp = prompt_ids.shape
    x = initial_sequence(prompt_ids, gen_length, mask_id, canvas)
    attention_mask = sequence_attention_mask(attention_mask, gen_length, cfg_scale)
    steps_per_block = steps // (gen_length // block_length)
    for block, start in enumerate(range(Lp, Lp + gen_length, block_length)):
        end = start + block_length
        transfers = num_transfer_tokens(x[:, start:end] == mask_id, steps_per_block)  # (B, steps_per_block)
        # with a cache, the block's first pass runs the whole sequence, and the later ones run only these
        queries = slice(start, None) if cache == "prefix" else slice(start, end)
        past_kv, cached_rows = None, None
        for i in itertools.count():
            if threshold is None and i == steps_per_block:
                break
            masked = x[:, start:end] == mask_id  # (B, block_length)
            active = masked.any(dim=1) if threshold is not None else transfers[:, i] > 0  # (B,)
            if not active.any():  # the block is done: a row's count of tokens to commit never grows
                break
            rows = active.nonzero().squeeze(1)  # a row inactive now stays so for the rest of the block
            both = torch.cat([rows, rows + B]) if cfg_scale > 0 else rows  # row + B: its unconditional copy
            masked = masked[rows]  # (rows, block_length)
            # only the block's still-masked positions can be committed: the LM head runs over those alone
            positions = torch.zeros(len(rows), x.shape[1], dtype=torch.bool, device=x.device)
            positions[:, start:end] = masked
            inputs = x[rows]
            if cfg_scale > 0:
                inputs = torch.cat([inputs, unconditional(inputs, Lp, mask_id)])
                positions = positions.repeat(2, 1)
            mask_rows = None if attention_mask is None else attention_mask[both]
            if cache == "none":
                logits = model(inputs, mask_rows, positions)
            elif past_kv is None:  # the block's first pass: the whole sequence, and every layer's keys/values
                logits, past_kv = model(inputs, mask_rows, positions, return_kv=True)
                cached_rows = both
            else:
                if len(both) < len(cached_rows):  # rows whose block is done leave the cache
                    keep = torch.isin(cached_rows, both)
                    for layer in range(len(past_kv)):  # in place: one layer held twice at most
                        past_kv[layer] = tuple(cached[keep] for cached in past_kv[layer])
                    cached_rows = both
                logits = model(inputs, mask_rows, positions, past_kv=past_kv, queries=queries)
            if cfg_scale > 0:
                logits = guided(logits, cfg_scale)  # (masked positions of the rows, V)
            sampled, probability = inverse_cdf_step(logits, mask_id, temperature, generator,
                                                    remasking == "low_confidence")
            x0 = torch.zeros_like(masked, dtype=torch.long)  # (rows, block_length); unmasked never commit
            x0[masked] = sampled
            if remasking == "low_confidence":
                confidence = torch.full(masked.shape, -torch.inf, dtype=torch.float64, device=x.device)
                confidence[masked] = probability
            else:  # drawn for every row, as LLaDA's sampler draws it
                confidence = torch.rand((B, block_length), dtype=torch.float64, device=x.device,
                                        generator=generator)[rows]
                confidence = torch.where(masked, confidence, -torch.inf)
            if threshold is None:
                k = transfers[rows, i]
            else:  # every masked position at least tau confident, and at least one (each row here has one)
                k = (confidence >= threshold).sum(dim=-1).clamp(min=1)
            x[rows, start:end] = commit_most_confident(x[rows, start:end], x0, confidence, k)
            if unmask_step is not None:  # step i of the block whether or not every row ran in it
                record_commits(unmask_step, rows, start - Lp, masked, x[rows, start:end], mask_id,
                               block * steps_per_block + i + 1)
    return x


# -----------------------------------------------------------------------------
# generate(): checks the arguments, picks the sampler


def counting_passes(model, stats, cfg_scale):
    """model, adding each call to stats["forward_passes"] and the rows it ran to stats["row_forward_passes"]
    (a row's conditional and unconditional copies count once), so that neither sampler keeps books."""
    def counted(inputs, *args, **kwargs):
        stats["forward_passes"] += 1
        stats["row_forward_passes"] += len(inputs) // (2 if cfg_scale > 0 else 1)
        return model(inputs, *args, **kwargs)
    return counted


CACHE_MODES = ("none", "prefix", "dual")


@torch.no_grad()
def generate(model, prompt_ids, steps, gen_length, block_length, temperature=0.0, cfg_scale=0.0,
             remasking="low_confidence", mask_id=126336, attention_mask=None, generator=None, canvas=None,
             cache="none", threshold=None, stats=None, record=None):
    """Sample gen_length tokens after prompt_ids (B, Lp). Returns the (B, Lp + gen_length) tokens.

    Rows of the batch are independent (at temperature 0; at T > 0 they share the generator's stream).
    Sampling noise (Gumbel; in the fast modes one uniform number per position) is drawn in float64 from
    `generator` when given: low-precision noise rounds away the tails, sampling at a lower temperature than
    asked (the README's table of differences from d1). attention_mask (B, Lp) marks real prompt tokens
    when prompts are left-padded (None: every position attends everywhere, as LLaDA and d1 do).
    canvas (B, gen_length), optional, is the completion to start from instead of all [MASK]: its non-mask
    tokens are kept and only its masked positions are sampled (infilling); each block's steps split the
    masks the block actually has.
    `model(x, attention_mask, positions)` returns the logits of the positions only (a slice, or in the fast
    modes a (B, L) bool mask of the block's still-masked positions), as model.LLaDA.

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
      every row at every step with a pass), the LM head runs over the block's still-masked positions only,
      and at temperature > 0 a position's token is drawn from softmax(logits / temperature) with one uniform
      number (inverse CDF), the same distribution as LLaDA's Gumbel-max, which needs a noise number per
      vocabulary entry.
    - stats, a dict, is filled (added to, so one dict can sum a loop of calls) with forward_passes (model
      calls; cfg's two halves are one call), row_forward_passes (the rows each call ran, summed) and
      generated_tokens (positions sampled): forward passes per generated token = row / generated.
    - record, a dict, receives record["unmask_step"] (B, gen_length) long: the global step (1-based, over all
      blocks: block * steps_per_block + i + 1) at which each position was committed, 0 for a canvas's given
      positions (d2-StepMerge's trajectory, objectives.py). Not with threshold: its steps are not fixed."""
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
    if record is not None and threshold is not None:
        raise ValueError("record: threshold decoding runs a varying number of steps per block, so a "
                         "position's step index is not defined; record without threshold")
    if stats is not None:
        B = len(prompt_ids)
        generated = B * gen_length if canvas is None else int((canvas == mask_id).expand(B, gen_length).sum())
        for key, value in (("forward_passes", 0), ("row_forward_passes", 0), ("generated_tokens", generated)):
            stats[key] = stats.get(key, 0) + value
        model = counting_passes(model, stats, cfg_scale)
    unmask_step = None
    if record is not None:
        unmask_step = record["unmask_step"] = torch.zeros(len(prompt_ids), gen_length, dtype=torch.long,
                                                          device=prompt_ids.device)
    common = (model, prompt_ids, steps, gen_length, block_length, temperature, cfg_scale, remasking, mask_id,
              attention_mask, generator, canvas)
    # LLaDA's sampler stays the pseudocode above: every option beyond it (cache, threshold) is the fast one's
    if cache == "none" and threshold is None:
        return llada_generate(*common, unmask_step=unmask_step)
    return fast_generate(*common, cache=cache, threshold=threshold, unmask_step=unmask_step)


# -----------------------------------------------------------------------------
# From task records to samples: the path rollouts and evaluation share


@torch.no_grad()
def generate_records(model, tokenizer, records, sampler, *, mask_id, device, max_prompt_length=0,
                     add_special_tokens=False, batch_size=None, noise_seed=None, stats=None, record=None):
    """Each record's chat prompt encoded (its last max_prompt_length tokens when > 0, as TRL keeps them),
    left-padded over all records, its canvas when the task has one (infilling), then generate() on batches of
    batch_size rows (all at once by default), batch b's noise from data.generator(*noise_seed, b) (None: no
    generator). sampler: generate's steps, gen_length, block_length, temperature, cache and threshold.
    record, a dict: generate's record of every batch, concatenated (record["unmask_step"] (B, gen_length)).
    Returns (sequences (B, Lp + gen_length), prompt_mask (B, Lp) or None, canvas (B, gen_length) or None)."""
    rows = [data.encode_prompt(tokenizer, r["prompt"], r["prefill"], add_special_tokens)[-max_prompt_length:]
            for r in records]
    prompt_ids, prompt_mask = left_pad(rows, tokenizer.eos_token_id, device)
    canvases = [data.encode_canvas(tokenizer, r, sampler["gen_length"], mask_id) for r in records]
    canvas = None if canvases[0] is None else torch.tensor(canvases, device=device)
    batch_size = batch_size or len(records)
    outputs, batch_records = [], []
    for b in range(0, len(records), batch_size):
        batch = slice(b, b + batch_size)
        batch_records.append(None if record is None else {})
        outputs.append(generate(
            model, prompt_ids[batch], mask_id=mask_id, stats=stats, record=batch_records[-1],
            attention_mask=None if prompt_mask is None else prompt_mask[batch],
            canvas=None if canvas is None else canvas[batch],
            generator=None if noise_seed is None else data.generator(*noise_seed, b, device=device),
            **sampler))
    if record is not None:
        record.update({key: torch.cat([r[key] for r in batch_records]) for key in batch_records[0]})
    return torch.cat(outputs), prompt_mask, canvas


# -----------------------------------------------------------------------------
# Reading the samples


def forward_passes_per_token(stats):
    """Forward passes per generated token from generate's `stats`: each pass costs every row of its batch."""
    return stats["row_forward_passes"] / max(stats["generated_tokens"], 1)


def read_completions(tokenizer, completion_ids, canvas, mask_id):
    """How d1 reads sampled completions (N, gen_length): the mask (N, gen_length) of the tokens up to and
    including the first EOS, less the given tokens of an infilling canvas (the policy's actions are what it
    sampled), and the reward texts, each whole completion decoded with special tokens dropped."""
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
# CLI

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Sample from a dLLM checkpoint.")
    parser.add_argument("--model", help="checkpoint folder (LLaDA's layout or a LoRA adapter folder)")
    parser.add_argument("--prompt", help="the user message; the chat template is applied")
    parser.add_argument("--prefill", default="",
                        help="text appended after the assistant header (d1 eval: <reasoning>)")
    parser.add_argument("--task", default=None, choices=["tiny_sudoku"],
                        help="an infilling task: tiny_sudoku starts from the puzzle's answer grid with its "
                             "given cells written (the --prompt rows, 0 = blank) and fills the blanks, with "
                             "the task's lengths")
    parser.add_argument("--gen-length", type=int, default=None,
                        help="tokens to generate (default 128; the task's)")
    parser.add_argument("--block-length", type=int, default=None,
                        help="tokens per semi-autoregressive block (default 32)")
    parser.add_argument("--steps", type=int, default=None,
                        help="diffusion steps in total, split over blocks (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    parser.add_argument("--cfg-scale", type=float, default=0.0, help="classifier-free guidance scale")
    parser.add_argument("--remasking", default="low_confidence", choices=["low_confidence", "random"],
                        help="which masked positions to commit first")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda")
    args = parser.parse_args()
    if not args.model or args.prompt is None:
        parser.error("--model and --prompt are required")

    # the task's sampler lengths (tiny_sudoku: one block of 20, the grid and its EOS), else a chat answer's
    lengths = (data.generation_defaults(args.task) if args.task
               else {"gen_length": 128, "block_length": 32, "steps": 64})
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
