"""
Guards model.py (the LLaDA-compatible network, LoRA) and checkpoint.py (everything about its files).

- the forward pass: shapes (B, L, V), bidirectional attention, the key-padding attention mask, RMSNorm in
  fp32, RoPE's rotate-half layout, gradient checkpointing;
- checkpoints in LLaDA's published layout: sharded and single-file writes under LLaDA's tensor names and
  config.json fields, exact round trips, a hand-written "downloaded" checkpoint that must give the logits
  of an independent slow reference forward, and clear errors for broken folders;
- the offline tiny tokenizer: round trips, special ids, chat template, files that transformers reads;
- LoRA: identity at init, what trains, adapters switched off, PEFT's adapter format, merged export;
- the masked-diffusion primitives (sft.py's forward_mask and sft_loss against a slow loop, grpo.py's
  token_logprobs).
"""

import json
import math
import os
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import checkpoint as C
import data
import grpo
import model as M
import sft

PREFIX = "model.transformer."
BLOCK_TENSORS = ("attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm", "ff_proj", "up_proj",
                 "ff_out")


def random_ids(cfg, B, L, seed=0):
    """Random token ids (B, L) from the whole vocabulary (special ids included: any id is a valid input)."""
    return torch.randint(0, cfg.vocab_size, (B, L), generator=torch.Generator().manual_seed(seed))


def llada_shapes(cfg):
    """LLaDA's tensor names and shapes for a config, written out independently of model.py."""
    head_dim = cfg["d_model"] // cfg["n_heads"]
    kv_dim = cfg["n_kv_heads"] * head_dim
    d, h, e = cfg["d_model"], cfg["mlp_hidden_size"], cfg["embedding_size"]
    shapes = {PREFIX + "wte.weight": (e, d), PREFIX + "ln_f.weight": (d,), PREFIX + "ff_out.weight": (e, d)}
    for i in range(cfg["n_layers"]):
        b = f"{PREFIX}blocks.{i}."
        shapes.update({b + "attn_norm.weight": (d,), b + "q_proj.weight": (d, d),
                       b + "k_proj.weight": (kv_dim, d), b + "v_proj.weight": (kv_dim, d),
                       b + "attn_out.weight": (d, d), b + "ff_norm.weight": (d,),
                       b + "ff_proj.weight": (h, d), b + "up_proj.weight": (h, d),
                       b + "ff_out.weight": (d, h)})
    return shapes


def logits_of(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs)


# -----------------------------------------------------------------------------
# The forward pass


def test_logits_shape_and_padded_embedding(make_model):
    model = make_model(embedding_size=128)  # LM head padded beyond the vocabulary, as LLaDA allows
    ids = random_ids(model.cfg, 3, 11)
    logits = logits_of(model, ids)
    assert logits.shape == (3, 11, model.cfg.vocab_size)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_positions_keep_the_logits_of_a_slice(make_model):
    """The sampler and the estimator ask for a block or the completion only: the same numbers as the full
    logits sliced, whatever the slice."""
    model = make_model()
    ids = random_ids(model.cfg, 3, 11)
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :2] = 0
    full = logits_of(model, ids, attention_mask=attention_mask)
    for positions in (slice(4, 8), slice(7, None), slice(None)):
        torch.testing.assert_close(logits_of(model, ids, attention_mask=attention_mask, positions=positions),
                                   full[:, positions], rtol=1e-5, atol=1e-5)
    assert logits_of(model, ids, positions=slice(4, 8)).shape == (3, 4, model.cfg.vocab_size)


def test_attention_is_bidirectional(make_model):
    """Changing the LAST token changes the logits at the FIRST position: no causal mask."""
    model = make_model()
    ids = random_ids(model.cfg, 1, 12)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % model.cfg.vocab_size
    a, b = logits_of(model, ids), logits_of(model, changed)
    assert (a[0, 0] - b[0, 0]).abs().max() > 1e-4
    assert (a[0, :-1] - b[0, :-1]).abs().amax(dim=-1).min() > 1e-6  # every earlier position moved


def test_attention_mask_all_ones_equals_no_mask(make_model):
    model = make_model()
    ids = random_ids(model.cfg, 2, 10)
    torch.testing.assert_close(logits_of(model, ids, attention_mask=torch.ones_like(ids)),
                               logits_of(model, ids), rtol=0, atol=1e-5)


def test_masked_keys_do_not_influence_other_positions(make_model):
    """Left padding hidden by attention_mask: changing the padded tokens leaves every other position's
    logits unchanged (while, without the mask, the same change does move them)."""
    model = make_model()
    ids = random_ids(model.cfg, 2, 10)
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :3] = 0  # row 0: 3 pad positions on the left
    attention_mask[1, :1] = 0
    changed = ids.clone()
    changed[0, :3] = (ids[0, :3] + 7) % model.cfg.vocab_size
    changed[1, :1] = (ids[1, :1] + 7) % model.cfg.vocab_size
    a = logits_of(model, ids, attention_mask=attention_mask)
    b = logits_of(model, changed, attention_mask=attention_mask)
    torch.testing.assert_close(a[0, 3:], b[0, 3:], rtol=0, atol=1e-6)
    torch.testing.assert_close(a[1, 1:], b[1, 1:], rtol=0, atol=1e-6)
    # the test can fail: without the mask the padded tokens are seen
    assert (logits_of(model, ids)[0, 3:] - logits_of(model, changed)[0, 3:]).abs().max() > 1e-4


def test_rmsnorm_normalises_in_fp32():
    """A bf16 input gives the fp32 computation cast to bf16 (then scaled by the weight), as LLaDA's
    RMSLayerNorm does, not a bf16 computation."""
    torch.manual_seed(0)
    dim = 64
    norm = M.RMSNorm(dim, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim))
    norm = norm.to(torch.bfloat16)
    x = (torch.randn(8, dim) * torch.logspace(-2, 2, dim)).to(torch.bfloat16)  # wide dynamic range
    xf = x.float()
    expected = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)
    # the test can fail: a computation in bf16 gives different numbers on this input
    in_bf16 = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert not torch.equal(out, in_bf16)


def slow_rope(x, theta):
    """RoPE, rotate-half layout, one (position, pair) at a time: the pair (i, i + D/2) at position m is
    rotated by the angle m * theta^(-2i/D). x (L, D) -> (L, D), in float64."""
    L, D = x.shape
    out = torch.empty(L, D, dtype=torch.float64)
    for m in range(L):
        for i in range(D // 2):
            angle = m * theta ** (-2.0 * i / D)
            a, b = float(x[m, i]), float(x[m, i + D // 2])
            out[m, i] = a * math.cos(angle) - b * math.sin(angle)
            out[m, i + D // 2] = b * math.cos(angle) + a * math.sin(angle)
    return out


def test_rope_rotate_half_layout_matches_slow_reference():
    torch.manual_seed(0)
    L, D, theta = 9, 16, 10000.0
    q = torch.randn(2, 3, L, D)  # (B, H, L, D)
    cos, sin = M.rope_cos_sin(L, D, theta, "cpu")
    fast = q * cos + M.rotate_half(q) * sin
    for b in range(2):
        for h in range(3):
            torch.testing.assert_close(fast[b, h].double(), slow_rope(q[b, h], theta), rtol=0, atol=1e-5)


def test_rope_scores_depend_on_relative_position_only():
    torch.manual_seed(0)
    D = 8
    q, k = torch.randn(D), torch.randn(D)
    cos, sin = M.rope_cos_sin(12, D, 500000.0, "cpu")
    rot = lambda v, m: v * cos[m] + M.rotate_half(v) * sin[m]  # noqa: E731
    assert torch.allclose(rot(q, 5) @ rot(k, 2), rot(q, 10) @ rot(k, 7), atol=1e-5)
    assert not torch.allclose(rot(q, 5) @ rot(k, 2), rot(q, 5) @ rot(k, 4), atol=1e-3)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(make_model):
    ids = random_ids(make_model().cfg, 2, 8)
    grads = []
    for checkpointing in (False, True):
        model = make_model().train()
        model.gradient_checkpointing = checkpointing
        loss = F.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-6)
    for name, g in grads[0][1].items():
        torch.testing.assert_close(g, grads[1][1][name], rtol=1e-5, atol=1e-7)


# -----------------------------------------------------------------------------
# Checkpoints written by save_model


def test_sharded_checkpoint_layout_and_exact_round_trip(make_model, tokenizer, tmp_path):
    model = make_model(seed=1)
    cfg = model.cfg
    path = tmp_path / "ckpt"
    C.save_model(model, tokenizer, str(path), max_shard_bytes=20_000, extra_files={"args.json": {"lr": 1e-3}})

    files = sorted(os.listdir(path))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors" not in files
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary folder left behind
    with open(path / "args.json") as f:
        assert json.load(f) == {"lr": 1e-3}

    # config.json: the fields LLaDA's configuration_llada.py reads
    with open(path / "config.json") as f:
        config = json.load(f)
    for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size",
                "embedding_size", "rope_theta", "rms_norm_eps", "mask_token_id", "eos_token_id",
                "pad_token_id", "max_sequence_length"):
        assert config[key] == getattr(cfg, key), key
    assert config["rope"] is True and config["alibi"] is False and config["weight_tying"] is False
    assert config["block_type"] == "llama" and config["activation_type"] == "silu"
    assert config["layer_norm_type"] == "rms" and config["include_bias"] is False
    assert (config["model_type"] == "llada"
            and config["auto_map"]["AutoModel"] == "modeling_llada.LLaDAModelLM")

    # the index maps every tensor, under LLaDA's names, to the shard that holds it
    with open(path / "model.safetensors.index.json") as f:
        index = json.load(f)
    expected = llada_shapes(config)
    assert set(index["weight_map"]) == set(expected)
    assert set(index["weight_map"].values()) == set(shards)
    total = 0
    for shard in shards:
        assert os.path.getsize(path / shard) < 20_000 + 4096  # header aside, within the budget
        with safe_open(str(path / shard), framework="pt") as f:
            for key in f.keys():
                assert index["weight_map"][key] == shard
                tensor = f.get_tensor(key)
                assert tuple(tensor.shape) == expected[key], key
                total += tensor.numel() * tensor.element_size()
    assert index["metadata"]["total_size"] == total

    ids = random_ids(cfg, 2, 13)
    loaded = C.load_model(str(path)).eval()
    assert loaded.cfg == cfg
    assert torch.equal(logits_of(loaded, ids), logits_of(model, ids))
    C.save_model(loaded, tokenizer, str(tmp_path / "again"), max_shard_bytes=20_000)
    reloaded = C.load_model(str(tmp_path / "again")).eval()
    assert torch.equal(logits_of(reloaded, ids), logits_of(model, ids))
    assert C.load_tokenizer(str(path))("12+3")["input_ids"] == tokenizer("12+3")["input_ids"]


def test_single_file_checkpoint_and_overwrite(make_model, tokenizer, tmp_path):
    model = make_model(seed=2)
    path = str(tmp_path / "ckpt")
    C.save_model(model, tokenizer, path)
    files = os.listdir(path)
    assert "model.safetensors" in files and "model.safetensors.index.json" not in files
    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(llada_shapes(model.cfg.to_llada()))
    ids = random_ids(model.cfg, 2, 7)
    assert torch.equal(logits_of(C.load_model(path).eval(), ids), logits_of(model, ids))
    # writing over an existing checkpoint replaces it
    other = make_model(seed=3)
    C.save_model(other, tokenizer, path)
    assert torch.equal(logits_of(C.load_model(path).eval(), ids), logits_of(other, ids))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_load_model_converts_dtype(make_model, tokenizer, tmp_path):
    model = make_model()
    C.save_model(model, tokenizer, str(tmp_path / "ckpt"))
    loaded = C.load_model(str(tmp_path / "ckpt"), dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert all(torch.equal(p, q.bfloat16()) for p, q in zip(loaded.parameters(), model.parameters()))


# -----------------------------------------------------------------------------
# A checkpoint written by hand, as a user's downloaded LLaDA folder would be


def hand_config(**overrides):
    """A config.json in LLaDA's format, with fields model.py does not use (they must be ignored)."""
    config = {"architectures": ["LLaDAModelLM"], "model_type": "llada", "activation_type": "silu",
              "alibi": False, "block_type": "llama", "d_model": 32, "n_layers": 2, "n_heads": 4,
              "n_kv_heads": 2, "mlp_hidden_size": 40, "mlp_ratio": 4, "vocab_size": 50, "embedding_size": 64,
              "rope": True, "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "layer_norm_type": "rms",
              "include_bias": False, "weight_tying": False, "mask_token_id": 49, "eos_token_id": 48,
              "pad_token_id": 48, "max_sequence_length": 64, "flash_attention": False,
              "precision": "amp_bf16", "init_device": "meta", "use_cache": False}
    config.update(overrides)
    return config


def hand_tensors(config, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in llada_shapes(config).items():
        if key.endswith("norm.weight") or key.endswith("ln_f.weight"):
            t = 1.0 + 0.2 * torch.randn(shape, generator=g)
        elif key.endswith("wte.weight"):
            t = torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        tensors[key] = t.to(dtype)
    return tensors


def write_checkpoint(path, config, tensors, num_shards=2):
    """config.json + num_shards safetensors files (+ index when sharded), written with safetensors
    directly."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    keys = list(tensors)
    if num_shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i in range(num_shards):
        name = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::num_shards]}
        save_file(part, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


def reference_forward(tensors, config, ids):
    """LLaDA's forward pass written out slowly from the raw tensors, in float64: pre-RMSNorm blocks, RoPE
    (rotate-half, theta from config.json) on queries and keys, bidirectional softmax attention with
    grouped key/value heads, SwiGLU (silu(ff_proj x) * up_proj x, then ff_out), final ln_f and the untied
    LM head ff_out. ids (L,) -> logits (L, embedding_size)."""
    T = {k: v.double() for k, v in tensors.items()}
    n_heads, n_kv = config["n_heads"], config["n_kv_heads"]
    head_dim = config["d_model"] // n_heads
    eps, theta = config["rms_norm_eps"], config["rope_theta"]

    def rms_norm(x, w):
        return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    x = T[PREFIX + "wte.weight"][ids]  # (L, d)
    for i in range(config["n_layers"]):
        b = f"{PREFIX}blocks.{i}."
        h = rms_norm(x, T[b + "attn_norm.weight"])
        q, k, v = h @ T[b + "q_proj.weight"].T, h @ T[b + "k_proj.weight"].T, h @ T[b + "v_proj.weight"].T
        heads = []
        for head in range(n_heads):
            kv_head = head // (n_heads // n_kv)
            qh = slow_rope(q[:, head * head_dim:(head + 1) * head_dim], theta)
            kh = slow_rope(k[:, kv_head * head_dim:(kv_head + 1) * head_dim], theta)
            vh = v[:, kv_head * head_dim:(kv_head + 1) * head_dim]
            scores = qh @ kh.T / math.sqrt(head_dim)  # (L, L), no mask at all
            heads.append(torch.softmax(scores, dim=-1) @ vh)
        x = x + torch.cat(heads, dim=-1) @ T[b + "attn_out.weight"].T
        h = rms_norm(x, T[b + "ff_norm.weight"])
        gate, up = h @ T[b + "ff_proj.weight"].T, h @ T[b + "up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ T[b + "ff_out.weight"].T
    return rms_norm(x, T[PREFIX + "ln_f.weight"]) @ T[PREFIX + "ff_out.weight"].T


def test_hand_written_llada_checkpoint_matches_slow_reference(tmp_path):
    config = hand_config()
    tensors = hand_tensors(config)
    path = str(tmp_path / "downloaded")
    write_checkpoint(path, config, tensors, num_shards=3)
    model = C.load_model(path).eval()
    assert model.cfg.rope_theta == config["rope_theta"] and model.cfg.n_kv_heads == config["n_kv_heads"]
    ids = torch.randint(0, config["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(0))
    logits = logits_of(model, ids)
    assert logits.shape == (2, 10, config["vocab_size"])
    for row in range(2):
        expected = reference_forward(tensors, config, ids[row])[:, : config["vocab_size"]]
        torch.testing.assert_close(logits[row].double(), expected, rtol=1e-4, atol=1e-4)


def test_hand_written_single_file_checkpoint_loads(tmp_path):
    config = hand_config(n_kv_heads=4, embedding_size=50)
    tensors = hand_tensors(config, seed=1, dtype=torch.float32)
    write_checkpoint(str(tmp_path / "c"), config, tensors, num_shards=1)
    model = C.load_model(str(tmp_path / "c")).eval()
    ids = torch.arange(12)[None]
    torch.testing.assert_close(logits_of(model, ids)[0].double(), reference_forward(tensors, config, ids[0]),
                               rtol=1e-4, atol=1e-4)


def test_config_without_mlp_hidden_size_uses_mlp_ratio(tmp_path):
    """LLaDA's code reads the MLP width as mlp_hidden_size, or mlp_ratio * d_model when that is null."""
    config = hand_config(mlp_hidden_size=None, mlp_ratio=2)
    tensors = hand_tensors(dict(config, mlp_hidden_size=2 * config["d_model"]), dtype=torch.float32)
    write_checkpoint(str(tmp_path / "c"), config, tensors, num_shards=1)
    model = C.load_model(str(tmp_path / "c"))
    assert model.cfg.mlp_hidden_size == 2 * config["d_model"]


# -----------------------------------------------------------------------------
# Clear errors


def test_folder_without_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        C.load_model(str(tmp_path))


def test_missing_shard_listed_in_index(tmp_path):
    config = hand_config()
    write_checkpoint(str(tmp_path / "c"), config, hand_tensors(config), num_shards=2)
    os.remove(tmp_path / "c" / "model-00002-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        C.load_model(str(tmp_path / "c"))


def test_folder_without_weights(tmp_path):
    os.makedirs(tmp_path / "c")
    with open(tmp_path / "c" / "config.json", "w") as f:
        json.dump(hand_config(), f)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        C.load_model(str(tmp_path / "c"))


def test_tensor_with_wrong_shape_names_it_and_both_shapes(tmp_path):
    config = hand_config()
    tensors = hand_tensors(config)
    key = PREFIX + "blocks.1.k_proj.weight"
    good_shape = tuple(tensors[key].shape)
    tensors[key] = torch.zeros(good_shape[0] + 8, good_shape[1], dtype=torch.bfloat16)
    write_checkpoint(str(tmp_path / "c"), config, tensors, num_shards=2)
    with pytest.raises(ValueError) as err:
        C.load_model(str(tmp_path / "c"))
    message = str(err.value)
    assert (key in message and str(good_shape) in message
            and str((good_shape[0] + 8, good_shape[1])) in message)


@pytest.mark.parametrize("extra", [PREFIX + "blocks.0.rotary.weight", "lm_head.weight"])
def test_unknown_tensor_is_an_error(tmp_path, extra):
    config = hand_config()
    tensors = hand_tensors(config)
    tensors[extra] = torch.zeros(3)
    write_checkpoint(str(tmp_path / "c"), config, tensors, num_shards=1)
    with pytest.raises(KeyError, match=re.escape(extra)):
        C.load_model(str(tmp_path / "c"))


def test_missing_tensor_is_an_error(tmp_path):
    config = hand_config()
    tensors = hand_tensors(config)
    del tensors[PREFIX + "blocks.1.up_proj.weight"]
    write_checkpoint(str(tmp_path / "c"), config, tensors, num_shards=2)
    with pytest.raises(KeyError, match=re.escape(PREFIX + "blocks.1.up_proj.weight")):
        C.load_model(str(tmp_path / "c"))


def test_unsupported_architecture_is_an_error(tmp_path):
    config = hand_config(weight_tying=True)
    write_checkpoint(str(tmp_path / "c"), config, hand_tensors(hand_config()), num_shards=1)
    with pytest.raises(ValueError, match="weight_tying"):
        C.load_model(str(tmp_path / "c"))


def test_unknown_preset(tokenizer):
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        C.build_model("nope", tokenizer)


def test_tiny_preset_takes_vocabulary_from_tokenizer(tokenizer):
    model = C.build_model("tiny", tokenizer)
    assert model.cfg.vocab_size == len(tokenizer)
    assert model.cfg.mask_token_id == tokenizer.convert_tokens_to_ids("<|mdm_mask|>")
    assert model.cfg.eos_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert logits_of(model, torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, len(tokenizer))


# -----------------------------------------------------------------------------
# The tiny tokenizer

TEXTS = ["1024\n0300\n0012\n4000", "What is 12 + 7? Answer: 19.", "a  b ,c . 's ?\n\n", "<answer>42</answer>"]


def test_tokenizer_round_trip_one_token_per_character(tokenizer):
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text)
        assert tokenizer.decode(ids) == text
        assert tokenizer.unk_token_id not in ids


def test_tokenizer_special_ids(tokenizer):
    mask, eos = C.mask_token_id(tokenizer), tokenizer.eos_token_id
    assert mask == tokenizer.mask_token_id == tokenizer.convert_tokens_to_ids("<|mdm_mask|>")
    assert eos == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert C.stop_token_ids(tokenizer) == sorted({eos, eot})
    assert mask not in C.stop_token_ids(tokenizer)
    specials = [tokenizer.convert_tokens_to_ids(t) for t in C.TINY_SPECIAL_TOKENS]
    assert len(set(specials)) == len(specials) and tokenizer.unk_token_id in specials
    assert tokenizer("<|mdm_mask|>", add_special_tokens=False)["input_ids"] == [mask]
    for ch in "09+-*/=\n ":  # every character of the tasks is its own token, never a special one
        [i] = tokenizer(ch, add_special_tokens=False)["input_ids"]
        assert i not in specials


def test_encode_prompt_applies_the_chat_template(tokenizer):
    ids_of = tokenizer.convert_tokens_to_ids
    chars = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    got = data.encode_prompt(tokenizer, [{"role": "user", "content": "12"}])
    assert got == [ids_of("<|startoftext|>"), ids_of("<|user|>")] + chars("12") + [ids_of("<|assistant|>")]
    got = data.encode_prompt(tokenizer,
                             [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
                             prefill="<reasoning>")
    assert got == ([ids_of("<|startoftext|>"), ids_of("<|system|>")] + chars("s") + [ids_of("<|user|>")]
                   + chars("q") + [ids_of("<|assistant|>")] + chars("<reasoning>"))


def test_saved_tokenizer_reloads_identically(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    path = str(tmp_path / "tok")  # a tokenizer-only folder: no config.json
    os.makedirs(path)
    C.save_tokenizer(tokenizer, path)
    messages = [{"role": "user", "content": "1024\n0300"}]
    for reloaded in (C.load_tokenizer(path), AutoTokenizer.from_pretrained(path)):
        for text in TEXTS + ["<|mdm_mask|><|endoftext|>x"]:
            assert reloaded(text, add_special_tokens=False)["input_ids"] == \
                tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert reloaded.decode(ids) == tokenizer.decode(ids)
        assert (data.encode_prompt(reloaded, messages, "<reasoning>")
                == data.encode_prompt(tokenizer, messages, "<reasoning>"))
        assert C.mask_token_id(reloaded) == C.mask_token_id(tokenizer)
        assert reloaded.eos_token_id == tokenizer.eos_token_id
        assert C.stop_token_ids(reloaded) == C.stop_token_ids(tokenizer)
        assert len(reloaded) == len(tokenizer)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        C.load_tokenizer(str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        C.load_tokenizer(str(tmp_path))


# -----------------------------------------------------------------------------
# LoRA


def randomise_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in M.lora_modules(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def test_add_lora_is_identity_at_init_and_trains_adapters_only(make_model):
    model = make_model()
    ids = random_ids(model.cfg, 2, 9)
    base = logits_of(model, ids)
    M.add_lora(model, r=4, alpha=8, dropout=0.0)
    assert torch.equal(logits_of(model, ids), base)  # B = 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"blocks.{i}.{t}.{w}" for i in range(model.cfg.n_layers) for t in M.LORA_TARGETS
                for w in ("lora_A", "lora_B")}
    assert trainable == expected
    assert type(model.ff_out) is nn.Linear and not model.ff_out.weight.requires_grad  # never the LM head
    for _, m in M.lora_modules(model):
        assert m.lora_A.shape == (4, m.in_features) and m.lora_B.shape == (m.out_features, 4)
    # a gradient step moves the adapted logits, and only the adapters
    model.train()
    loss = F.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in expected)
    assert any(model.get_parameter(n).grad.abs().sum() > 0 for n in expected if n.endswith("lora_B"))


def test_add_lora_rejects_unknown_targets(make_model):
    with pytest.raises(ValueError, match="o_proj"):
        M.add_lora(make_model(), r=2, alpha=4, targets=("q_proj", "o_proj"))


def test_add_lora_leaves_the_global_rng_alone(make_model):
    """add_lora takes its own seed: it must not reseed the caller's global RNG (which would make every
    later draw of a training run, e.g. LoRA dropout, the same whatever the run's --seed)."""
    model = make_model()
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    M.add_lora(model, r=2, alpha=4, seed=0)
    assert torch.equal(torch.rand(4), expected)


def test_lora_linear_computes_w_x_plus_scaled_b_a_x(make_model):
    """PEFT's LoRA: W x + (alpha / r) B A x, so adapters move between this code and PEFT unchanged."""
    model = make_model()
    M.add_lora(model, r=4, alpha=16)
    randomise_lora(model)
    linear = model.blocks[0].ff_proj
    x = torch.randn(3, linear.in_features, dtype=torch.float64)
    W, A, B = (t.detach().double() for t in (linear.weight, linear.lora_A, linear.lora_B))
    expected = x @ W.T + (16 / 4) * (x @ A.T) @ B.T
    with torch.no_grad():
        torch.testing.assert_close(linear(x.float()).double(), expected, rtol=0, atol=1e-5)


def test_adapters_disabled_gives_base_logits(make_model):
    model = make_model()
    ids = random_ids(model.cfg, 2, 9)
    base = logits_of(model, ids)
    M.add_lora(model, r=4, alpha=8)
    randomise_lora(model)
    adapted = logits_of(model, ids)
    assert (adapted - base).abs().max() > 1e-3
    with M.adapters_disabled(model):
        assert torch.equal(logits_of(model, ids), base)
    assert torch.equal(logits_of(model, ids), adapted)  # switched back on


def test_lora_reference_sync_equals_a_full_weight_mix(make_model):
    """TRL's sync, ref_W = alpha W + (1 - alpha) ref_W, applied three times to full merged weights (the
    slow reference), gives the logits that the LoRA model gives with adapters off and its dense reference
    deltas on."""
    model = make_model(seed=2)
    M.add_lora(model, r=4, alpha=8, targets=("q_proj", "k_proj", "v_proj", "up_proj"))
    ids = random_ids(model.cfg, 2, 9)
    reference = {k: v.clone() for k, v in C.merged_state(model).items()}  # the base: B = 0
    alpha = 0.6
    for sync in range(3):
        randomise_lora(model, seed=sync)  # the policy moved since the last sync, in both factors
        with torch.no_grad():
            for _, m in M.lora_modules(model):
                m.lora_A.mul_(1 + sync)
        policy = C.merged_state(model)
        reference = {k: alpha * policy[k] + (1 - alpha) * reference[k] for k in reference}
        M.sync_lora_reference(model, alpha)
    slow = make_model(seed=2)
    with torch.no_grad():
        for name, p in slow.named_parameters():
            p.copy_(reference[name])
    with M.adapters_disabled(model):
        torch.testing.assert_close(logits_of(model, ids), logits_of(slow, ids), rtol=0, atol=1e-5)
    assert (logits_of(model, ids) - logits_of(slow, ids)).abs().max() > 1e-3  # the policy is elsewhere
    deltas = M.reference_deltas(model)
    assert (len(deltas) == 4 * model.cfg.n_layers
            and deltas["blocks.0.up_proj"].shape == model.blocks[0].up_proj.weight.shape)


def test_adapter_peft_format_reload_and_merged_export(make_model, tokenizer, tmp_path):
    model = make_model(seed=4)
    base_dir, adapter_dir, merged_dir = (str(tmp_path / n) for n in ("base", "adapter", "merged"))
    C.save_model(model, tokenizer, base_dir)
    r, alpha = 4, 8
    M.add_lora(model, r=r, alpha=alpha, dropout=0.05)
    randomise_lora(model)
    model.eval()
    ids = random_ids(model.cfg, 2, 9)
    adapted = logits_of(model, ids)
    C.save_adapter(model, adapter_dir, base_dir)

    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        config = json.load(f)
    assert config["peft_type"] == "LORA" and config["r"] == r and config["lora_alpha"] == alpha
    assert sorted(config["target_modules"]) == sorted(M.LORA_TARGETS)
    assert config["base_model_name_or_path"] == os.path.abspath(base_dir)
    expected_keys = {}
    for i in range(model.cfg.n_layers):
        for t in M.LORA_TARGETS:
            linear = getattr(model.blocks[i], t)
            stem = f"base_model.model.model.transformer.blocks.{i}.{t}"
            expected_keys[stem + ".lora_A.weight"] = (r, linear.in_features)
            expected_keys[stem + ".lora_B.weight"] = (linear.out_features, r)
    with safe_open(os.path.join(adapter_dir, "adapter_model.safetensors"), framework="pt") as f:
        assert {k: tuple(f.get_tensor(k).shape) for k in f.keys()} == expected_keys
        torch.testing.assert_close(
            f.get_tensor("base_model.model.model.transformer.blocks.1.v_proj.lora_B.weight"),
            model.blocks[1].v_proj.lora_B.detach(), rtol=0, atol=0)

    loaded = C.load_model(adapter_dir).eval()
    assert torch.equal(logits_of(loaded, ids), adapted)
    with M.adapters_disabled(loaded):
        assert torch.equal(logits_of(loaded, ids), logits_of(C.load_model(base_dir).eval(), ids))
    assert C.load_tokenizer(adapter_dir)("7")["input_ids"] == tokenizer("7")["input_ids"]

    C.save_model(model, tokenizer, merged_dir)
    merged = C.load_model(merged_dir).eval()
    assert not M.lora_modules(merged)
    torch.testing.assert_close(logits_of(merged, ids), adapted, rtol=0, atol=1e-5)


def test_save_adapter_without_lora_is_an_error(make_model, tmp_path):
    with pytest.raises(ValueError, match="add_lora"):
        C.save_adapter(make_model(), str(tmp_path / "a"), str(tmp_path))


# -----------------------------------------------------------------------------
# Masked-diffusion primitives


def test_forward_mask_never_masks_the_prompt_and_masks_at_rate_p():
    B, L, mask_id = 64, 400, 99
    input_ids = torch.randint(0, 90, (B, L), generator=torch.Generator().manual_seed(0))
    prompt_lengths = torch.randint(10, 200, (B,), generator=torch.Generator().manual_seed(1))
    noisy, masked, p = sft.forward_mask(input_ids, prompt_lengths, mask_id,
                                        generator=torch.Generator().manual_seed(2))
    assert noisy.shape == masked.shape == (B, L) and p.shape == (B, 1)
    is_prompt = torch.arange(L)[None, :] < prompt_lengths[:, None]
    assert not masked[is_prompt].any()
    assert torch.equal(noisy[masked], torch.full_like(noisy[masked], mask_id))
    assert torch.equal(noisy[~masked], input_ids[~masked])
    assert (p >= 1e-3).all() and (p <= 1).all()
    n = (L - prompt_lengths).double()
    rate = masked.sum(1).double() / n
    z = (rate - p[:, 0].double()) / torch.sqrt(p[:, 0].double() * (1 - p[:, 0].double()) / n)
    assert z.abs().max() < 5  # every row masks at its own rate p
    assert 0.3 < p.mean() < 0.7 and p.std() > 0.15  # t ~ U(0, 1), one per sequence


def test_forward_mask_is_seeded():
    ids = torch.randint(0, 90, (8, 50), generator=torch.Generator().manual_seed(0))
    prompt_lengths = torch.full((8,), 10)
    run = lambda seed: sft.forward_mask(  # noqa: E731
        ids, prompt_lengths, 99, generator=torch.Generator().manual_seed(seed))
    a, b, c = run(5), run(5), run(6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[1], c[1])


def test_sft_loss_equals_slow_loop(make_model):
    model = make_model()
    B, L = 3, 12
    ids = random_ids(model.cfg, B, L, seed=3)
    prompt_lengths = torch.tensor([2, 5, 8])
    noisy, masked, p = sft.forward_mask(ids, prompt_lengths, model.cfg.mask_token_id,
                                      generator=torch.Generator().manual_seed(0))
    assert masked.any()
    logits = logits_of(model, noisy)
    loss = sft.sft_loss(logits, ids, masked, p, prompt_lengths)
    total, response_tokens = 0.0, 0
    for b in range(B):
        for i in range(L):
            if i >= int(prompt_lengths[b]):
                response_tokens += 1
            if masked[b, i]:
                log_probs = [float(v) for v in logits[b, i].double()]
                log_z = math.log(sum(math.exp(v) for v in log_probs))
                total += -(log_probs[int(ids[b, i])] - log_z) / float(p[b, 0])
    assert loss.item() == pytest.approx(total / response_tokens, rel=1e-5)


def test_token_logprobs_equals_log_softmax_gather(make_model):
    model = make_model()
    ids = random_ids(model.cfg, 3, 10)
    targets = random_ids(model.cfg, 3, 10, seed=1)
    logits = logits_of(model, ids)
    expected = torch.log_softmax(logits.double(), dim=-1).gather(-1, targets[..., None])[..., 0]
    got = grpo.token_logprobs(logits, targets)
    assert got.shape == (3, 10) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(grpo.token_logprobs(logits.bfloat16(), targets).double(),
                               torch.log_softmax(logits.bfloat16().double(), -1)
                               .gather(-1, targets[..., None])[..., 0],
                               rtol=0, atol=1e-5)
