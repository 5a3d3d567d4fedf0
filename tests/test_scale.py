"""
Guards the 8B path where a CPU can show it (what a GPU run would otherwise find first):

- full fine-tuning that cannot fit a GPU is refused before anything loads, with a message naming --lora-r
  and --fsdp (the check is a pure function, called here with a fake GPU memory size);
- ddp.init picks the GPU from LOCAL_RANK modulo the GPUs the process sees (a launcher that shows each
  process one GPU);
- LoRA casts its input to fp32 only when autocast is off (no fp32 copy of the activations under bf16);
- SFT's LM head on response positions only gives the same loss as the head on every position;
- token_logprobs in chunks (the branch a large batch takes) equals the one-chunk result, on a padded
  vocabulary too;
- `python checkpoint.py merge` (and its alias `python model.py merge`) keeps the base's dtype and adds
  each delta in fp32.
"""

import os

import pytest
import torch
from safetensors import safe_open

import checkpoint as C
import ddp
import grpo
import model as M
import sft
from helpers import RecordOps, run_script

# -----------------------------------------------------------------------------
# Full fine-tuning that cannot fit


def test_full_finetuning_of_8b_is_refused_on_an_80_gib_gpu():
    params = M.config_parameters(M.PRESETS["llada-8b"])
    assert 8.0e9 < params < 8.1e9  # LLaDA-8B's shape
    with pytest.raises(SystemExit) as refusal:
        M.check_full_finetuning_fits(params, 80 * 2**30)
    message = str(refusal.value)
    assert "--lora-r" in message and "--fsdp" in message and "119 GiB" in message  # 8.02e9 x 16 bytes
    # GRPO: fits only as 16 bytes, not with the reference
    with pytest.raises(SystemExit, match="reference copy"):
        M.check_full_finetuning_fits(params, 125 * 2**30, reference=True)
    M.check_full_finetuning_fits(params, 125 * 2**30)
    M.check_full_finetuning_fits(params, 80 * 2**30, world_size=8, fsdp=True, reference=True)  # 1/8 each
    with pytest.raises(SystemExit):  # DDP keeps everything on every rank, whatever the world size
        M.check_full_finetuning_fits(params, 80 * 2**30, world_size=8)
    M.check_full_finetuning_fits(M.config_parameters(M.PRESETS["tiny"]), 80 * 2**30)


def test_full_finetuning_bytes():
    assert M.full_finetuning_bytes(10) == 160
    assert M.full_finetuning_bytes(10, reference=True) == 200
    assert M.full_finetuning_bytes(10, world_size=2, fsdp=True, reference=True) == 100


# -----------------------------------------------------------------------------
# Devices and seeds per rank


def test_init_takes_the_gpu_from_local_rank_modulo_the_visible_gpus(monkeypatch):
    """RANK 3 / LOCAL_RANK 3 on a node where SLURM shows the process one GPU: cuda:0, not cuda:3."""
    joined = {}
    monkeypatch.setenv("RANK", "11")
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: joined.setdefault("set", device))
    monkeypatch.setattr(ddp.dist, "init_process_group",
                        lambda backend, **kw: joined.update(backend=backend, **kw))
    rank, world, device = ddp.init()
    assert (rank, world, device) == (11, 16, torch.device("cuda", 0))
    assert joined["set"] == device and joined["backend"] == "nccl" and joined["rank"] == 11
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)  # all 8 GPUs of the node visible
    assert ddp.init()[2] == torch.device("cuda", 3)


# -----------------------------------------------------------------------------
# LoRA under autocast


def fp32_copies_of(x, ops):
    return [op for op in ops
            if op[3] and op[1] == torch.float32 and op[2] == tuple(x.shape) and "_to_copy" in str(op[0])]


def test_lora_input_is_cast_to_fp32_only_without_autocast(make_model):
    model = make_model()
    M.add_lora(model, r=4, alpha=8)
    model.to(torch.bfloat16)  # a bf16 base; the adapters are put back in fp32 as add_lora makes them
    for _, m in M.lora_modules(model):
        m.lora_A.data, m.lora_B.data = m.lora_A.data.float(), m.lora_B.data.float()
    linear = model.blocks[0].q_proj
    x = torch.randn(2, 5, linear.in_features, dtype=torch.bfloat16)
    with RecordOps() as plain:
        linear(x)
    assert fp32_copies_of(x, plain.ops), "without autocast the adapters' fp32 matmul needs an fp32 input"
    with torch.autocast("cpu", dtype=torch.bfloat16), RecordOps() as autocast:
        y = linear(x)
    assert not fp32_copies_of(x, autocast.ops), f"an fp32 copy of the input under autocast: {autocast.ops}"
    assert y.dtype == torch.bfloat16


# -----------------------------------------------------------------------------
# The SFT loss on response positions only; token_logprobs in chunks


def test_sft_loss_on_response_positions_equals_the_loss_on_every_position(make_model):
    model = make_model()
    B, L = 4, 16
    ids = torch.randint(0, model.cfg.vocab_size - 1, (B, L), generator=torch.Generator().manual_seed(0))
    prompt_lengths = torch.tensor([5, 3, 9, 7])
    noisy, masked, p = sft.forward_mask(ids, prompt_lengths, model.cfg.mask_token_id,
                                      generator=torch.Generator().manual_seed(1))
    assert masked.any()
    with torch.no_grad():
        full = sft.sft_loss(model(noisy), ids, masked, p, prompt_lengths)
        start = int(prompt_lengths.min())
        sliced_logits = model(noisy, positions=slice(start, None))
        sliced = sft.sft_loss(sliced_logits, ids, masked, p, prompt_lengths, start)
    assert sliced_logits.shape == (B, L - start, model.cfg.vocab_size)
    assert sliced.item() == full.item()


@pytest.mark.parametrize("padded", [False, True])
def test_token_logprobs_in_chunks_equals_one_chunk(make_model, monkeypatch, padded):
    """A chunk of 2 rows: the loop over chunks runs (3 chunks for 5 rows); with a padded embedding the logits
    are a strided view of the vocabulary."""
    model = make_model(**({"embedding_size": make_model().cfg.vocab_size + 7} if padded else {}))
    ids = torch.randint(0, model.cfg.vocab_size, (5, 6), generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, model.cfg.vocab_size, (5, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids)
    assert logits.shape[-1] == model.cfg.vocab_size and logits.is_contiguous() != padded
    whole = grpo.token_logprobs(logits, targets)
    monkeypatch.setattr(M, "LOGPROB_CHUNK_ELEMENTS", 2 * 6 * logits.shape[-1])
    chunks = []  # the rows of each cross-entropy call: proves the chunked loop ran
    cross_entropy = M.F.cross_entropy
    monkeypatch.setattr(M.F, "cross_entropy",
                        lambda x, *a, **k: chunks.append(len(x) // 6) or cross_entropy(x, *a, **k))
    chunked = grpo.token_logprobs(logits, targets)
    assert chunks == [2, 2, 1]
    assert torch.equal(chunked, whole)
    expected = torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(chunked.double(), expected, rtol=0, atol=1e-5)


# -----------------------------------------------------------------------------
# Merging an adapter


def test_merge_keeps_the_base_dtype_and_adds_in_fp32(make_model, tokenizer, tmp_path):
    model = make_model(seed=2).to(torch.bfloat16)
    base_dir, adapter_dir, merged_dir = (str(tmp_path / n) for n in ("base", "adapter", "merged"))
    C.save_model(model, tokenizer, base_dir)
    assert C.checkpoint_dtype(base_dir) == torch.bfloat16
    M.add_lora(model, r=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, m in M.lora_modules(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 1e-3)  # small deltas: rounding shows
    C.save_adapter(model, adapter_dir, base_dir)
    run = run_script("checkpoint.py", "merge", adapter_dir, merged_dir)  # the command line the README gives
    assert f"merged {adapter_dir}" in run.stdout
    with safe_open(os.path.join(merged_dir, C.WEIGHTS_NAME), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    merged = dict(C.load_model(merged_dir, dtype=torch.bfloat16).named_parameters())
    linear = model.blocks[1].up_proj
    expected = (linear.weight.float() + linear.delta_weight()).to(torch.bfloat16)  # one rounding
    assert torch.equal(merged["blocks.1.up_proj.weight"], expected)
    twice_rounded = linear.weight + linear.delta_weight().to(torch.bfloat16)
    assert not torch.equal(expected, twice_rounded)  # the test can tell the two apart
    # the alias `python model.py merge` writes the same files
    run_script("model.py", "merge", adapter_dir, str(tmp_path / "merged-again"))
    with safe_open(os.path.join(tmp_path, "merged-again", C.WEIGHTS_NAME), framework="pt") as f:
        assert torch.equal(f.get_tensor(C.to_llada_name("blocks.1.up_proj.weight")), expected)
