"""
Guards dryrun.py, the fake-tensor dry run that sizes a stage at 8B before a GPU job is queued:

- the memory tracker's peak and live bytes for a fake GRPO-like step (forward, log-probs, backward, AdamW;
  with and without checkpointing) equal the real CPU allocations torch's profiler records, within 1%;
- its FLOPs for a forward + backward equal FlopCounterMode's for the same computation, run for real;
- under the CUDA-like autocast, linears and attention run in bf16 on fake CPU tensors, attention reaches the
  flash kernel (output + logsumexp, never the (L x L) weights), and a backward through LLaDA works;
- the worst-case mode answers boolean indexing, nonzero and .item() and counts what it assumed;
- build_model at LLaDA-8B's shape holds 8,015,581,184 bf16 parameters, in about a second;
- report() says which phase does not fit a memory budget.
"""

import time

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode
from helpers import RecordOps

import dryrun
import model as M

# big enough that the allocator's 512-byte rounding is noise, small enough to run for real in a second
CONFIG = M.ModelConfig(d_model=128, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden_size=352, vocab_size=1024,
                       embedding_size=1024, max_sequence_length=128, mask_token_id=1023, eos_token_id=1022,
                       pad_token_id=1022)
BATCH, LENGTH = 4, 64


def grpo_like_step(model, optimizer, input_ids, advantages, attention_mask=None):
    """A GRPO update in miniature: per-token log-probs, an advantage-weighted loss, backward, AdamW."""
    logp = M.token_logprobs(model(input_ids, attention_mask), input_ids)  # (B, L)
    loss = -(logp * advantages[:, None]).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def step_inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, CONFIG.vocab_size, (BATCH, LENGTH), generator=g),
            torch.randn(BATCH, generator=g))


def profiled_peak_and_after(fn):
    """(peak, after) of the real CPU bytes allocated while fn runs, from the profiler's memory events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak, live


@pytest.mark.parametrize("checkpointing", [False, True])
def test_tracker_peak_matches_the_profiler_on_a_real_grpo_like_step(checkpointing):
    input_ids, advantages = step_inputs()
    model = M.LLaDA(CONFIG).eval()
    model.gradient_checkpointing = checkpointing
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    real_peak, real_after = profiled_peak_and_after(
        lambda: grpo_like_step(model, optimizer, input_ids, advantages))

    with dryrun.session() as run:
        fake_model = dryrun.build_model(CONFIG, torch.float32)
        fake_model.gradient_checkpointing = checkpointing
        fake_optimizer = torch.optim.AdamW(fake_model.parameters(), lr=1e-3)
        with run.phase("step"):
            grpo_like_step(fake_model, fake_optimizer, input_ids, advantages)
    phase = run.phases[0]
    # measured: 0.02% apart without checkpointing, 0.1% with (the 512-byte rounding; exact bytes: 0.0001%)
    assert abs(phase.peak_bytes / (weights + real_peak) - 1) < 0.01
    # weights and AdamW's two moments: every temporary was seen freed
    assert abs(phase.live_after_bytes / (weights + real_after) - 1) < 0.01
    assert phase.largest[0].nbytes == max(s.nbytes for s in phase.largest)


def test_flops_equal_flop_counter_mode_on_a_real_forward_and_backward():
    input_ids, _ = step_inputs()
    attention_mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    attention_mask[0, :5] = 0  # left padding: attention with a key mask

    def forward_backward(model):
        M.token_logprobs(model(input_ids, attention_mask), input_ids).mean().backward()

    # the CPU attention kernel has no formula in torch's registry: give FlopCounterMode dryrun's
    with FlopCounterMode(display=False, custom_mapping=dryrun.CPU_ATTENTION_FLOPS) as counter:
        forward_backward(M.LLaDA(CONFIG))
    by_op = counter.get_flop_counts()["Global"]
    assert by_op[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] > 0
    assert by_op[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward] > 0

    with dryrun.session() as run:
        model = dryrun.build_model(CONFIG, torch.float32)
        with run.phase("forward and backward"):
            forward_backward(model)
    assert run.phases[0].flops == counter.get_total_flops()
    assert run.phases[0].operand_bytes > 0


def test_cuda_like_autocast_runs_linears_and_flash_attention_in_bf16_with_a_backward():
    input_ids, _ = step_inputs()
    attention_mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    with dryrun.session() as run:
        model = dryrun.build_model(CONFIG, torch.float32)
        with run.phase("forward and backward"), RecordOps() as ops, dryrun.cuda_like_autocast():
            x = torch.randn(BATCH, CONFIG.d_model)
            assert F.linear(x, model.ff_out.weight).dtype == torch.bfloat16
            M.token_logprobs(model(input_ids, attention_mask), input_ids).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    dtypes = {str(op.overloadpacket): dtype for op, dtype, _, _ in ops.ops}
    assert dtypes["aten.mm"] == torch.bfloat16
    # with the key mask too: flash attention, not the math path that would materialise (L x L) weights
    assert dtypes["aten._scaled_dot_product_flash_attention_for_cpu"] == torch.bfloat16
    assert dtypes["aten._scaled_dot_product_flash_attention_for_cpu_backward"] == torch.bfloat16
    assert not any(s.shape[-2:] == (LENGTH, LENGTH) for s in run.phases[0].largest)


def test_worst_case_mode_answers_data_dependent_ops():
    mask = torch.tensor([[True, False, False], [False, True, False]])
    with dryrun.session() as run:
        x = torch.randn(2, 3, 5)
        assert x[mask].shape == (6, 5)  # every element of the mask true
        assert mask.nonzero().shape == (6, 2)
        x[mask] = torch.zeros(6, 5)
        assert x.masked_select(mask[:, :, None]).shape == (30,)
        assert x.sum().item() == 1
        assert bool(x.any())  # .item() answers 1: truthy
    assumed = run.worst_case.assumed
    assert assumed[dryrun.ASSUMPTIONS[torch.ops.aten._local_scalar_dense.default]] == 2
    assert assumed[dryrun.ASSUMPTIONS[torch.ops.aten.index.Tensor]] == 1
    assert assumed[dryrun.ASSUMPTIONS[torch.ops.aten.index_put.default]] == 1
    assert assumed[dryrun.ASSUMPTIONS[torch.ops.aten.nonzero.default]] == 1
    text, fits = run.report()
    assert fits and ".item()" in text and "x[mask]" in text


def test_build_model_at_llada_8b_holds_its_bf16_parameters():
    llada_8b = {"d_model": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 32, "mlp_hidden_size": 12288,
                "vocab_size": 126464, "embedding_size": 126464, "rope_theta": 500000.0}
    start = time.perf_counter()
    with dryrun.session() as run:
        model = dryrun.build_model(llada_8b, torch.bfloat16)
        with run.phase("weights"):
            pass
    assert time.perf_counter() - start < 5
    assert M.num_parameters(model) == 8_015_581_184
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and not model.training
    assert abs(run.phases[0].live_after_bytes / (8_015_581_184 * 2) - 1) < 0.01  # 14.93 GiB
    assert run.phases[0].peak_bytes == run.phases[0].live_after_bytes  # never an fp32 copy


def test_report_says_a_phase_does_not_fit_a_small_budget():
    with dryrun.session() as run:
        with run.phase("small"):
            small = torch.empty(2**20, dtype=torch.uint8)  # 1 MiB
        with run.phase("big", repeat=3):
            big = torch.empty(2**30, dtype=torch.uint8)  # 1 GiB
            del big
    assert small.shape == (2**20,)
    assert [p.peak_bytes for p in run.phases] == [2**20, 2**20 + 2**30]
    assert run.phases[1].live_after_bytes == 2**20  # the big one was freed
    text, fits = run.report(gpu_memory_gib=0.5)
    assert not fits
    assert "'big' peaks at 1.00 GiB" in text and "0.5 GiB" in text and "'small' peaks" not in text
    assert "big x3" in text
    assert run.report(gpu_memory_gib=2)[1]
