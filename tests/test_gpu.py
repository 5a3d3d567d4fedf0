"""
The GPU check, ready for the day a GPU is lent: at LLaDA-8B's shape with random weights (built on the meta
device, materialised in bf16 on the GPU), with d1's per-device settings, it runs

- the sampler alone: 6 completions of 256 tokens after a 200-token prompt, blocks of 32, 128 steps; then the
  same with the prefix and the dual key/value cache (their speed against the plain sampler's at 8B);
- one diffu-GRPO step: rollouts as above, then the update with LoRA r 128 on q,k,v,up (mu 2, beta > 0: old
  and reference log-probs, two optimiser steps), with gradient checkpointing; then the same update without
  it, for its memory;
- one masked-SFT step: 4096 tokens, micro-batch 1, LoRA r 128 on q,k,v, gradient checkpointing;

prints the peak GPU memory of each phase, the GRPO step time split into rollout and update, and the sampler's
tokens/s, and fails if a phase needs more than 80 GiB. About 2 minutes of compute on an H100-class GPU (the
6-minute budget leaves room for a slower one). Run it with

    python tests/test_gpu.py                      # or: python -m pytest tests/test_gpu.py -s

Without CUDA the 8B check is skipped; the same code runs on the CPU at a tiny shape, so it is never dead code.
"""

import dataclasses
import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script too
import data  # noqa: E402
import grpo  # noqa: E402
import model as M  # noqa: E402
import sft  # noqa: E402
from generate import generate  # noqa: E402

GIB = 2**30
MEMORY_LIMIT_GIB = 80  # the smallest GPU d1's recipes are meant for


@dataclasses.dataclass
class Shape:
    """What one device runs in d1's recipes (defaults: the 8B check)."""
    config: M.ModelConfig = dataclasses.field(default_factory=lambda: M.PRESETS["llada-8b"])
    lora_r: int = 128
    sft_tokens: int = 4096
    sft_prompt: int = 256
    sft_lora_alpha: float = 256.0
    sft_targets: tuple = ("q_proj", "k_proj", "v_proj")
    grpo_lora_alpha: float = 64.0
    grpo_targets: tuple = ("q_proj", "k_proj", "v_proj", "up_proj")
    num_generations: int = 6
    prompt_length: int = 200
    gen_length: int = 256
    block_length: int = 32
    diffusion_steps: int = 128
    num_iterations: int = 2  # mu
    beta: float = 0.04
    p_mask_prompt: float = 0.15


TINY = Shape(config=M.ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden_size=48,
                                  vocab_size=64, embedding_size=64, mask_token_id=63, eos_token_id=62,
                                  pad_token_id=62, max_sequence_length=128),
             lora_r=4, sft_tokens=48, sft_prompt=12, prompt_length=10, gen_length=16, block_length=8,
             diffusion_steps=8)


def random_model(cfg, device, dtype, seed=0):
    """A model of cfg's shape with random weights, built on the meta device and materialised directly on
    `device` in `dtype` (an 8B model never passes through host memory)."""
    with torch.device("meta"):
        model = M.LLaDA(cfg).to(dtype)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name == "ln_f.weight":
                p.fill_(1.0)
            else:
                p.normal_(0, cfg.init_std)
    return model


def peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else 0.0


def start_phase(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return time.time()


def elapsed(device, t0):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time() - t0


def random_ids(cfg, shape, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.mask_token_id, shape, generator=g).to(device)  # never the mask id


def sample(model, shape, prompt_ids, device, cache="none"):
    with torch.no_grad(), M.autocast(device):
        return generate(model, prompt_ids, shape.diffusion_steps, shape.gen_length, shape.block_length, 0.9,
                        mask_id=shape.config.mask_token_id, generator=data.generator(0, device=device),
                        cache=cache)


def grpo_update(model, shape, sequences, optimizer, device):
    """d1's update on one rollout batch: per inner iteration a prompt mask, old and reference log-probs
    without grad, then mu optimiser steps on the clipped objective (grpo.py's step, one micro-batch)."""
    Lp = shape.prompt_length
    completions = sequences[:, Lp:]
    is_prompt = torch.zeros_like(sequences, dtype=torch.bool)
    is_prompt[:, :Lp] = True
    perturbed = [grpo.estimator_input(sequences, is_prompt, shape.p_mask_prompt, shape.config.mask_token_id,
                                   data.generator(0, k)) for k in range(shape.num_iterations)]

    def logprobs(x):
        with M.autocast(device):
            return grpo.token_logprobs(model(x, positions=slice(Lp, None)), completions)

    with torch.no_grad():
        old = [logprobs(x) for x in perturbed]
        with M.adapters_disabled(model):
            ref = [logprobs(x) for x in perturbed]
    advantages = torch.linspace(-1, 1, len(sequences), device=device)[:, None]
    mask = torch.ones_like(completions, dtype=torch.float32)
    losses = []
    for k in range(shape.num_iterations):
        loss, _, _ = grpo.grpo_loss(logprobs(perturbed[k]), old[k], ref[k], advantages, mask, 0.5, 0.5,
                                    shape.beta)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def sft_step(model, shape, device):
    """One masked-SFT step on one 4096-token example (sft.py's micro-batch of 1): logits of the response
    positions only, LLaDA's loss, backward, AdamW."""
    cfg = shape.config
    input_ids = random_ids(cfg, (1, shape.sft_tokens), device, seed=2)
    prompt_lengths = torch.tensor([shape.sft_prompt], device=device)
    noisy, masked, p = sft.forward_mask(input_ids, prompt_lengths, cfg.mask_token_id,
                                      generator=torch.Generator().manual_seed(3))
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)
    with M.autocast(device):
        logits = model(noisy, positions=slice(shape.sft_prompt, None))
    loss = sft.sft_loss(logits, input_ids, masked, p, prompt_lengths, shape.sft_prompt)
    loss.backward()
    optimizer.step()
    return loss.item()


def run_check(shape, device, dtype):
    """Run the three phases; returns {phase: figures} and prints one line per phase."""
    cfg, report = shape.config, {}
    model = random_model(cfg, device, dtype)
    prompt_ids = random_ids(cfg, (shape.num_generations, shape.prompt_length), device, seed=1)
    with torch.no_grad(), M.autocast(device):
        model(prompt_ids)  # warm-up (kernels, allocator), so that the plain sampler's time is its own

    for cache in ("none", "prefix", "dual"):
        t0 = start_phase(device)
        sequences = sample(model, shape, prompt_ids, device, cache)
        seconds = elapsed(device, t0)
        assert not (sequences == cfg.mask_token_id).any()
        phase = "sampler" if cache == "none" else f"sampler, {cache} cache"
        report[phase] = {"peak_gib": peak_gib(device), "s": seconds,
                         "tok_per_s": shape.num_generations * shape.gen_length / seconds}
        report[phase]["x_plain"] = report["sampler"]["s"] / seconds

    M.add_lora(model, shape.lora_r, shape.grpo_lora_alpha, 0.0, shape.grpo_targets)
    model.eval()  # grpo.py: rollouts and every log-prob with dropout off
    adapters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(adapters, lr=1e-4)
    # the recipe's setting, then the same update without it, for its memory
    for checkpointing in (True, False):
        model.gradient_checkpointing = checkpointing
        before = [p.detach().clone() for p in adapters]
        t0 = start_phase(device)
        if checkpointing:
            sequences = sample(model, shape, prompt_ids, device)
        rollout_s = elapsed(device, t0)
        t1 = time.time()
        losses = grpo_update(model, shape, sequences, optimizer, device)
        update_s = elapsed(device, t1)
        assert all(torch.isfinite(torch.tensor(losses)))
        assert any(not torch.equal(a, p) for a, p in zip(before, adapters))  # the update moved the adapters
        if checkpointing:
            report["grpo step"] = {"peak_gib": peak_gib(device), "rollout_s": rollout_s, "update_s": update_s}
        else:
            report["grpo update, no grad checkpointing"] = {"peak_gib": peak_gib(device),
                                                            "update_s": update_s}
    del optimizer, before

    del model, adapters
    model = random_model(cfg, device, dtype)
    M.add_lora(model, shape.lora_r, shape.sft_lora_alpha, 0.05, shape.sft_targets)
    model.train()
    model.gradient_checkpointing = True
    t0 = start_phase(device)
    loss = sft_step(model, shape, device)
    report["sft step"] = {"peak_gib": peak_gib(device), "s": elapsed(device, t0), "loss": loss}
    assert torch.isfinite(torch.tensor(loss))

    for phase, figures in report.items():
        print(f"{phase:34s} | " + " | ".join(f"{k} {v:.2f}" for k, v in figures.items()), flush=True)
    return report


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the 8B check needs a CUDA GPU")
def test_llada_8b_shape_fits_one_gpu():
    report = run_check(Shape(), torch.device("cuda"), torch.bfloat16)
    over = {phase: f["peak_gib"] for phase, f in report.items() if f["peak_gib"] > MEMORY_LIMIT_GIB}
    assert not over, f"phases over {MEMORY_LIMIT_GIB} GiB: {over}"


def test_the_check_runs_at_a_tiny_shape_on_the_cpu():
    report = run_check(TINY, torch.device("cpu"), torch.float32)
    assert set(report) == {"sampler", "sampler, prefix cache", "sampler, dual cache", "grpo step",
                           "grpo update, no grad checkpointing", "sft step"}
    assert report["sampler"]["tok_per_s"] > 0 and report["grpo step"]["rollout_s"] > 0


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: the 8B check needs one "
                         "(python -m pytest tests/test_gpu.py runs the tiny CPU variant)")
    test_llada_8b_shape_fits_one_gpu()
