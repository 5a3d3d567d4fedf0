"""
Guards the fast sampler: key/value caching in model.LLaDA's forward and generate's cache="prefix" | "dual"
and threshold (confidence-threshold parallel decoding, Fast-dLLM).

- the cached forward's mechanics are exact: with a cache computed from the current sequence, the logits
  of the queried positions (and the keys/values returned) equal the full forward's to 1e-5, with padded
  prompts under an attention mask, grouped-query heads and LoRA adapters; its argument errors;
- cache="none", threshold=None is the plain sampler: the same tokens as the slow reference sampler of
  test_generate.py;
- with one step per block every step is a block's first (full) pass, so the caches give the plain tokens
  exactly, with cfg and a canvas too; otherwise they give complete completions that keep the canvas;
- threshold: each step commits every position at least tau confident and at least one (counted with
  mocks of known confidence), the forward passes vary with confidence, and a row's tokens do not depend on
  the batch it is in, in every cache mode and with cfg, although rows finish their blocks at different
  steps (finished rows leave the pass and its cache);
- `stats` counts forward passes and generated tokens; argument errors;
- `python -m bench.sampler` (shrunk): one table, a row per mode and workload; it leaves autograd on.
"""

import pytest
import torch
from test_generate import (FixedLogitsModel, at_positions, padded_prompts, random_prompts, reference_generate,
                           sampler_model)

import checkpoint as C
import generate as G
import model as M
from bench import sampler

MODES = ("none", "prefix", "dual")


def confident_model(make_model, seed, sharpness=5.0):
    """A random model with a scaled-up LM head: softmax confidences spread from ~0.2 to 1, so that a
    threshold of 0.9 commits several positions at some steps and one at others."""
    model = make_model(seed=seed, init_std=0.3)
    with torch.no_grad():
        model.ff_out.weight *= sharpness
    return model


def max_kv_difference(a, b):
    return max(float((x - y).abs().max()) for layer_a, layer_b in zip(a, b) for x, y in zip(layer_a, layer_b))


# -----------------------------------------------------------------------------
# The model's cached forward


@pytest.mark.parametrize("variant", ["padded", "lora"])
def test_cached_forward_equals_the_full_forward(make_model, variant):
    """Queries = the block and everything after it (prefix cache), the block alone (dual cache), or a slice
    in the middle: with past keys/values of the current sequence, the logits are the full forward's.
    The tiny config has 4 query heads over 2 key/value heads (grouped-query)."""
    model = make_model(seed=1)
    assert model.cfg.n_kv_heads < model.cfg.n_heads
    if variant == "lora":
        M.add_lora(model, r=4, alpha=8, seed=0)
        with torch.no_grad():  # B starts at zero: make the adapters change the output
            for _, m in M.lora_modules(model):
                m.lora_B.normal_(0, 0.2)
    x = random_prompts(model, 3, 24, seed=2)
    x[:, 14:] = model.cfg.mask_token_id
    attention_mask = torch.ones_like(x)
    attention_mask[0, :5] = 0  # left padding of different lengths
    attention_mask[2, :2] = 0
    with torch.no_grad():
        full = model(x, attention_mask)  # (B, L, V)
        block_logits, kv = model(x, attention_mask, slice(10, 14), return_kv=True)
        assert torch.allclose(block_logits, full[:, 10:14], atol=1e-5, rtol=0)
        for queries, positions in ((slice(10, None), slice(10, 14)), (slice(10, 14), slice(10, 14)),
                                   (slice(6, 18), slice(8, 18)), (slice(10, 14), slice(None))):
            logits, new_kv = model(x, attention_mask, positions, past_kv=kv, queries=queries, return_kv=True)
            expected = full[:, positions] if positions != slice(None) else full[:, queries]
            assert logits.shape == expected.shape
            assert torch.allclose(logits, expected, atol=1e-5, rtol=0), \
                (queries, (logits - expected).abs().max())
            assert max_kv_difference(new_kv, kv) < 1e-5
        # positions as a bool mask (the fast sampler's still-masked positions): their logits, row by row
        chosen = torch.zeros_like(x, dtype=torch.bool)
        chosen[0, 12] = chosen[2, 10:14:2] = True
        for past_kv, queries in ((None, slice(None)), (kv, slice(10, 14)), (kv, slice(10, None))):
            logits = model(x, attention_mask, chosen, past_kv=past_kv, queries=queries)
            assert logits.shape == (3, model.cfg.vocab_size)
            assert torch.allclose(logits, full[chosen], atol=1e-5, rtol=0), queries
        k, v = kv[0]
        assert k.shape == (3, model.cfg.n_kv_heads, 24, model.cfg.head_dim) and v.shape == k.shape
        # a stale cache is what the sampler approximates with: it changes the result
        stale = [(k.roll(1, dims=2), v.roll(1, dims=2)) for k, v in kv]
        assert not torch.allclose(model(x, attention_mask, slice(10, 14), past_kv=stale,
                                        queries=slice(10, 14)),
                                  full[:, 10:14], atol=1e-3)


def test_cached_forward_argument_errors(make_model):
    model = make_model(seed=0)
    x = random_prompts(model, 1, 8, seed=0)
    with torch.no_grad():
        _, kv = model(x, return_kv=True)
        with pytest.raises(ValueError, match="need past_kv"):
            model(x, None, slice(2, 4), queries=slice(2, 4), return_kv=True)
        with pytest.raises(ValueError, match="must lie within queries"):
            model(x, None, slice(0, 4), past_kv=kv, queries=slice(2, 6))
        outside = torch.zeros_like(x, dtype=torch.bool)
        outside[0, 1] = True
        with pytest.raises(ValueError, match="mask must lie within queries"):
            model(x, None, outside, past_kv=kv, queries=slice(2, 6))


# -----------------------------------------------------------------------------
# The sampler with caches


@pytest.mark.parametrize("steps,gen_length,block_length,cfg_scale", [(8, 16, 8, 0.0), (5, 8, 8, 1.0)])
def test_no_cache_no_threshold_equals_slow_reference(make_model, steps, gen_length, block_length, cfg_scale):
    model = sampler_model(make_model, seed=steps)
    mask_id = model.cfg.mask_token_id
    prompts = random_prompts(model, 2, 4, seed=1)
    out = G.generate(model, prompts, steps, gen_length, block_length, cfg_scale=cfg_scale, mask_id=mask_id,
                     cache="none", threshold=None)
    assert torch.equal(out, reference_generate(model, prompts, steps, gen_length, block_length, cfg_scale,
                                               mask_id))


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_caches_with_one_step_per_block_are_exact(make_model, cfg_scale):
    """One step per block: every step is a block's first pass, a full forward, so the caches change nothing;
    with a canvas and padded prompts too. With more steps per block the tokens are complete and the given
    canvas tokens are kept, and the forward passes are as many as the plain sampler's, over fewer rows."""
    model = confident_model(make_model, seed=3)
    mask_id = model.cfg.mask_token_id
    prompts, attention_mask = padded_prompts(model, 3, 5, seed=4, row=1, pads=2)
    canvas = random_prompts(model, 3, 12, seed=5)
    canvas[:, [0, 2, 3, 5, 8, 9, 11]] = mask_id
    canvas[2, :] = mask_id
    for options in ({}, {"canvas": canvas}):
        plain = G.generate(model, prompts, 3, 12, 4, cfg_scale=cfg_scale, mask_id=mask_id,
                           attention_mask=attention_mask, **options)
        plain_stats = {}
        G.generate(model, prompts, 12, 12, 4, cfg_scale=cfg_scale, mask_id=mask_id,
                                attention_mask=attention_mask, stats=plain_stats, **options)
        for cache in ("prefix", "dual"):
            out = G.generate(model, prompts, 3, 12, 4, cfg_scale=cfg_scale, mask_id=mask_id,
                             attention_mask=attention_mask, cache=cache, **options)
            assert torch.equal(out, plain), (cache, options.keys())
            stats = {}
            many = G.generate(model, prompts, 12, 12, 4, cfg_scale=cfg_scale, mask_id=mask_id,
                              attention_mask=attention_mask, cache=cache, stats=stats, **options)
            assert not (many == mask_id).any() and torch.equal(many[:, :5], prompts)
            if "canvas" in options:
                given = canvas != mask_id
                assert torch.equal(many[:, 5:][given], canvas[given])
            # the same passes; each runs only the rows that commit something (one token each here)
            assert stats["forward_passes"] == plain_stats["forward_passes"]
            assert (stats["row_forward_passes"] == stats["generated_tokens"]
                    <= plain_stats["row_forward_passes"])


# -----------------------------------------------------------------------------
# Threshold decoding


class CountingModel(torch.nn.Module):
    """Wraps a model and records, per forward pass, how many positions of the sampled block were masked."""

    def __init__(self, inner, mask_id):
        super().__init__()
        self.inner, self.mask_id, self.masked = inner, mask_id, []

    def forward(self, input_ids, attention_mask=None, positions=slice(None)):
        self.masked.append(int((at_positions(input_ids, positions) == self.mask_id).sum()))
        return self.inner(input_ids, attention_mask, positions)


@pytest.mark.parametrize("peak,expected_passes", [(0.0, 8), (12.0, 2)])
def test_threshold_commits_at_least_one_and_all_confident(peak, expected_passes):
    """Flat logits (confidence 1/4 everywhere, under tau): one token per step, so 8 passes for 8 tokens.
    One token at logit 12 (confidence ~1): the whole block in one step, one pass per block."""
    logits = torch.zeros(5)
    logits[1] = peak
    logits[4] = -30.0  # the mask token
    model = CountingModel(FixedLogitsModel(logits), mask_id=4)
    stats = {}
    out = G.generate(model, torch.zeros(1, 2, dtype=torch.long), 2, 8, 4, mask_id=4, threshold=0.9,
                     stats=stats)
    assert not (out == 4).any()
    assert stats["forward_passes"] == len(model.masked) == expected_passes
    assert stats == {"forward_passes": expected_passes, "row_forward_passes": expected_passes,
                     "generated_tokens": 8}
    if peak == 0.0:  # each pass saw one fewer mask in its block
        assert model.masked == [4, 3, 2, 1, 4, 3, 2, 1]


@pytest.mark.parametrize("cache", MODES)
@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_threshold_rows_are_independent_of_their_batch(make_model, cache, cfg_scale):
    """Rows finish their blocks at different steps (the batch runs more passes than some of its rows
    alone, and finished rows leave the pass and its cache); a row's tokens are the same alone and in the
    batch."""
    model = confident_model(make_model, seed=7)
    mask_id = model.cfg.mask_token_id
    prompts = random_prompts(model, 4, 5, seed=3)
    stats = {}
    batch = G.generate(model, prompts, 6, 12, 4, cfg_scale=cfg_scale, mask_id=mask_id, cache=cache,
                       threshold=0.9, stats=stats)
    assert not (batch == mask_id).any()
    alone_passes = []
    for row in range(4):
        row_stats = {}
        alone = G.generate(model, prompts[row:row + 1], 6, 12, 4, cfg_scale=cfg_scale, mask_id=mask_id,
                           cache=cache, threshold=0.9, stats=row_stats)
        assert torch.equal(alone[0], batch[row]), row
        alone_passes.append(row_stats["forward_passes"])
    # each block takes as many passes as its slowest row
    assert stats["forward_passes"] >= max(alone_passes) > min(alone_passes)
    assert stats["row_forward_passes"] == sum(alone_passes)  # each row ran only while its block had masks
    assert min(alone_passes) < 12  # some steps committed several tokens


def test_threshold_with_cfg_canvas_and_padding(make_model):
    model = confident_model(make_model, seed=9)
    mask_id = model.cfg.mask_token_id
    prompts, attention_mask = padded_prompts(model, 2, 5, seed=6, row=0, pads=3)
    canvas = random_prompts(model, 2, 8, seed=7)
    canvas[0, [1, 2, 6]] = mask_id
    canvas[1, 4:] = mask_id  # row 1: the first block has nothing to sample
    for cache in MODES:
        stats = {}
        out = G.generate(model, prompts, 4, 8, 4, cfg_scale=1.0, mask_id=mask_id,
                         attention_mask=attention_mask, canvas=canvas, cache=cache, threshold=0.9,
                         stats=stats)
        given = canvas != mask_id
        assert torch.equal(out[:, 5:][given], canvas[given]) and not (out == mask_id).any()
        assert stats["generated_tokens"] == 7 and 2 <= stats["forward_passes"] <= 6


def test_argument_errors(make_model):
    model = make_model(seed=0)
    prompts = random_prompts(model, 1, 3, seed=0)
    mask_id = model.cfg.mask_token_id
    with pytest.raises(ValueError, match="cache must be one of"):
        G.generate(model, prompts, 4, 8, 4, mask_id=mask_id, cache="full")
    with pytest.raises(ValueError, match="threshold"):
        G.generate(model, prompts, 4, 8, 4, mask_id=mask_id, threshold=0.9, remasking="random")
    with pytest.raises(ValueError, match="threshold"):
        G.generate(model, prompts, 4, 8, 4, mask_id=mask_id, threshold=1.5)


# -----------------------------------------------------------------------------
# The benchmark's table


def test_bench_prints_every_mode(make_model, monkeypatch, capsys, tmp_path):
    """`python -m bench.sampler --model DIR DIR`, shrunk: a small random model and shape for (a), two
    saved tiny checkpoints on 4 held-out puzzles for (b); one row per mode and workload with its passes
    per token and, in (b), percentages. Without --model, (b) is skipped with a note."""
    import data

    tokenizer = C.build_tiny_tokenizer()
    paths = [str(tmp_path / name) for name in ("tiny", "tiny2")]
    for seed, path in enumerate(paths):
        C.save_model(C.build_model("tiny", tokenizer, seed=seed), tokenizer, path)
    monkeypatch.setattr(sampler, "BENCH_SPEED_SHAPE", (2, 6, 8, 4, 4, 0.9))
    monkeypatch.setattr(C, "build_model", lambda preset: make_model(seed=0))
    examples = data.test_examples("tiny_sudoku", "data/files", 4)
    monkeypatch.setattr(data, "test_examples", lambda task, data_dir: examples)
    sampler.bench(paths)
    rows = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith(("(a) bench", "(b) tiny"))]
    assert len(rows) == 18, rows
    names = ["plain", "prefix", "dual",
             "plain + threshold 0.9", "prefix + threshold 0.9", "dual + threshold 0.9"]
    for row, name in zip(rows, names * 3):
        assert f" {name} " in row, (row, name)
    assert all(row.startswith("(b) tiny 4 ") for row in rows[6:12])
    assert all(row.startswith("(b) tiny2 4 ") for row in rows[12:])
    for row in rows[:3]:  # the fixed schedule, 4 passes for 8 tokens, whatever the cache
        assert row.split()[-3:] == ["0.500", "-", "-"], row
    for row in rows[3:6]:  # threshold decoding commits at least one token per pass
        assert 0 < float(row.split()[-3]) <= 1.0, row
    for row in rows[6:]:  # (b): an accuracy and a share of plain's tokens, both percentages
        accuracy, same = (float(field.rstrip("%")) for field in row.split()[-2:])
        assert 0 <= accuracy <= 100 and 0 <= same <= 100, row
    sampler.bench([])
    assert "(b) skipped: pass --model" in capsys.readouterr().out
    assert torch.is_grad_enabled()  # the benchmark must not switch autograd off for its caller
