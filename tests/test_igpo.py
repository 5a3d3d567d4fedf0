"""
Guards IGPO, inpainting-guided policy optimisation (objectives.py; grpo.py --inpaint-zero-std-groups):

- place_hints equals a literal port of IGPO's placement (scale_chunk_positions and its caller,
  facebookresearch/igpo utils/generate.py:597-640,671-724) on random cases: the scale factor from the whole
  reference's length, stretched gaps capped at max_spacing, chunks cut or dropped at the effective region;
- hint_chunks: the chunks tile a prefix of the reference in sizes min..max, a remainder shorter than min is
  dropped, int(n (1 - r)) chunks are hidden, the last chunk is always revealed, and the draw is a function of
  the generator's seed;
- inpaint_zero_std_groups with a toy reward (correct iff the completion holds 'X', which the model never
  writes): only the all-wrong groups are sampled again; only correct hinted rows replace, into rows 0..k-1,
  at most max_replacements; nothing changes when no hinted row is correct; the hint mask is exactly the hint
  positions of the replaced rows (a task canvas's given tokens win and are not hints); the entropy filter
  keeps max(1, int(n keep)) hint tokens of highest entropy and touches nothing else; hint_entropy equals
  -sum p log p read slowly;
- grpo.py end to end on the tiny default with --inpaint-zero-std-groups runs and logs the counts, and
  settings IGPO cannot run are refused with a message.
"""

import math
import random

import pytest
import torch
from helpers import TWO_STEPS, assert_clean_error, read_metrics, run_script

import data
import objectives
from generate import read_completions

# -----------------------------------------------------------------------------
# Placement and chunks


def igpo_placement(answer_tokens, revealed_chunks, gen_length, free_tail, mask_id, max_spacing):
    """IGPO's code, ported line by line (utils/generate.py:502,517-534,597-640 and scale_chunk_positions
    :671-724): the completion area (gen_length,) with the revealed chunks placed."""
    effective_gen_length = max(0, gen_length - free_tail)
    generation_area = [mask_id] * gen_length
    answer_length = len(answer_tokens)
    if answer_length == 0 or effective_gen_length == 0:
        return torch.tensor(generation_area)
    scaling_factor = effective_gen_length / answer_length
    scaling_factor = max(1, scaling_factor)
    scaling_factor = min(1.5, scaling_factor)
    actual_answer_length = min(answer_length, effective_gen_length)
    answer_tokens = answer_tokens[:actual_answer_length]
    scaled_positions = []  # scale_chunk_positions
    for i, (start, end) in enumerate(revealed_chunks):
        chunk_length = end - start
        if i == 0:
            scaled_start = int(start * scaling_factor)
        else:
            prev_end = revealed_chunks[i - 1][1]
            original_spacing = start - prev_end
            scaled_spacing = min(int(original_spacing * scaling_factor), max_spacing)
            scaled_start = scaled_positions[-1][1] + scaled_spacing
        scaled_end = scaled_start + chunk_length
        if scaled_end > effective_gen_length:
            remaining_space = effective_gen_length - scaled_start
            if remaining_space > 0:
                scaled_end = scaled_start + min(chunk_length, remaining_space)
            else:
                break
        scaled_positions.append((scaled_start, scaled_end))
    scaled_generation_area = [mask_id] * effective_gen_length
    chunk_idx = 0
    for original_start, original_end in revealed_chunks:
        if chunk_idx < len(scaled_positions):
            scaled_start, scaled_end = scaled_positions[chunk_idx]
            chunk_tokens = answer_tokens[original_start:original_end]
            actual_scaled_end = min(scaled_end, scaled_start + len(chunk_tokens), effective_gen_length)
            actual_chunk_length = actual_scaled_end - scaled_start
            if actual_chunk_length > 0:
                scaled_generation_area[scaled_start:actual_scaled_end] = chunk_tokens[:actual_chunk_length]
            chunk_idx += 1
    generation_area[:effective_gen_length] = scaled_generation_area
    return torch.tensor(generation_area)


def test_place_hints_equals_igpo_placement():
    rng = random.Random(0)
    for case in range(400):
        gen_length = rng.choice([20, 64, 128, 256])
        free_tail = rng.choice([0, 6, 30, gen_length // 3])
        effective = max(0, gen_length - free_tail)
        ref_ids = [rng.randrange(10, 90) for _ in range(rng.randrange(1, 2 * gen_length))]  # s > 1 and = 1
        max_spacing = rng.choice([0, 3, 100])
        g = torch.Generator().manual_seed(case)
        revealed = objectives.hint_chunks(min(len(ref_ids), effective), rng.uniform(0.05, 0.95), g,
                                          rng.randint(1, 5), rng.randint(5, 12))
        expected = igpo_placement(ref_ids, revealed, gen_length, free_tail, 2, max_spacing)
        got = objectives.place_hints(ref_ids, revealed, gen_length, free_tail, 2, max_spacing)
        assert torch.equal(got, expected), (case, revealed)
        assert (got[effective:] == 2).all()  # the free tail is never hinted


@pytest.mark.parametrize("seed", range(20))
def test_hint_chunks_properties(seed):
    rng = random.Random(seed)
    num_tokens, low, high = rng.randrange(1, 200), rng.randint(1, 6), rng.randint(6, 12)
    ratio = rng.uniform(0.05, 0.95)
    # every chunk (ratio 1 hides none), from the same draws: the sizes come first, then the hidden set
    every = objectives.hint_chunks(num_tokens, 1.0, torch.Generator().manual_seed(seed), low, high)
    revealed = objectives.hint_chunks(num_tokens, ratio, torch.Generator().manual_seed(seed), low, high)
    ends = [0] + [end for _, end in every]
    assert all(start == ends[k] for k, (start, _) in enumerate(every))  # they tile a prefix
    assert all(low <= end - start <= high for start, end in every)
    assert num_tokens - ends[-1] < low  # a short remainder dropped, never revealed
    assert set(revealed) <= set(every) and revealed == sorted(revealed)
    if every:
        hidden = int(len(every) * (1 - ratio))
        assert revealed[-1] == every[-1]  # the last chunk always revealed
        assert len(every) - hidden <= len(revealed) <= len(every) - hidden + 1
    again = objectives.hint_chunks(num_tokens, ratio, torch.Generator().manual_seed(seed), low, high)
    assert again == revealed


def test_hint_chunks_depend_on_the_seed():
    draws = {tuple(objectives.hint_chunks(150, 0.4, torch.Generator().manual_seed(s))) for s in range(10)}
    assert len(draws) > 1


# -----------------------------------------------------------------------------
# The rescue of all-wrong groups

G, GEN_LENGTH = 4, 20
SAMPLER = {"steps": GEN_LENGTH, "gen_length": GEN_LENGTH, "block_length": GEN_LENGTH, "temperature": 1.0,
           "cache": "none", "threshold": None}


class Without(torch.nn.Module):
    """A model that never writes `token` (its logit -1e4): the toy reward below is then decided by hints."""

    def __init__(self, model, token):
        super().__init__()
        self.model, self.token = model, token

    def forward(self, x, attention_mask=None, positions=None):
        logits = self.model(x, attention_mask, positions)
        return logits.index_fill(-1, torch.tensor([self.token]), -1e4)


def has_x(texts, record):
    return ["X" in t for t in texts]


@pytest.fixture
def toy(make_model, tokenizer):
    """Three groups of G rollouts of the X-less model: group 0 all wrong, group 1 one row correct, group 2
    all correct (an X written in); references of 'X's, so every revealed chunk makes a row correct."""
    mask_id = 2
    model = Without(make_model(seed=1), tokenizer.convert_tokens_to_ids("X"))
    records = [{"prompt": [{"role": "user", "content": f"12{k}"}], "prefill": "", "completion": "X" * 30}
               for k in range(3)]
    from generate import generate_records
    sequences, prompt_mask, canvas = generate_records(
        model, tokenizer, [r for r in records for _ in range(G)], SAMPLER, mask_id=mask_id, device="cpu",
        noise_seed=(0, 0, 0))
    P = sequences.shape[1] - GEN_LENGTH
    x = tokenizer.convert_tokens_to_ids("X")
    for row in [G + 2, *range(2 * G, 3 * G)]:
        sequences[row, P] = x
    completion_mask, texts = read_completions(tokenizer, sequences[:, P:], canvas, mask_id)
    assert has_x(texts, None) == [False] * (G + 2) + [True] + [False] + [True] * G
    attention_mask = None if prompt_mask is None else torch.cat(
        [prompt_mask, torch.ones(len(sequences), GEN_LENGTH, dtype=prompt_mask.dtype)], dim=1)
    return model, records, (sequences, attention_mask, canvas, completion_mask, texts), mask_id


def recording_generate(monkeypatch):
    """objectives.generate, each call's canvas and output recorded."""
    calls, real = [], objectives.generate

    def record(model, prompt_ids, **kwargs):
        out = real(model, prompt_ids, **kwargs)
        calls.append((prompt_ids.clone(), kwargs["canvas"].clone(), out.clone()))
        return out
    monkeypatch.setattr(objectives, "generate", record)
    return calls


@pytest.mark.parametrize("max_replacements", [1, 2, 4])
def test_only_all_wrong_groups_are_inpainted(toy, tokenizer, monkeypatch, max_replacements):
    model, records, rollout, mask_id = toy
    sequences, _, _, completion_mask, texts = rollout
    before = (sequences.clone(), completion_mask.clone(), list(texts))
    calls = recording_generate(monkeypatch)
    new, new_mask, new_texts, hint_mask, metrics = objectives.inpaint_zero_std_groups(
        model, tokenizer, records, rollout, has_x, SAMPLER, num_generations=G, mask_id=mask_id,
        noise_seed=(0, 0, 0), free_tail=6, max_replacements=max_replacements, entropy_keep=1.0)
    P = sequences.shape[1] - GEN_LENGTH
    # one sampler call, on group 0's G prompts alone
    assert len(calls) == 1 and torch.equal(calls[0][0], sequences[:G, :P])
    hinted_canvas, hinted = calls[0][1], calls[0][2]
    assert (hinted_canvas != mask_id).any(dim=1).all()  # every hinted row got a hint: an X
    # every hinted row is correct, so exactly max_replacements rows 0..k-1 of group 0 are replaced
    assert metrics == {"igpo_groups": 1.0, "igpo_replaced": float(max_replacements),
                       "igpo_hint_tokens": float((hint_mask & new_mask).sum())}  # in d1's mask
    assert torch.equal(new[max_replacements:], sequences[max_replacements:])  # groups 1, 2 untouched too
    assert new_texts[max_replacements:] == texts[max_replacements:]
    assert torch.equal(new_mask[max_replacements:], completion_mask[max_replacements:])
    assert all(has_x(new_texts[:max_replacements], None))
    assert not hint_mask[max_replacements:].any()
    sources = set()
    for row in range(max_replacements):  # each replaced row: a hinted sample, its hint mask that one's hints
        source = [j for j in range(G) if torch.equal(hinted[j], new[row])]
        assert len(source) == 1
        sources.add(source[0])
        assert torch.equal(hint_mask[row], hinted_canvas[source[0]] != mask_id)
        expected_mask, _ = read_completions(tokenizer, new[row:row + 1, P:], None, mask_id)
        assert torch.equal(new_mask[row], expected_mask[0])  # the hints are actions: in d1's mask
    assert len(sources) == max_replacements
    # the inputs are not modified
    assert torch.equal(sequences, before[0]) and torch.equal(completion_mask, before[1])
    assert texts == before[2] and has_x(texts, None)[:G] == [False] * G


def test_nothing_changes_without_a_correct_hinted_row(toy, tokenizer):
    model, records, rollout, mask_id = toy
    never = lambda texts, record: [False] * len(texts)  # noqa: E731
    new, new_mask, new_texts, hint_mask, metrics = objectives.inpaint_zero_std_groups(
        model, tokenizer, records, rollout, never, SAMPLER, num_generations=G, mask_id=mask_id,
        noise_seed=(0, 0, 0), free_tail=6)
    assert metrics == {"igpo_groups": 3.0, "igpo_replaced": 0.0, "igpo_hint_tokens": 0.0}
    assert torch.equal(new, rollout[0]) and torch.equal(new_mask, rollout[3]) and new_texts == rollout[4]
    assert not hint_mask.any()


def test_a_task_canvas_wins_over_the_hints(toy, tokenizer, monkeypatch):
    model, records, rollout, mask_id = toy
    sequences, attention_mask, _, completion_mask, texts = rollout
    canvas = torch.full((len(sequences), GEN_LENGTH), mask_id)
    canvas[:, 1:4] = tokenizer.convert_tokens_to_ids("7")  # given cells, inside where the hints fall
    calls = recording_generate(monkeypatch)
    new, new_mask, _, hint_mask, _ = objectives.inpaint_zero_std_groups(
        model, tokenizer, records, (sequences, attention_mask, canvas, completion_mask, texts), has_x,
        SAMPLER, num_generations=G, mask_id=mask_id, noise_seed=(0, 0, 0), free_tail=6, entropy_keep=1.0)
    P = sequences.shape[1] - GEN_LENGTH
    assert torch.equal(calls[0][1][:, 1:4], canvas[:G, 1:4])
    replaced = hint_mask.any(dim=1)
    assert replaced.any()
    assert not hint_mask[:, 1:4].any() and (new[replaced][:, P + 1:P + 4] == canvas[0, 1]).all()
    assert not new_mask[replaced][:, 1:4].any()  # given cells are conditioning, as in the plain rollout


def test_entropy_filter_keeps_the_top_hints():
    g = torch.Generator().manual_seed(0)
    entropy = torch.rand(6, 30, generator=g)
    hint_mask = torch.rand(6, 30, generator=g) < 0.5
    hint_mask[0] = False  # a row without hints
    completion_mask = torch.rand(6, 30, generator=g) < 0.8
    for keep in (0.01, 0.2, 0.5, 1.0):
        kept = objectives.keep_top_entropy_hints(entropy, hint_mask, completion_mask, keep)
        assert torch.equal(kept & ~hint_mask, completion_mask & ~hint_mask)  # non-hints untouched
        for i in range(6):
            candidates = [t for t in range(30) if hint_mask[i, t] and completion_mask[i, t]]
            if not candidates:
                assert torch.equal(kept[i], completion_mask[i])
                continue
            top = sorted(candidates, key=lambda t: -float(entropy[i, t]))
            top = top[:max(1, int(len(candidates) * keep))]
            assert [t for t in range(30) if kept[i, t] and hint_mask[i, t]] == sorted(top)


def test_hint_entropy_is_the_predictive_entropy(make_model):
    model, mask_id, P = make_model(seed=2), 2, 5
    g = torch.Generator().manual_seed(0)
    sequences = torch.randint(10, 90, (3, P + 8), generator=g)
    given = torch.zeros(3, 8, dtype=torch.bool)
    given[1, 2] = True
    entropy = objectives.hint_entropy(model, sequences, None, given, P, mask_id)
    for i in range(3):
        x = sequences[i].clone()
        x[P:][~given[i]] = mask_id  # IGPO's estimator input: every action masked, the prompt clean
        p = torch.softmax(model(x[None], None, slice(None)).double()[0, P:], dim=-1)
        assert torch.allclose(entropy[i].double(), -(p * p.log()).sum(dim=-1), atol=1e-5)


def test_correctness_is_full_marks():
    record = data.load_examples("tiny_sudoku", "rl", limit=1)[0]
    solution = record["completion"]
    wrong = ("1" if solution[0] != "1" else "2") + solution[1:]
    assert objectives.correctness("tiny_sudoku")([solution, wrong, ""], record) == [True, False, False]


# -----------------------------------------------------------------------------
# grpo.py


def test_grpo_runs_and_logs_the_counts(start, tmp_path):
    out = tmp_path / "igpo"
    run_script("grpo.py", "--model", start, *TWO_STEPS, "--inpaint-zero-std-groups",
               "--inpaint-max-replacements", 2, "--out-dir", out)
    records = read_metrics(out)
    assert len(records) == 2
    for r in records:
        assert math.isfinite(r["loss"]) and 0 <= r["igpo_groups"] <= 2
        assert 0 <= r["igpo_replaced"] <= 2 * r["igpo_groups"]
        assert r["igpo_hint_tokens"] >= 0
    assert sum(r["igpo_replaced"] for r in records) > 0  # the digit model fails some groups, and hints rescue


@pytest.mark.parametrize("flags, message", [
    (["--inpaint-ratio-low", 0], "0 < low <= high < 1"),
    (["--inpaint-ratio-low", 0.7], "0 < low <= high < 1"),
    (["--inpaint-chunk-min", 6, "--inpaint-chunk-max", 5], "1 <= min <= max"),
    (["--inpaint-max-replacements", 9], "1 to 8"),
    (["--inpaint-entropy-keep", 0], "a share in (0, 1]"),
    (["--inpaint-free-tail", -1], ">= 0"),
    (["--estimator", "stepmerge"], "a hint was never sampled"),
    (["--task", "s1k"], "has no correctness reward"),
])
def test_refuses_what_igpo_cannot_run(tmp_path, flags, message):
    run = run_script("grpo.py", "--inpaint-zero-std-groups", *flags, "--out-dir", tmp_path, expect_ok=False)
    assert_clean_error(run, message)
