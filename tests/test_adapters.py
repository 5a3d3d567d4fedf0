"""
Guards loading LoRA adapters trained elsewhere, d1's released ones in particular (checkpoint.py's
load_adapter, adapter_base and merge, and the --base-model flag of checkpoint.py merge, grpo.py, evaluate.py).

d1 trained with PEFT, target_modules listing Llama's seven names; LLaDA calls three of them otherwise, so PEFT
adapted q_proj, k_proj, v_proj and up_proj alone. An adapter written in that shape (by save_adapter, its
config then given d1's target list and the base's hub id) must:
- load with exactly one warning naming o_proj, gate_proj and down_proj, giving the logits of the same adapter
  saved with its four real names; tensors a file holds for a skipped name are ignored, others still refused;
- need a local base folder: without --base-model a clear error naming the hub id and the flag; with it, loads,
  merges (`checkpoint.py merge ... --base-model DIR`), trains a GRPO step whose saved adapter names the folder
  used, and evaluates;
and an adapter whose targets all match nothing is refused, as is an unknown name in a user's --lora-targets.
"""

import glob
import json
import os
import shutil
import warnings

import pytest
import torch
from helpers import assert_clean_error, digit_checkpoint, run_script
from safetensors import safe_open
from safetensors.torch import save_file

import checkpoint as C
import model as M

HUB_ID = "GSAI-ML/LLaDA-8B-Instruct"  # what d1's adapter_config.json names as its base
D1_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MATCHED = ["q_proj", "k_proj", "v_proj", "up_proj"]  # the four PEFT found in LLaDA
SKIPPED = ["o_proj", "gate_proj", "down_proj"]
WARNED = r"target_modules \['o_proj', 'gate_proj', 'down_proj'\] match no module"


def logits_of(model, ids):
    with torch.no_grad():
        return model.eval()(ids)


def set_targets(path, targets):
    config_path = os.path.join(path, C.ADAPTER_CONFIG_NAME)
    with open(config_path) as f:
        config = json.load(f)
    config["target_modules"] = targets
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)


def copy_adapter(source, path, targets):
    shutil.copytree(source, path)
    set_targets(str(path), targets)
    return str(path)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return digit_checkpoint(tmp_path_factory.mktemp("adapters") / "base")


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    """(d1-shaped adapter folder, the model it was saved from): LoRA on the four matched names with random B,
    saved in PEFT's format naming the base by its hub id, its config then listing d1's seven targets."""
    model = M.add_lora(C.load_model(base), r=4, alpha=8, targets=tuple(MATCHED))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, m in M.lora_modules(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    path = str(tmp_path_factory.mktemp("adapters") / "d1")
    C.save_adapter(model, path, HUB_ID)
    set_targets(path, D1_TARGETS)
    return path, model


@pytest.fixture(scope="module")
def ids(base):
    vocab_size = C.read_config(base).vocab_size
    return torch.randint(0, vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))


def test_d1_targets_load_with_one_warning_and_the_logits_of_the_matched_names(base, trained, ids, tmp_path):
    adapter, model = trained
    with open(os.path.join(adapter, C.ADAPTER_CONFIG_NAME)) as f:
        config = json.load(f)
    assert config["base_model_name_or_path"] == HUB_ID and config["target_modules"] == D1_TARGETS
    with pytest.warns(UserWarning) as caught:
        loaded = C.load_model(adapter, base=base)
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert str(SKIPPED) in str(caught[0].message) and adapter in str(caught[0].message)
    assert loaded.lora_config["target_modules"] == MATCHED
    assert sorted(n for n, _ in M.lora_modules(loaded)) == sorted(
        f"blocks.{i}.{t}" for i in range(loaded.cfg.n_layers) for t in MATCHED)

    four = copy_adapter(adapter, tmp_path / "four", MATCHED)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        four_loaded = C.load_model(four, base=base)
    assert not caught, [str(w.message) for w in caught]
    assert torch.equal(logits_of(loaded, ids), logits_of(four_loaded, ids))
    assert torch.equal(logits_of(loaded, ids), logits_of(model, ids))
    assert not torch.equal(logits_of(loaded, ids), logits_of(C.load_model(base), ids))  # the adapter acts
    assert C.load_tokenizer(adapter, base)("7")["input_ids"] == C.load_tokenizer(base)("7")["input_ids"]


def test_tensors_saved_for_skipped_targets_are_ignored(base, trained, ids, tmp_path):
    """PEFT saves none for a name it skipped; a file that does hold some loads the same, the warning counting
    them; a tensor for a module that is neither adapted nor a skipped name is still refused."""
    adapter, model = trained
    robust = copy_adapter(adapter, tmp_path / "robust", D1_TARGETS)
    weights_path = os.path.join(robust, C.ADAPTER_WEIGHTS_NAME)
    with safe_open(weights_path, framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    extra = {C.peft_name("blocks.0.o_proj", "lora_A"): torch.ones(4, model.cfg.d_model),
             C.peft_name("blocks.0.o_proj", "lora_B"): torch.ones(model.cfg.d_model, 4)}
    save_file({**state, **extra}, weights_path)
    with pytest.warns(UserWarning, match="2 tensors saved for them ignored") as caught:
        loaded = C.load_model(robust, base=base)
    assert len(caught) == 1
    assert torch.equal(logits_of(loaded, ids), logits_of(model, ids))

    stray = {C.peft_name("blocks.0.attn_out", "lora_A"): torch.ones(4, model.cfg.d_model)}
    save_file({**state, **stray}, weights_path)
    with pytest.raises(KeyError, match="blocks.0.attn_out"):
        C.load_model(robust, base=base)


def test_adapter_whose_targets_match_nothing_is_refused(base, trained, tmp_path):
    nothing = copy_adapter(trained[0], tmp_path / "nothing", SKIPPED)
    with pytest.raises(ValueError) as error:
        C.load_model(nothing, base=base)
    for name in SKIPPED + list(M.LORA_TARGETS):  # the targets, and the names the model has
        assert name in str(error.value)


def test_user_lora_targets_still_refuse_unknown_names(make_model):
    with pytest.raises(ValueError, match=r"unknown LoRA targets \['o_proj'\].*attn_out"):
        M.add_lora(make_model(), r=4, alpha=8, targets=("o_proj",))


def test_a_hub_id_base_needs_a_local_folder(base, trained, tmp_path):
    adapter, _ = trained
    for load in (C.load_model, C.load_tokenizer, C.adapter_base):
        with pytest.raises(FileNotFoundError, match=f"{HUB_ID}.*not a local folder.*--base-model DIR"):
            load(adapter)
    assert C.adapter_base(adapter, base) == base
    with pytest.raises(FileNotFoundError, match="--base-model .* is not a folder"):
        C.adapter_base(adapter, str(tmp_path / "missing"))


def test_merge_takes_base_model(base, trained, ids, tmp_path):
    adapter, model = trained
    merged = tmp_path / "merged"
    run = run_script("checkpoint.py", "merge", adapter, merged, expect_ok=False)
    assert_clean_error(run, HUB_ID, "--base-model DIR")
    assert not merged.exists()
    with pytest.warns(UserWarning, match=WARNED):
        run = run_script("checkpoint.py", "merge", adapter, merged, "--base-model", base)
    assert f"merged {adapter} into {base}" in run.stdout
    merged_model = C.load_model(str(merged))
    assert not M.lora_modules(merged_model)
    torch.testing.assert_close(logits_of(merged_model, ids), logits_of(model, ids), rtol=0, atol=1e-5)


def test_grpo_continues_a_d1_adapter_given_base_model(base, trained, tmp_path):
    """One step from the d1-shaped adapter: the adapter and the checkpoint it writes name the base folder that
    --base-model gave (not the hub id), and list the four names that were adapted."""
    out = tmp_path / "grpo"
    with pytest.warns(UserWarning, match=WARNED):
        run_script("grpo.py", "--model", trained[0], "--base-model", base, "--prompts-per-step", 2,
                   "--num-generations", 2, "--num-iterations", 1, "--max-steps", 1, "--eval-examples", 0,
                   "--eval-every", 0, "--save-every", 0, "--out-dir", out)
    for folder in (out, out / f"{C.CHECKPOINT_PREFIX}000001" / "adapter"):
        with open(folder / C.ADAPTER_CONFIG_NAME) as f:
            config = json.load(f)
        assert config["base_model_name_or_path"] == os.path.abspath(base)
        assert config["target_modules"] == MATCHED
    assert M.lora_modules(C.load_model(str(out)))  # loads with no flag: the saved base is a folder


def test_evaluate_takes_base_model(base, trained, tmp_path):
    out = tmp_path / "eval"
    with pytest.warns(UserWarning, match=WARNED):
        run_script("evaluate.py", "--model", trained[0], "--base-model", base, "--task", "tiny_sudoku",
                   "--limit", 2, "--output-dir", out)
    assert len(glob.glob(os.path.join(out, "*_generations.json"))) == 1
