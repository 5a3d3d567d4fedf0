"""
Guards checkpoint.resume, the one resume routine of sft.py and grpo.py, in one process on a tiny model:

- it loads the newest checkpoint's weights, optimizer and this rank's RNG state, and says so;
- write_checkpoint keeps the newest --keep-checkpoints checkpoints;
- a newest checkpoint whose weights file is damaged (truncated, as by a full disk) falls back to the
  previous one, saying so; when none can be read it stops with a message, not a safetensors error;
- a resume whose settings change the run is refused, naming each changed flag (what a tired user does:
  `--resume --num-generations 4` on a run trained with 8); flags that only extend the run may change;
- a resume with another world size is refused;
- rng_state / set_rng_state round-trip torch's global RNG.
"""

import json
import os

import pytest
import torch

import checkpoint as C

ARGS = {"num_generations": 8, "lr": 1e-3, "max_steps": 10, "save_every": 2, "resume": False, "out_dir": "x"}


def tiny_run(make_model, tokenizer, out_dir, steps, keep=2, world_size=1):
    """A model trained a few AdamW steps, checkpointed after each. Returns (model, optimizer)."""
    model = make_model(seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    for step in range(1, steps + 1):
        model(ids).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        C.write_checkpoint(str(out_dir), step, model, tokenizer, "tiny",
                           {"optimizer": optimizer.state_dict(), "rng": [C.rng_state()] * world_size,
                            "marker": step}, ARGS, keep)
    return model, optimizer


def fresh(make_model):
    model = make_model(seed=2)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def test_resume_loads_the_newest_and_keeps_two(make_model, tokenizer, tmp_path):
    trained, trained_optimizer = tiny_run(make_model, tokenizer, tmp_path, 3)
    assert sorted(os.listdir(tmp_path)) == [f"{C.CHECKPOINT_PREFIX}{s:06d}" for s in (2, 3)]
    model, optimizer = fresh(make_model)
    said = []
    saved_rng = C.load_trainer_state(
        str(tmp_path / f"{C.CHECKPOINT_PREFIX}000003"))["trainer_state"]["rng"][0]
    torch.manual_seed(999)  # resume must replace this stream by the saved one
    step, state = C.resume(str(tmp_path), dict(ARGS, max_steps=20, resume=True), model, optimizer, 0, 1,
                           said.append)
    resumed_draw = torch.rand(3)
    C.set_rng_state(saved_rng)
    assert torch.equal(resumed_draw, torch.rand(3))
    assert step == 3 and state["marker"] == 3
    assert said == [f"resumed from {tmp_path / (C.CHECKPOINT_PREFIX + '000003')} at step 3"]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), trained.parameters()))
    resumed, trained_state = optimizer.state_dict()["state"], trained_optimizer.state_dict()["state"]
    assert resumed.keys() == trained_state.keys()
    for i in trained_state:
        assert all(torch.equal(torch.as_tensor(resumed[i][k]), torch.as_tensor(v))
                   for k, v in trained_state[i].items())


def test_keep_checkpoints_one(make_model, tokenizer, tmp_path):
    tiny_run(make_model, tokenizer, tmp_path, 3, keep=1)
    assert os.listdir(tmp_path) == [f"{C.CHECKPOINT_PREFIX}{3:06d}"]


def test_no_checkpoint_starts_from_zero(make_model, tmp_path):
    said = []
    assert C.resume(str(tmp_path), ARGS, *fresh(make_model), 0, 1, said.append) == (0, None)
    assert "no checkpoint" in said[0]


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(make_model, tokenizer, tmp_path):
    tiny_run(make_model, tokenizer, tmp_path, 3)
    weights = tmp_path / f"{C.CHECKPOINT_PREFIX}000003" / "model" / C.WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    said = []
    step, state = C.resume(str(tmp_path), ARGS, *fresh(make_model), 0, 1, said.append)
    assert step == 2 and state["marker"] == 2
    assert f"cannot read {tmp_path / (C.CHECKPOINT_PREFIX + '000003')}" in said[0]
    assert "trying the previous checkpoint" in said[0]
    assert said[-1].startswith("resumed from") and said[-1].endswith("at step 2")
    # and when no checkpoint can be read: a message that says what to do
    (tmp_path / f"{C.CHECKPOINT_PREFIX}000002" / "trainer_state.pt").write_bytes(b"\0" * 10)
    with pytest.raises(SystemExit, match="none of the 2 checkpoints .* can be read"):
        C.resume(str(tmp_path), ARGS, *fresh(make_model), 0, 1, said.append)


def test_a_resume_that_changes_the_run_is_refused_naming_each_flag(make_model, tokenizer, tmp_path):
    tiny_run(make_model, tokenizer, tmp_path, 2)
    with pytest.raises(SystemExit) as refusal:
        C.resume(str(tmp_path), dict(ARGS, num_generations=4, lr=3e-4, resume=True), *fresh(make_model), 0, 1)
    message = str(refusal.value)
    assert "--num-generations 8 -> 4" in message and "--lr 0.001 -> 0.0003" in message
    assert "--max-steps" in message  # the list of what may change
    # extending the run, moving its folder, saving more often: allowed; a flag newer than the checkpoint:
    # ignored
    allowed = dict(ARGS, max_steps=50, save_every=1, out_dir="y", resume=True, keep_checkpoints=5, new_flag=1)
    assert C.resume(str(tmp_path), allowed, *fresh(make_model), 0, 1)[0] == 2


def test_a_resume_with_another_world_size_is_refused(make_model, tokenizer, tmp_path):
    tiny_run(make_model, tokenizer, tmp_path, 1, world_size=2)
    with pytest.raises(SystemExit, match="2 ranks, this one has 1"):
        C.resume(str(tmp_path), ARGS, *fresh(make_model), 0, 1)
    with open(tmp_path / f"{C.CHECKPOINT_PREFIX}000001" / "state.json") as f:
        assert json.load(f)["args"] == ARGS


def test_rng_state_round_trip():
    torch.manual_seed(3)
    state = C.rng_state()
    a = torch.rand(3)
    C.set_rng_state(state)
    assert torch.equal(torch.rand(3), a)
