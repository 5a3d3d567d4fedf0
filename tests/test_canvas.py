"""
Guards infilling: a sampler that starts from a canvas (the tiny Sudoku's answer grid with the given cells
written) keeps the canvas tokens, fills only its masks, spends forward passes only on steps that commit
something, and `data.encode_canvas` turns a record's canvas text into those starting tokens.
"""

import torch

import checkpoint as C
import data
from generate import generate


class CountingModel(torch.nn.Module):
    """Wraps a model and counts its forward passes."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, input_ids, attention_mask=None, positions=slice(None)):
        self.calls += 1
        return self.inner(input_ids, attention_mask, positions)


def test_canvas_tokens_are_kept_and_only_masks_are_filled():
    tokenizer = C.build_tiny_tokenizer()
    model = CountingModel(C.build_model("tiny", tokenizer, seed=3).eval())
    mask_id = C.mask_token_id(tokenizer)
    example = data.load_examples("tiny_sudoku", "test", limit=4)[0]
    canvas = torch.tensor([data.encode_canvas(tokenizer, example, 20, mask_id)] * 3)
    prompt = torch.tensor([data.encode_prompt(tokenizer, example["prompt"])] * 3)
    out = generate(model, prompt, steps=20, gen_length=20, block_length=20, temperature=1.0, mask_id=mask_id,
                   generator=torch.Generator().manual_seed(0), canvas=canvas)
    completion = out[:, prompt.shape[1]:]
    fixed = canvas != mask_id
    assert torch.equal(completion[fixed], canvas[fixed])
    assert not (completion == mask_id).any()
    # one token per step for the blanks, and no forward pass for the steps with nothing to commit
    assert model.calls == int((canvas[0] == mask_id).sum()) < 20


def test_an_all_mask_canvas_is_the_plain_sampler():
    tokenizer = C.build_tiny_tokenizer()
    model = C.build_model("tiny", tokenizer, seed=4).eval()
    mask_id = C.mask_token_id(tokenizer)
    prompt = torch.randint(10, 40, (2, 6), generator=torch.Generator().manual_seed(1))
    plain = generate(model, prompt, 8, 8, 4, mask_id=mask_id)
    canvas = generate(model, prompt, 8, 8, 4, mask_id=mask_id, canvas=torch.full((2, 8), mask_id))
    assert torch.equal(plain, canvas)


def test_encode_canvas():
    tokenizer = C.build_tiny_tokenizer()
    mask_id = C.mask_token_id(tokenizer)
    example = data.load_examples("tiny_sudoku", "sft", limit=1)[0]
    ids = data.encode_canvas(tokenizer, example, 24, mask_id)
    blanks = example["puzzle"].count("0")
    assert len(ids) == 24
    assert ids[:19].count(mask_id) == blanks  # the blank cells
    assert ids[19] == tokenizer.eos_token_id  # the answer's end is fixed too
    assert ids[20:] == [mask_id] * 4  # room left over stays masked
    assert (tokenizer.decode([t for t in ids[:19] if t != mask_id])
            == example["canvas"].replace(data.CANVAS_BLANK, ""))
    assert data.encode_canvas(tokenizer, {"canvas": None}, 24, mask_id) is None
    try:
        data.encode_canvas(tokenizer, example, 10, mask_id)
    except ValueError as err:
        assert "does not fit" in str(err)
    else:
        raise AssertionError("a canvas longer than gen_length must be refused")


def test_tiny_sudoku_canvas_matches_the_puzzle():
    for example in data.load_examples("tiny_sudoku", "test", limit=20):
        canvas = example["canvas"].replace("\n", "")
        assert len(canvas) == 16
        for given, cell in zip(example["puzzle"], canvas):
            assert cell == (data.CANVAS_BLANK if given == "0" else given)
