"""
Guards the memory of the large tensors (key/value cache, LM-head losses, the sampler's float64 work), each
measured as the CPU allocator's peak in torch's profiler (profile_memory=True) at a small shape, and the
results unchanged:

- a cached forward (past_kv, return_kv=False) holds the cache once: its peak is about one cache below the
  same forward collecting the new keys/values, and its logits are those of the full forward; the fast
  sampler's cache, when rows leave it, is replaced layer by layer;
- token_logprobs and sft_loss in chunks: bitwise the values and gradients of a one-call cross_entropy over
  .float() logits, in fp32 and bf16, with a peak through forward and backward lower by at least one fp32
  (rows, V) tensor (the log-softmax cross_entropy saves; sft_loss on fp32 logits by less, see its test);
  in one chunk, one plain call at the reference's peak; sft_loss's graph does not hold the (B, L, V)
  logits, so the del in sft.py's loop frees them before backward;
- the samplers (LLaDA's and the fast one, T = 0 and T > 0) give the same tokens with a one-row chunk as
  with one chunk, at a lower peak.
"""

import pytest
import torch
import torch.nn.functional as F
from test_generate import random_prompts
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

import generate as G
import model as M
import sft

WIDE_VOCABULARY = 2048  # wide enough that the (rows, V) tensors dominate the tiny model's activations


def peak_bytes(fn):
    """(bytes, fn()): the most CPU memory allocated at once while fn ran, beyond what was allocated when it
    started, from the allocator's running total in the profiler's allocation events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            fields = event.extra_fields
            events.append((event.start_time_ns, fields.alloc_size, fields.total_allocated))
    events.sort()
    start = events[0][2] - events[0][1]  # allocated before the first event
    return max(total for _, _, total in events) - start, result


def wide_model(make_model, seed=0, **overrides):
    return make_model(seed=seed, vocab_size=WIDE_VOCABULARY, embedding_size=WIDE_VOCABULARY, **overrides)


# -----------------------------------------------------------------------------
# The key/value cache, held once


def test_cached_forward_holds_the_cache_once(make_model):
    """The dual cache's step (queries = the block) reads past_kv: without return_kv it must not collect the
    new keys/values too (they would be a second cache); its logits are those of the call collecting them,
    and the full forward's."""
    model = make_model(seed=1, n_layers=8)
    x = random_prompts(model, 4, 128, seed=2)
    x[:, 96:] = model.cfg.mask_token_id
    with torch.no_grad():
        full = model(x)
        _, kv = model(x, return_kv=True)
        cache = sum(t.numel() * t.element_size() for layer in kv for t in layer)
        held_once, logits = peak_bytes(lambda: model(x, None, slice(96, 104), past_kv=kv,
                                                     queries=slice(96, 104)))
        held_twice, (collected, _) = peak_bytes(lambda: model(x, None, slice(96, 104), past_kv=kv,
                                                              queries=slice(96, 104), return_kv=True))
    assert torch.equal(logits, collected)
    assert torch.allclose(logits, full[:, 96:104], atol=1e-5, rtol=0)
    # one layer of the cache is alive at a time (its concatenation and grouped-query copies)
    assert held_once < cache / 2, (held_once, cache)
    assert held_twice - held_once > cache * (1 - 1 / model.cfg.n_layers) * 0.9, (held_twice, held_once, cache)


class CacheWatcher(torch.nn.Module):
    """The model, recording the past_kv list of every cached call and its rows at that call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.cfg, self.calls = model, model.cfg, []

    def forward(self, *args, past_kv=None, **kwargs):
        if past_kv is not None:
            self.calls.append((past_kv, len(past_kv[0][0])))
        return self.model(*args, past_kv=past_kv, **kwargs)


def test_rows_leave_the_fast_samplers_cache_in_place(make_model):
    """Threshold decoding with a dual cache: rows finish their blocks at different steps and leave the cache,
    whose list is then updated layer by layer (the same list with fewer rows), never rebuilt beside the old
    one."""
    model = make_model(seed=3, init_std=0.3)
    with torch.no_grad():
        model.ff_out.weight *= 5.0  # confidences spread: rows finish at different steps
    watcher = CacheWatcher(model)
    out = G.generate(watcher, random_prompts(model, 6, 16, seed=4), 8, 32, 16,
                     mask_id=model.cfg.mask_token_id, cache="dual", threshold=0.9)
    assert not (out == model.cfg.mask_token_id).any()
    shrunk = [(a, b) for (a, rows_a), (b, rows_b) in zip(watcher.calls, watcher.calls[1:]) if rows_b < rows_a]
    assert shrunk and all(a is b for a, b in shrunk)  # rows left, and the list stayed the same


# -----------------------------------------------------------------------------
# The LM-head losses: fp32 work recomputed in backward


def reference_token_logprobs(logits, targets):
    """The one-call reference: cross_entropy over the .float() logits (it saves an fp32 log-softmax)."""
    logprobs = -F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return logprobs.view(targets.shape)


def reference_sft_loss(logits, input_ids, masked, p, prompt_lengths, start=0):
    L = input_ids.shape[1]
    masked, targets = masked[:, start:], input_ids[:, start:]
    ce = F.cross_entropy(logits[masked].float(), targets[masked], reduction="none")
    return (ce / p.expand_as(masked)[masked]).sum() / (L - prompt_lengths).sum().clamp(min=1)


def forward_backward(loss_fn, logits):
    """(value, gradient of logits) of loss_fn(logits), on a fresh leaf; a non-scalar value is weighted."""
    leaf = logits.detach().requires_grad_()
    value = loss_fn(leaf)
    value.backward(torch.linspace(-1, 1, value.numel()).view(value.shape) if value.dim() else None)
    return value.detach(), leaf.grad


def count_cross_entropy_calls(monkeypatch):
    """The rows of every F.cross_entropy call from now on (model.F is torch.nn.functional)."""
    calls = []
    cross_entropy = M.F.cross_entropy
    monkeypatch.setattr(M.F, "cross_entropy",
                        lambda x, *args, **kwargs: calls.append(len(x)) or cross_entropy(x, *args, **kwargs))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_recomputes_its_fp32_work(monkeypatch, dtype):
    """Chunks of 2 of 8 rows: bitwise the reference's values and gradients, and only the logits saved (what
    remains of the fp32 work is one chunk's). Positions that fit one chunk take one plain call: the
    reference's peak."""
    B, L, V = 8, 12, WIDE_VOCABULARY
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(B, L, V, generator=g)).to(dtype)
    targets = torch.randint(0, V, (B, L), generator=g)
    reference_peak, (expected, expected_grad) = peak_bytes(
        lambda: forward_backward(lambda t: reference_token_logprobs(t, targets), logits))
    calls = count_cross_entropy_calls(monkeypatch)
    one_call_peak, (value, grad) = peak_bytes(
        lambda: forward_backward(lambda t: M.token_logprobs(t, targets), logits))
    assert calls == [B * L]
    assert torch.equal(value, expected) and torch.equal(grad, expected_grad)
    assert one_call_peak <= reference_peak + B * L * 16, (one_call_peak, reference_peak)  # (B, L) results
    monkeypatch.setattr(M, "LOGPROB_CHUNK_ELEMENTS", 2 * L * V)
    calls.clear()
    peak, (value, grad) = peak_bytes(lambda: forward_backward(lambda t: M.token_logprobs(t, targets), logits))
    assert calls == [2 * L] * 4 * 2  # forward, then the same chunks recomputed in backward
    assert value.dtype == torch.float32 and grad.dtype == dtype
    assert torch.equal(value, expected) and torch.equal(grad, expected_grad)
    assert peak <= reference_peak - B * L * V * 4, (peak, reference_peak)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sft_loss_recomputes_its_fp32_work(monkeypatch, dtype):
    """Chunks of 7 masked rows: bitwise the reference's loss and gradient, and only the masked rows of the
    logits saved. In bf16 (autocast's logits on GPUs) the peak is at least an fp32 (rows, V) tensor lower. In
    fp32 the saved rows are as large as the log-softmax they replace, and both peaks end at the gradient of
    the rows scattered into the logits' gradient: the gain is smaller there (a third of one such tensor)."""
    B, L, start, V = 6, 24, 4, WIDE_VOCABULARY
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, L), generator=g)
    prompt_lengths = torch.tensor([4, 6, 9, 5, 4, 7])
    _, masked, p = sft.forward_mask(ids, prompt_lengths, 0, generator=g)
    N = int(masked.sum())
    assert N > 14
    logits = (3 * torch.randn(B, L - start, V, generator=g)).to(dtype)
    reference_peak, (expected, expected_grad) = peak_bytes(lambda: forward_backward(
        lambda t: reference_sft_loss(t, ids, masked, p, prompt_lengths, start), logits))
    monkeypatch.setattr(M, "LOGPROB_CHUNK_ELEMENTS", 7 * V)
    calls = count_cross_entropy_calls(monkeypatch)
    peak, (value, grad) = peak_bytes(lambda: forward_backward(
        lambda t: sft.sft_loss(t, ids, masked, p, prompt_lengths, start), logits))
    assert len(calls) == 2 * -(-N // 7) and max(calls) == 7
    assert torch.equal(value, expected) and torch.equal(grad, expected_grad)
    if dtype == torch.bfloat16:
        assert peak <= reference_peak - N * V * 4, (peak, reference_peak)
    else:
        assert peak <= reference_peak - N * V * 4 / 4, (peak, reference_peak)


def test_sft_loss_graph_does_not_hold_the_logits(make_model):
    """sft.py deletes its logits before backward: that frees them only if sft_loss's graph keeps none of
    the (B, L, V) logits (it keeps their masked rows), which lowers the peak of the step by a (B, L, V)
    tensor."""
    model = wide_model(make_model)
    B, L, start = 4, 32, 8
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, WIDE_VOCABULARY, (B, L), generator=g)
    prompt_lengths = torch.full((B,), start)
    noisy, masked, p = sft.forward_mask(ids, prompt_lengths, model.cfg.mask_token_id, eps=0.3,
                                        noise=(torch.full((B,), 0.5), torch.rand(B, L, generator=g)))

    def step(release):
        model.zero_grad(set_to_none=True)
        logits = model(noisy, positions=slice(start, None))
        loss = sft.sft_loss(logits, ids, masked, p, prompt_lengths, start)
        if release:
            del logits
        loss.backward()
        return loss.detach(), model.ff_out.weight.grad.clone()

    kept, (loss_kept, grad_kept) = peak_bytes(lambda: step(False))
    released, (loss, grad) = peak_bytes(lambda: step(True))
    assert torch.equal(loss, loss_kept) and torch.equal(grad, grad_kept)
    assert released <= kept - B * (L - start) * WIDE_VOCABULARY * 4 * 0.9, (released, kept)


# -----------------------------------------------------------------------------
# The sampler's float64 work, in chunks of rows


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("fast", [{}, {"cache": "dual", "threshold": 0.5}])
def test_sampler_chunks_give_the_same_tokens_at_a_lower_peak(make_model, monkeypatch, temperature, fast):
    """One masked row per chunk against one chunk for all: the same tokens (the Gumbel noise, and the fast
    sampler's uniforms, drawn as before), at a peak lower by at least a float64 copy of the first step's
    rows."""
    model = wide_model(make_model, seed=5, init_std=0.3)
    B, block_length = 4, 16
    prompts = random_prompts(model, B, 8, seed=6)

    def sample():
        return G.generate(model, prompts, 4, 2 * block_length, block_length, temperature,
                          mask_id=model.cfg.mask_token_id, generator=torch.Generator().manual_seed(7), **fast)

    monkeypatch.setattr(G, "SAMPLER_CHUNK_ELEMENTS", 2**40)
    whole_peak, whole = peak_bytes(sample)
    monkeypatch.setattr(G, "SAMPLER_CHUNK_ELEMENTS", WIDE_VOCABULARY)
    chunked_peak, chunked = peak_bytes(sample)
    assert torch.equal(chunked, whole)
    assert not (chunked == model.cfg.mask_token_id).any()
    assert chunked_peak <= whole_peak - B * block_length * WIDE_VOCABULARY * 8, (chunked_peak, whole_peak)
