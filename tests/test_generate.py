"""
Guards generate.py, the sampler (LLaDA's reverse diffusion with low-confidence remasking in
semi-autoregressive blocks) and its CLI.

- at temperature 0 the fast batched `generate` returns IDENTICAL tokens to a slow reference written here
  (one row at a time, plain torch.topk per row, LLaDA's algorithm as its paper states it, classifier-free
  guidance included), over several (steps, gen_length, block_length, cfg_scale, batch) settings, including
  steps per block that do not divide the block length and more steps than tokens; at temperature > 0 the
  plain sampler equals the reference drawing LLaDA's Gumbel noise the same way (with cfg and a canvas);
- no mask token is left after sampling, not even when the model likes the mask token best;
- determinism at a fixed generator seed at temperature > 0; the Gumbel noise (and the fast sampler's
  inverse-CDF draw, also checked at the edges of u) samples softmax(logits / T);
- infilling from a canvas (given tokens kept, against the same reference);
- "random" remasking; left padding hidden by attention_mask; rows independent of their batch;
- the argument errors, num_transfer_tokens, completion_text, and `python generate.py` end to end (and
  `python -m bench.sampler` refusing a missing --model folder).
"""


import pytest
import torch
from helpers import assert_clean_error, digit_checkpoint, run_script

import checkpoint as C
import data
import generate as G


def at_positions(input_ids, positions):
    """What a fake model reads of input_ids at model.LLaDA's `positions`: a slice of columns, or a (B, L) bool
    mask (the fast sampler's still-masked positions, flattened)."""
    return input_ids[positions] if isinstance(positions, torch.Tensor) else input_ids[:, positions]


class NeverPredictsMask(torch.nn.Module):
    """A real model whose logit of the mask token is pushed to -1e4 (softmax gives it exactly 0 in float64),
    as a trained model's is: the sampler's bookkeeping is then tested alone, whatever it does about [MASK]
    (test_never_commits_the_mask_token covers that)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.cfg = model, model.cfg

    def forward(self, input_ids, attention_mask=None, positions=slice(None)):
        logits = self.model(input_ids, attention_mask, positions)
        logits[..., self.cfg.mask_token_id] = -1e4
        return logits


def sampler_model(make_model, seed):
    """A random model (init_std 0.3 spreads the confidences, so that no two positions tie) that never
    predicts the mask token."""
    return NeverPredictsMask(make_model(seed=seed, init_std=0.3))


def random_prompts(model, B, Lp, seed):
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, model.cfg.vocab_size, (B, Lp), generator=g)
    prompts[prompts == model.cfg.mask_token_id] = 0
    return prompts


def padded_prompts(model, B, Lp, seed, row, pads):
    """Random prompts (B, Lp) and their attention mask, with row `row` left-padded by `pads` tokens."""
    prompts = random_prompts(model, B, Lp, seed)
    attention_mask = torch.ones_like(prompts)
    attention_mask[row, :pads] = 0
    return prompts, attention_mask


# -----------------------------------------------------------------------------
# The slow reference sampler


def reference_generate(model, prompt_ids, steps, gen_length, block_length, cfg_scale, mask_id, canvas=None,
                       temperature=0.0, generator=None):
    """LLaDA's sampler, one row at a time, starting from prompt ++ canvas (canvas: all [MASK] when None).
    For each block, left to right, its masked count n is split over steps / num_blocks steps (n // s each,
    one more for the first n % s of them). At each step: one forward pass (and, with cfg, one with the
    prompt masked: logits = un + (cfg + 1)(cond - un)); each still-masked position of the block predicts
    its argmax with confidence softmax(logits)[argmax]; the k most confident are committed. At temperature
    T > 0 the prediction is argmax(logits + T * Gumbel), the noise -log(-log(u)) read from one float64
    uniform tensor (B, block_length, V) drawn from `generator` at each step where some row commits
    (generate's order)."""
    Lp = prompt_ids.shape[1]
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    xs = [prompt + ([mask_id] * gen_length if canvas is None else canvas[row].tolist())
          for row, prompt in enumerate(prompt_ids.tolist())]
    for block in range(num_blocks):
        positions = list(range(Lp + block * block_length, Lp + (block + 1) * block_length))
        counts = []
        for x in xs:
            n = sum(1 for i in positions if x[i] == mask_id)
            counts.append([n // steps_per_block + (s < n % steps_per_block) for s in range(steps_per_block)])
            assert sum(counts[-1]) == n
        for s in range(steps_per_block):
            noise = None
            if temperature > 0 and any(c[s] > 0 for c in counts):
                noise = torch.rand((len(xs), block_length, model.cfg.vocab_size), dtype=torch.float64,
                                   generator=generator)
            for row, x in enumerate(xs):
                if counts[row][s] == 0:
                    continue
                with torch.no_grad():
                    logits = model(torch.tensor([x]))[0]  # (L, V)
                    if cfg_scale > 0:
                        unconditional = model(torch.tensor([[mask_id] * Lp + x[Lp:]]))[0]
                        logits = unconditional + (cfg_scale + 1) * (logits - unconditional)
                candidates = [i for i in positions if x[i] == mask_id]
                scores = [logits[i].double() for i in candidates]
                if noise is not None:
                    scores = [score + temperature * -torch.log(-torch.log(noise[row, i - positions[0]]))
                              for i, score in zip(candidates, scores)]
                predictions = [int(torch.argmax(score)) for score in scores]
                confidence = torch.tensor([float(torch.softmax(logits[i].double(), dim=-1)[p])
                                           for i, p in zip(candidates, predictions)], dtype=torch.float64)
                for j in torch.topk(confidence, counts[row][s]).indices.tolist():
                    x[candidates[j]] = predictions[j]
    return torch.tensor(xs)


SETTINGS = [  # (steps, gen_length, block_length, cfg_scale, batch, prompt length)
    (8, 16, 8, 0.0, 3, 5),   # 2 blocks, 4 steps each, 2 tokens per step
    (6, 16, 8, 0.0, 2, 4),   # 3 steps per block of 8: 3, 3, 2 (remainder to the earliest steps)
    (4, 12, 12, 0.0, 2, 3),  # one block
    (9, 15, 5, 0.0, 2, 6),   # 3 blocks of 5 in 3 steps each: 2, 2, 1
    (12, 8, 4, 0.0, 2, 3),   # 6 steps per block of 4: 1, 1, 1, 1, 0, 0 (steps that commit nothing)
    (5, 8, 8, 1.0, 2, 4),    # cfg, 8 tokens in 5 steps: 2, 2, 2, 1, 1
    (8, 8, 4, 0.5, 1, 3),    # cfg, semi-autoregressive
]


@pytest.mark.parametrize("steps,gen_length,block_length,cfg_scale,batch,prompt_length", SETTINGS)
def test_greedy_generate_equals_slow_reference(make_model, steps, gen_length, block_length, cfg_scale, batch,
                                               prompt_length):
    model = sampler_model(make_model, seed=steps + gen_length)
    mask_id = model.cfg.mask_token_id
    prompts = random_prompts(model, batch, prompt_length, seed=steps)
    out = G.generate(model, prompts, steps, gen_length, block_length, temperature=0.0, cfg_scale=cfg_scale,
                     mask_id=mask_id)
    assert out.shape == (batch, prompt_length + gen_length)
    assert torch.equal(out[:, :prompt_length], prompts)
    assert not (out == mask_id).any()
    assert torch.equal(out, reference_generate(model, prompts, steps, gen_length, block_length, cfg_scale,
                                               mask_id))


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_greedy_infilling_from_a_canvas_equals_slow_reference(make_model, cfg_scale):
    """canvas: the given tokens are kept, only its masks are sampled, each block's steps split the masks that
    block has (rows differ: 16, 9, 3 and 0 masks, so rows commit different counts at the same step)."""
    model = sampler_model(make_model, seed=11)
    mask_id = model.cfg.mask_token_id
    prompts = random_prompts(model, 4, 4, seed=5)
    canvas = random_prompts(model, 4, 16, seed=6)
    for row, masks in enumerate(([*range(16)], [0, 1, 2, 5, 8, 9, 12, 14, 15], [3, 10, 11], [])):
        canvas[row, masks] = mask_id
    out = G.generate(model, prompts, 8, 16, 8, cfg_scale=cfg_scale, mask_id=mask_id, canvas=canvas)
    given = canvas != mask_id
    assert torch.equal(out[:, 4:][given], canvas[given])
    assert not (out == mask_id).any()
    assert torch.equal(out, reference_generate(model, prompts, 8, 16, 8, cfg_scale, mask_id, canvas))
    all_masks = torch.full_like(canvas, mask_id)
    assert torch.equal(G.generate(model, prompts, 8, 16, 8, cfg_scale=cfg_scale, mask_id=mask_id,
                                  canvas=all_masks),
                       G.generate(model, prompts, 8, 16, 8, cfg_scale=cfg_scale, mask_id=mask_id))


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_sampling_at_a_temperature_equals_slow_reference(make_model, cfg_scale):
    """At T > 0 LLaDA's sampler draws its Gumbel noise as the reference does, a (B, block_length, V) tensor at
    each step where some row commits: the same tokens for the same generator seed, with rows of a canvas that
    commit different counts and rows with nothing to sample in a block."""
    model = sampler_model(make_model, seed=11)
    mask_id = model.cfg.mask_token_id
    prompts = random_prompts(model, 3, 4, seed=5)
    canvas = random_prompts(model, 3, 12, seed=6)
    for row, masks in enumerate(([*range(12)], [0, 3, 4, 9, 10], [9, 10])):
        canvas[row, masks] = mask_id
    for c in (None, canvas):
        sample = lambda T, reference: (reference_generate if reference else G.generate)(  # noqa: E731
            model, prompts, 6, 12, 4, temperature=T, cfg_scale=cfg_scale, mask_id=mask_id, canvas=c,
            generator=torch.Generator().manual_seed(3))
        out = sample(0.8, reference=False)
        assert torch.equal(out, sample(0.8, reference=True))
        assert not torch.equal(out, sample(0.0, reference=False))  # the noise is used


def test_cfg_changes_the_result(make_model):
    """The unconditional pass is used: with a large guidance scale the tokens differ from plain sampling."""
    model = sampler_model(make_model, seed=3)
    prompts = random_prompts(model, 3, 6, seed=0)
    plain = G.generate(model, prompts, 8, 16, 8, mask_id=model.cfg.mask_token_id)
    guided = G.generate(model, prompts, 8, 16, 8, cfg_scale=3.0, mask_id=model.cfg.mask_token_id)
    assert not torch.equal(plain, guided)


# -----------------------------------------------------------------------------
# Contracts


class MaskLovingModel(torch.nn.Module):
    """A mock whose logits put the mask token first everywhere, then random tokens."""

    def __init__(self, vocab_size, mask_id):
        super().__init__()
        self.vocab_size, self.mask_id = vocab_size, mask_id

    def forward(self, input_ids, attention_mask=None, positions=slice(None)):
        g = torch.Generator().manual_seed(int(input_ids.sum()))
        logits = torch.randn(*at_positions(input_ids, positions).shape, self.vocab_size, generator=g)
        logits[..., self.mask_id] = 10.0
        return logits


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("threshold", [None, 0.9])
def test_never_commits_the_mask_token(temperature, threshold):
    """Committing [MASK] would leave the position masked after its block is done (the block's transfer
    counts are fixed at its start), so a completion could come back with mask tokens in it. With a
    threshold the fast sampler's inverse-CDF draw is used: it must not pick the banned token either."""
    model = MaskLovingModel(vocab_size=20, mask_id=7)
    out = G.generate(model, torch.zeros(2, 3, dtype=torch.long), 4, 8, 4, temperature=temperature, mask_id=7,
                     generator=torch.Generator().manual_seed(0), threshold=threshold)
    assert not (out[:, 3:] == 7).any()


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_seeded_sampling_is_deterministic(make_model, cache):
    model = make_model(seed=5)
    mask_id = model.cfg.mask_token_id
    prompts = random_prompts(model, 3, 5, seed=1)
    run = lambda seed, remasking="low_confidence": G.generate(  # noqa: E731
        model, prompts, 8, 16, 8, temperature=1.0, remasking=remasking, mask_id=mask_id,
        generator=torch.Generator().manual_seed(seed), cache=cache)
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # the noise is used
    assert not (a == mask_id).any() and not (c == mask_id).any()
    r1, r2 = run(0, "random"), run(0, "random")
    assert torch.equal(r1, r2) and not (r1 == mask_id).any()
    assert torch.equal(r1[:, :5], prompts)


def test_random_remasking_at_temperature_zero(make_model):
    model = sampler_model(make_model, seed=6)
    mask_id = model.cfg.mask_token_id
    prompts = random_prompts(model, 2, 4, seed=2)
    def run(remasking, seed):
        return G.generate(model, prompts, 6, 12, 6, remasking=remasking, mask_id=mask_id,
                          generator=torch.Generator().manual_seed(seed))

    out = run("random", 0)
    assert out.shape == (2, 16) and not (out == mask_id).any()
    # the commit order is drawn from the generator, not from the confidence: it changes what the model sees
    assert not torch.equal(out, run("random", 1)) and not torch.equal(out, run("low_confidence", 0))


class FixedLogitsModel(torch.nn.Module):
    """A mock returning the same logits at every position."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask=None, positions=slice(None)):
        return self.logits.expand(*at_positions(input_ids, positions).shape, -1).clone()


@pytest.mark.parametrize("temperature", [1.0, 0.5])
@pytest.mark.parametrize("threshold", [None, 0.9])
def test_sampling_follows_the_tempered_softmax(temperature, threshold):
    """argmax(logits + T * Gumbel) (LLaDA's sampler) and the fast sampler's inverse-CDF draw (threshold set)
    are samples of softmax(logits / T)."""
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5, -30.0])  # token 4 is the mask token
    model = FixedLogitsModel(logits)
    N = 4000
    out = G.generate(model, torch.zeros(N, 1, dtype=torch.long), 1, 1, 1, temperature=temperature, mask_id=4,
                     generator=torch.Generator().manual_seed(0), threshold=threshold)
    freq = torch.bincount(out[:, 1], minlength=5).double() / N
    p = torch.softmax(logits.double() / temperature, dim=0)
    assert ((freq - p).abs() <= 5 * torch.sqrt(p * (1 - p) / N) + 1e-9).all(), (freq, p)


def test_inverse_cdf_sample_at_the_edges_of_u():
    """The fast sampler's draw: the first token whose cumulative probability reaches u * total. At u = 1 the
    last token with probability (not a zero-probability one after it, not one past the end); at the smallest
    u the first with probability; a cumulative probability reached exactly is that token's."""
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.5, 0.25, 0.0],   # zeros at the start, in the middle, at the end
                          [0.0, 0.0, 2.0, 0.0, 0.0, 0.0]],     # one token, a total that is not 1
                         dtype=torch.float64)
    draw = lambda u: G.inverse_cdf_sample(  # noqa: E731
        probs, torch.tensor([[u], [u]], dtype=torch.float64)).tolist()
    assert draw(1.0) == [4, 2]
    assert draw(2.0 ** -53) == [1, 2]
    assert draw(0.25) == [1, 2] and draw(0.25 + 1e-12) == [3, 2]


def test_rows_are_independent_of_their_batch(make_model):
    model = sampler_model(make_model, seed=7)
    mask_id = model.cfg.mask_token_id
    prompts = random_prompts(model, 4, 5, seed=3)
    for cfg_scale in (0.0, 1.0):
        batch = G.generate(model, prompts, 6, 12, 4, cfg_scale=cfg_scale, mask_id=mask_id)
        for row in range(4):
            alone = G.generate(model, prompts[row:row + 1], 6, 12, 4, cfg_scale=cfg_scale, mask_id=mask_id)
            assert torch.equal(alone[0], batch[row])


def test_left_padding_hidden_by_attention_mask(make_model):
    """Changing the padded tokens of a left-padded prompt changes nothing once attention_mask hides them."""
    model = sampler_model(make_model, seed=8)
    mask_id = model.cfg.mask_token_id
    prompts, attention_mask = padded_prompts(model, 2, 6, seed=4, row=0, pads=2)
    other = prompts.clone()
    other[0, :2] = (prompts[0, :2] + 5) % model.cfg.vocab_size
    for cfg_scale in (0.0, 1.0):
        a = G.generate(model, prompts, 4, 8, 4, cfg_scale=cfg_scale, mask_id=mask_id,
                       attention_mask=attention_mask)
        b = G.generate(model, other, 4, 8, 4, cfg_scale=cfg_scale, mask_id=mask_id,
                       attention_mask=attention_mask)
        assert torch.equal(a[:, 6:], b[:, 6:]) and not (a == mask_id).any()


def test_argument_errors(make_model):
    model = sampler_model(make_model, seed=0)
    prompts = random_prompts(model, 1, 3, seed=0)
    with pytest.raises(ValueError, match="gen_length 10 must be a multiple of block_length 4"):
        G.generate(model, prompts, 4, 10, 4, mask_id=model.cfg.mask_token_id)
    with pytest.raises(ValueError, match="steps 5 must be a multiple of the number of blocks"):
        G.generate(model, prompts, 5, 8, 4, mask_id=model.cfg.mask_token_id)
    with pytest.raises(ValueError, match="remasking"):
        G.generate(model, prompts, 4, 8, 4, remasking="high_confidence", mask_id=model.cfg.mask_token_id)


def test_num_transfer_tokens_hand_example():
    block_masked = torch.zeros(3, 12, dtype=torch.bool)
    block_masked[0, :10] = True  # 10 over 4 steps: 3, 3, 2, 2
    block_masked[1, 2:9] = True  # 7 over 4 steps: 2, 2, 2, 1
    got = G.num_transfer_tokens(block_masked, 4)  # row 2: nothing masked
    assert got.tolist() == [[3, 3, 2, 2], [2, 2, 2, 1], [0, 0, 0, 0]]
    assert G.num_transfer_tokens(block_masked[:1], 12).tolist() == [[1] * 10 + [0, 0]]


def test_completion_text_cuts_at_the_first_stop_id(tokenizer):
    ids = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos, eot = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|eot_id|>")
    stops = C.stop_token_ids(tokenizer)
    assert G.completion_text(tokenizer, torch.tensor(ids("12") + [eos] + ids("34") + [eot]), stops) == "12"
    assert G.completion_text(tokenizer, torch.tensor(ids("a b") + [eot, eos] + ids("c")), stops) == "a b"
    assert G.completion_text(tokenizer, torch.tensor(ids("1\n2")), stops) == "1\n2"
    assert G.completion_text(tokenizer, torch.tensor([eos] + ids("9")), stops) == ""


# -----------------------------------------------------------------------------
# The CLI


def test_cli_samples_from_a_saved_checkpoint(tokenizer, tmp_path):
    model = C.build_model("tiny", tokenizer, seed=0)
    with torch.no_grad():  # zero rows: stop and mask tokens never win the argmax, so the text is not empty
        for i in C.stop_token_ids(tokenizer) + [C.mask_token_id(tokenizer)]:
            model.ff_out.weight[i] = 0
    path = str(tmp_path / "ckpt")
    C.save_model(model, tokenizer, path)
    result = run_script("generate.py", "--model", path, "--prompt", "12", "--gen-length", "8",
                        "--block-length", "4", "--steps", "4", "--device", "cpu")
    # the same sampling in process
    loaded = C.load_model(path).eval()
    prompt = torch.tensor([data.encode_prompt(tokenizer, [{"role": "user", "content": "12"}])])
    out = G.generate(loaded, prompt, 4, 8, 4, mask_id=loaded.cfg.mask_token_id,
                     generator=torch.Generator().manual_seed(0))
    expected = G.completion_text(tokenizer, out[0, prompt.shape[1]:], C.stop_token_ids(tokenizer))
    assert len(expected) > 0
    assert result.stdout.endswith(expected + "\n")


def test_cli_task_fills_the_blanks_of_a_tiny_sudoku_canvas(tmp_path):
    """`--task tiny_sudoku`: the sampler starts from the puzzle's answer grid (given cells written, the task's
    lengths), so the output is the puzzle's 4 rows with only its blanks filled, whatever the model (here one
    that writes digits); a malformed puzzle is a message."""
    path = digit_checkpoint(tmp_path / "digits")
    puzzle = "1024\n0230\n3002\n2043"

    def cli(prompt, expect_ok=True):
        return run_script("generate.py", "--model", path, "--task", "tiny_sudoku", "--prompt", prompt,
                          "--device", "cpu", expect_ok=expect_ok)

    result = cli(puzzle.replace("\n", "\\n"))  # typed on a command line, as the docstring shows
    rows = result.stdout.strip().split("\n")
    assert len(rows) == 4 and all(len(r) == 4 and set(r) <= set("1234") for r in rows), result.stdout
    assert all(g in ("0", c) for g, c in zip(puzzle.replace("\n", ""), "".join(rows)))  # the given cells kept
    assert_clean_error(cli("1024\\n0230", expect_ok=False), "4 rows of 4 digits")


def test_cli_bench_model_must_be_folders(tmp_path):
    missing = str(tmp_path / "no-such-model")
    assert_clean_error(run_script("bench/sampler.py", "--model", str(tmp_path), missing, expect_ok=False),
                       "--model", "no-such-model", "checkpoint folders")
