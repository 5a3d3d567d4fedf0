"""
Guards d2-StepMerge (Wang, Turok, Schiff, Arriola, Kuleshov 2025, d2; grpo.py --estimator stepmerge
--merge-chunks K) and the sampler's record of each token's commit step that it reads:

- generate(record=...) stores unmask_step (B, gen_length): each step g = block * steps_per_block + i + 1
  commits exactly num_transfer_tokens' count of positions (steps that commit nothing still count: a canvas),
  0 on a canvas's given cells; LLaDA's sampler and the fast one without a cache record the same steps; the
  prefix and dual caches record too; threshold decoding refuses to record; recording never changes the
  tokens; generate_records concatenates the records of its generation batches;
- K = 1 is d1's estimator (grpo.estimator_input + grpo.completion_logprobs) bit for bit, on a micro-batch of
  a batch with a canvas cell and a left-padded prompt;
- the chunk ids partition the action positions by d2's segments (s_k < g <= s_{k+1}), and for 256 tokens in
  blocks of 32 over 128 steps with K = 8 (d2's GSM8K run) chunk k is block k;
- state k is the sampler's x after s_k steps, read off a real llada_generate run by a model wrapper that
  records its inputs;
- stepmerge_logprobs equals a slow reference written here: token by token, its state built by hand and its
  log-prob read from a separate forward;
- grpo.py end to end: --merge-chunks 2 runs 2 steps on the tiny default (old, reference and current
  log-probs on the same states: the first ratio exactly 1; mu x (old, reference, current) x K forward passes per step),
  --merge-chunks 1 trains the same weights as --estimator d1, the dry run's update peak grows with K, and
  the refusals (--rollout-threshold, K < 1, K > the rollout's steps) are clean messages.
"""

import re

import pytest
import torch
from helpers import (TWO_STEPS, assert_clean_error, assert_estimator_run, parameters,
                     read_metrics, run_script)

import checkpoint as C
import data
import generate as G
import grpo
import objectives

P_MASK_PROMPT = 0.15


class Recording(torch.nn.Module):
    """A model that keeps a copy of every input it is called with (the sampler's x before each step)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.cfg, self.inputs = model, model.cfg, []

    def forward(self, input_ids, attention_mask=None, positions=slice(None), **kwargs):
        self.inputs.append(input_ids.clone())
        return self.model(input_ids, attention_mask, positions, **kwargs)


def sample(model, B=3, Lp=5, gen_length=32, block_length=8, steps=16, seed=0, canvas=None, **options):
    """Prompts (B, Lp), and generate's tokens and record at temperature 1 from a fixed seed."""
    mask_id = model.cfg.mask_token_id
    prompts = torch.randint(10, 40, (B, Lp), generator=torch.Generator().manual_seed(seed))
    record = {}
    out = G.generate(model, prompts, steps, gen_length, block_length, temperature=1.0, mask_id=mask_id,
                     generator=torch.Generator().manual_seed(seed), canvas=canvas, record=record, **options)
    return prompts, out, record["unmask_step"]


def assert_steps_follow_the_schedule(out, unmask_step, Lp, gen_length, block_length, steps, mask_id, canvas):
    """Each global step commits exactly the count num_transfer_tokens gives its block's step, and only there;
    a canvas's given cells have step 0."""
    given = torch.zeros(out.shape[0], gen_length, dtype=torch.bool) if canvas is None else canvas != mask_id
    assert torch.equal(unmask_step == 0, given)
    assert not (out[:, Lp:] == mask_id).any()
    per_block = steps // (gen_length // block_length)
    for block, start in enumerate(range(0, gen_length, block_length)):
        transfers = G.num_transfer_tokens(~given[:, start:start + block_length], per_block)  # (B, per_block)
        for i in range(per_block):
            g = block * per_block + i + 1
            committed = unmask_step == g
            assert not committed[:, :start].any() and not committed[:, start + block_length:].any()
            assert torch.equal(committed.sum(dim=1), transfers[:, i]), (block, i)


# -----------------------------------------------------------------------------
# The sampler's record


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_record_gives_each_position_its_commit_step(make_model, cache):
    model = make_model(seed=1, init_std=0.3)
    _, out, unmask_step = sample(model, cache=cache)
    assert unmask_step.dtype == torch.long and unmask_step.shape == (3, 32)
    assert_steps_follow_the_schedule(out, unmask_step, 5, 32, 8, 16, model.cfg.mask_token_id, None)


def test_record_counts_the_steps_a_canvas_skips(make_model):
    """A canvas leaves blocks with fewer masks than steps: LLaDA's sampler runs no pass for those steps, and
    the global step index still advances."""
    model = make_model(seed=2, init_std=0.3)
    mask_id = model.cfg.mask_token_id
    canvas = torch.full((3, 32), mask_id)
    canvas[:, 2:7] = 11  # block 0 keeps 3 masks for its 4 steps
    canvas[1, 9:15] = 12  # row 1's block 1 keeps 2
    passes = {}
    prompts, out, unmask_step = sample(model, canvas=canvas, stats=passes)
    assert passes["forward_passes"] < 16  # steps were skipped
    assert_steps_follow_the_schedule(out, unmask_step, 5, 32, 8, 16, mask_id, canvas)
    assert torch.equal(out[:, 5:][canvas != mask_id], canvas[canvas != mask_id])


def test_fast_sampler_without_cache_records_llada_samplers_steps(make_model):
    """At temperature 0 both samplers take the same argmax tokens in the same order: the same record."""
    model = make_model(seed=3, init_std=0.3)
    mask_id = model.cfg.mask_token_id
    prompts = torch.randint(10, 40, (2, 4), generator=torch.Generator().manual_seed(3))
    slow, fast = torch.zeros(2, 24, dtype=torch.long), torch.zeros(2, 24, dtype=torch.long)
    a = G.llada_generate(model, prompts, 12, 24, 8, mask_id=mask_id, unmask_step=slow)
    b = G.fast_generate(model, prompts, 12, 24, 8, mask_id=mask_id, unmask_step=fast)
    assert torch.equal(a, b) and torch.equal(slow, fast) and (slow > 0).all()


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_recording_does_not_change_the_tokens(make_model, cache):
    model = make_model(seed=4, init_std=0.3)
    prompts, recorded, _ = sample(model, cache=cache, seed=5)
    plain = G.generate(model, prompts, 16, 32, 8, temperature=1.0, mask_id=model.cfg.mask_token_id,
                       generator=torch.Generator().manual_seed(5), cache=cache)
    assert torch.equal(recorded, plain)


def test_threshold_decoding_refuses_to_record(make_model):
    model = make_model(seed=0)
    with pytest.raises(ValueError, match="threshold"):
        G.generate(model, torch.ones(1, 3, dtype=torch.long), 8, 8, 8, mask_id=model.cfg.mask_token_id,
                   threshold=0.9, record={})


def test_generate_records_concatenates_its_batches(make_model, tokenizer):
    """Rows are independent at temperature 0: two batches of 2 record what one batch of 4 records."""
    model = make_model(seed=6, init_std=0.3)
    records = data.load_examples("tiny_sudoku", "test", limit=4)
    sampler = {"steps": 20, "gen_length": 20, "block_length": 20, "temperature": 0.0}
    mask_id = C.mask_token_id(tokenizer)
    whole, halves = {}, {}
    one = G.generate_records(model, tokenizer, records, sampler, mask_id=mask_id, device="cpu", record=whole)
    two = G.generate_records(model, tokenizer, records, sampler, mask_id=mask_id, device="cpu", batch_size=2,
                             record=halves)
    assert torch.equal(one[0], two[0]) and torch.equal(whole["unmask_step"], halves["unmask_step"])
    assert whole["unmask_step"].shape == (4, 20)
    assert torch.equal(whole["unmask_step"] == 0, one[2] != mask_id)  # the canvas's given cells


# -----------------------------------------------------------------------------
# The estimator


def toy_rollout(model, K_steps=16, seed=0):
    """A real rollout batch of 4 rows (prompts of 6, completions of 16 in blocks of 8, K_steps steps), row 2's
    prompt left-padded by 2 under an attention mask and completion cell 3 a canvas cell: (sequences,
    is_prompt, attention_mask, unmask_step, prompt_length)."""
    mask_id = model.cfg.mask_token_id
    prompts = torch.randint(10, 40, (4, 6), generator=torch.Generator().manual_seed(seed))
    prompt_mask = torch.ones(4, 6, dtype=torch.long)
    prompt_mask[2, :2] = 0
    canvas = torch.full((4, 16), mask_id)
    canvas[:, 3] = 17
    record = {}
    sequences = G.generate(model, prompts, K_steps, 16, 8, temperature=1.0, mask_id=mask_id,
                           attention_mask=prompt_mask, generator=torch.Generator().manual_seed(seed),
                           canvas=canvas, record=record)
    attention_mask = torch.cat([prompt_mask, torch.ones(4, 16, dtype=torch.long)], dim=1)
    is_prompt = grpo.conditioning_mask(sequences, 6, canvas, mask_id)
    return sequences, is_prompt, attention_mask, record["unmask_step"], 6


def test_one_chunk_is_d1s_estimator_bit_for_bit(make_model):
    model = make_model(seed=7, init_std=0.3)
    mask_id = model.cfg.mask_token_id
    sequences, is_prompt, attention_mask, unmask_step, P = toy_rollout(model)
    d1 = grpo.estimator_input(sequences, is_prompt, P_MASK_PROMPT, mask_id, torch.Generator().manual_seed(9))
    states, chunk = objectives.stepmerge_input(sequences, is_prompt, P_MASK_PROMPT, mask_id,
                                               torch.Generator().manual_seed(9), unmask_step=unmask_step,
                                               steps=16, num_chunks=1)
    assert states.shape == (1, *sequences.shape) and torch.equal(states[0], d1)
    assert (chunk == 0).all()
    for rows in (slice(0, 4), slice(1, 3)):  # the whole batch, and a micro-batch of it
        with torch.no_grad():
            expected = grpo.completion_logprobs(model, d1, rows, sequences, attention_mask, P)
            merged = objectives.stepmerge_logprobs(model, (states, chunk), rows, sequences, attention_mask, P)
        assert torch.equal(merged, expected)


def test_chunks_partition_the_actions_by_d2s_segments(make_model):
    model = make_model(seed=8, init_std=0.3)
    sequences, is_prompt, _, unmask_step, P = toy_rollout(model)
    actions = ~is_prompt[:, P:]
    bounds = objectives.merge_boundaries(16, 3)
    assert bounds == [0, 5, 10, 16]
    _, chunk = objectives.stepmerge_input(sequences, is_prompt, 0.0, model.cfg.mask_token_id,
                                          torch.Generator(), unmask_step=unmask_step, steps=16, num_chunks=3)
    members = [(chunk == k) & actions for k in range(3)]
    assert torch.equal(sum(m.long() for m in members), actions.long())  # each action in exactly one chunk
    for k, m in enumerate(members):
        assert torch.equal(m, actions & (unmask_step > bounds[k]) & (unmask_step <= bounds[k + 1]))
        assert m.any()


def test_for_d2s_gsm8k_shape_chunk_k_is_block_k(make_model):
    """256 tokens in blocks of 32 over 128 steps, K = 8: 16 steps per chunk, one block's."""
    model = make_model(seed=9, init_std=0.3, max_sequence_length=512)
    prompts, out, unmask_step = sample(model, B=2, Lp=4, gen_length=256, block_length=32, steps=128)
    _, chunk = objectives.stepmerge_input(out, grpo.conditioning_mask(out, 4, None, 0), 0.0,
                                          model.cfg.mask_token_id, torch.Generator(),
                                          unmask_step=unmask_step, steps=128, num_chunks=8)
    block = torch.arange(256).div(32, rounding_mode="floor").expand(2, -1)
    assert torch.equal(chunk, block)


def test_state_k_is_the_samplers_x_after_s_k_steps(make_model):
    """A wrapper records the sampler's input at every step: the input of step g is x after g - 1 steps (no
    canvas: every step commits, so every step runs a pass). With p_mask_prompt 0 the prompt is intact."""
    model = Recording(make_model(seed=10, init_std=0.3))
    mask_id = model.cfg.mask_token_id
    prompts, out, unmask_step = sample(model, B=3, Lp=5, gen_length=32, block_length=8, steps=16)
    assert len(model.inputs) == 16
    is_prompt = grpo.conditioning_mask(out, 5, None, mask_id)
    for K in (1, 3, 4, 8):  # chunks across blocks (3), block by block (4), within blocks (8)
        states, _ = objectives.stepmerge_input(out, is_prompt, 0.0, mask_id, torch.Generator(),
                                               unmask_step=unmask_step, steps=16, num_chunks=K)
        for k, s in enumerate(objectives.merge_boundaries(16, K)[:-1]):
            assert torch.equal(states[k], model.inputs[s]), (K, k)


def slow_stepmerge(model, sequences, is_prompt, attention_mask, unmask_step, P, steps, K, seed, mask_id):
    """d2-StepMerge by hand: for each completion token, the state of its chunk built position by position
    (the prompt masked from estimator_input's draw) and the token's log-prob from its own forward pass."""
    u = torch.rand(sequences.shape, generator=torch.Generator().manual_seed(seed))
    bounds = objectives.merge_boundaries(steps, K)
    N, L = sequences.shape
    out = torch.zeros(N, L - P)
    for b in range(N):
        for i in range(L - P):
            g = int(unmask_step[b, i])
            k = next((k for k in range(K) if bounds[k] < g <= bounds[k + 1]), 0)  # a canvas cell: chunk 0
            state = sequences[b].clone()
            for j in range(L):
                if is_prompt[b, j] and u[b, j] < P_MASK_PROMPT:
                    state[j] = mask_id
                if not is_prompt[b, j] and unmask_step[b, j - P] > bounds[k]:  # not yet committed
                    state[j] = mask_id
            with torch.no_grad():
                logits = model(state[None], attention_mask[b][None])
            out[b, i] = torch.log_softmax(logits[0, P + i].double(), dim=-1)[sequences[b, P + i]].item()
    return out


def test_logprobs_equal_a_slow_reference(make_model):
    model = make_model(seed=11, init_std=0.3)
    mask_id = model.cfg.mask_token_id
    sequences, is_prompt, attention_mask, unmask_step, P = toy_rollout(model, seed=1)
    estimate = objectives.stepmerge_input(sequences, is_prompt, P_MASK_PROMPT, mask_id,
                                          torch.Generator().manual_seed(4), unmask_step=unmask_step, steps=16,
                                          num_chunks=3)
    with torch.no_grad():
        fast = objectives.stepmerge_logprobs(model, estimate, slice(0, 4), sequences, attention_mask, P)
    slow = slow_stepmerge(model, sequences, is_prompt, attention_mask, unmask_step, P, 16, 3, 4, mask_id)
    assert fast.shape == (4, 16)
    assert torch.allclose(fast, slow, atol=1e-5), (fast - slow).abs().max()


def test_gradient_flows_through_every_chunk(make_model):
    model = make_model(seed=12, init_std=0.3)
    sequences, is_prompt, attention_mask, unmask_step, P = toy_rollout(model)
    estimate = objectives.stepmerge_input(sequences, is_prompt, P_MASK_PROMPT, model.cfg.mask_token_id,
                                          torch.Generator().manual_seed(0), unmask_step=unmask_step, steps=16,
                                          num_chunks=4)
    logp = objectives.stepmerge_logprobs(model, estimate, slice(0, 4), sequences, attention_mask, P)
    chunk = estimate[1]
    for k in range(4):  # each chunk's tokens carry a gradient of their own pass
        model.zero_grad()
        logp[chunk == k].sum().backward(retain_graph=True)
        assert sum(float(p.grad.abs().sum()) for p in model.parameters()) > 0, k


# -----------------------------------------------------------------------------
# grpo.py end to end

TINY = [*TWO_STEPS, "--temperature", 0.9]


def test_grpo_with_stepmerge(start, tmp_path):
    out = tmp_path / "stepmerge"
    run_script("grpo.py", "--model", start, *TINY, "--estimator", "stepmerge", "--merge-chunks", 2,
               "--num-iterations", 2, "--beta", 0.04, "--out-dir", out)
    # old, reference and current log-probs read the same K states: (mu 2 x old, reference, current) x K 2
    assert_estimator_run(out, 2, 12)


def test_one_chunk_trains_what_d1_trains(start, tmp_path):
    runs = {}
    for estimator in (["--estimator", "d1"], ["--estimator", "stepmerge", "--merge-chunks", 1]):
        out = tmp_path / estimator[1]
        run_script("grpo.py", "--model", start, *TINY, *estimator, "--num-iterations", 2, "--out-dir", out)
        runs[estimator[1]] = out
    a, b = parameters(runs["d1"]), parameters(runs["stepmerge"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_metrics(runs["stepmerge"])[0]["update_forward_passes"] == 6  # K = 1: d1's count


def test_dry_run_measures_the_k_passes(start):
    """The dry run's update holds K passes' activations: its peak grows with K."""
    peaks = {}
    for K in (1, 4):
        run = run_script("grpo.py", "--dry-run", "--model", start, "--estimator", "stepmerge",
                         "--merge-chunks", K, "--dry-run-prompt-tokens", 30)
        peaks[K] = float(re.search(r"^update: one of mu steps x\d+\s+(\d+\.\d+)", run.stdout, re.M)[1])
    assert peaks[4] > 2.5 * peaks[1], peaks


@pytest.mark.parametrize("flags, fragments", [
    (["--rollout-threshold", 0.9], ["--rollout-threshold", "drop --rollout-threshold"]),
    (["--merge-chunks", 0], ["--merge-chunks 0", "1 to 20"]),
    (["--merge-chunks", 21], ["--merge-chunks 21", "1 to 20", "--diffusion-steps"]),
])
def test_refusals(tmp_path, flags, fragments):
    run = run_script("grpo.py", "--estimator", "stepmerge", *flags, "--out-dir", tmp_path, expect_ok=False)
    assert_clean_error(run, *fragments)
