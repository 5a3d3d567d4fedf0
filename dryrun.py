"""
A dry run: a stage's real code, for its first step, at a checkpoint's real shape (LLaDA-8B, 126k vocabulary),
on fake tensors that have shapes and dtypes but no data, so nothing is allocated or computed. Per phase
(rollout, update, evaluation pass) it reports the peak memory a CUDA run would see, what stays live after,
the largest tensors at the peak, the FLOPs and a roofline time on an H100. Why: an out-of-memory error at 8B
should show up in seconds on a laptop, not after a GPU job has queued and loaded 16 GB of weights.

    with dryrun.session() as run:
        model = dryrun.build_model(config_dict, torch.bfloat16)  # 14.9 GiB counted, nothing allocated
        with run.phase("update"), dryrun.cuda_like_autocast():
            ...  # the stage's own code: forward, loss, backward, optimizer step
    text, fits = run.report(gpu_memory_gib=79)

One session stacks, innermost first: FakeTensorMode (every new tensor fake, on the CPU device: a backward on
a fake CUDA device fails), a memory tracker of live storages, a FLOP counter with torch.utils.flop_counter's
formulas, and a worst-case mode that answers the data-dependent ops fake tensors cannot (nonzero and boolean
masks: every element true; .item(): 1) and counts what it assumed.
"""

import collections
import contextlib
import dataclasses
import heapq
import os
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count, shape_wrapper

import model as M

aten = torch.ops.aten

H100_BF16_FLOPS = 989e12  # H100 SXM, dense bf16 tensor cores
H100_BYTES_PER_SECOND = 3.35e12  # H100 SXM, HBM3
CUDA_BLOCK_BYTES = 512  # the caching allocator rounds every block up to a multiple of 512 bytes
LARGEST_TENSORS = 8  # how many tensors the report lists at a peak
GIB = 2**30

# -----------------------------------------------------------------------------
# FLOPs: torch's formulas, plus the CPU attention kernel the fake run reaches instead of the CUDA ones.
# Found in torch 2.13: F.scaled_dot_product_attention on CPU tensors, fake or real, fp32 or bf16 (autocast),
# with or without LLaDA's boolean key mask (made a small additive (B, 1, 1, L) mask first), with Lq < Lk too,
# runs aten._scaled_dot_product_flash_attention_for_cpu: output and an fp32 logsumexp (B, H, Lq), and a
# backward that keeps q, k, v, output and logsumexp. An H100 keeps the same (flash without a mask,
# memory-efficient attention with one), never the (Lq x Lk) weights, so the dry run needs no redirection.


def cpu_attention_flop(query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query, key, value)


def cpu_attention_backward_flop(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out, query, key, value)


# shape formulas, as FlopCounterMode's custom_mapping takes them
CPU_ATTENTION_FLOPS = {aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention_flop,
                       aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_attention_backward_flop}
FLOP_FORMULAS = {**flop_registry, **{op: shape_wrapper(f) for op, f in CPU_ATTENTION_FLOPS.items()}}


def tensors_in(tree):
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


class FlopCounter(TorchDispatchMode):
    """FLOPs, and the bytes read and written by the ops that have a FLOP formula (matmuls, attention), for a
    roofline. A plain dispatch mode: FlopCounterMode's module hooks keep activations alive under
    checkpointing."""

    def __init__(self):
        super().__init__()
        self.flops = 0
        self.operand_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = FLOP_FORMULAS.get(func.overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
            self.operand_bytes += sum(t.numel() * t.element_size() for t in tensors_in((args, kwargs, out)))
        return out


# -----------------------------------------------------------------------------
# Memory: live storages, as a CUDA caching allocator would count them


def rounded(nbytes, block=CUDA_BLOCK_BYTES):
    return -(-nbytes // block) * block


@dataclasses.dataclass
class Allocation:
    nbytes: int  # rounded
    shape: tuple  # of the tensor that first used the storage
    dtype: torch.dtype
    op: str  # the op that made it
    storage: weakref.ref  # to the storage object, to tell a reused address from the same storage


class MemoryTracker(TorchDispatchMode):
    """Live bytes: a storage counts from the first op output that uses it until it is freed (a finalizer on
    the storage's Python object, which torch keeps for as long as the storage lives, fake ones included).
    `peak` is the highest live count since the last reset_peak(); `largest` the biggest storages then."""

    def __init__(self, block=CUDA_BLOCK_BYTES):
        super().__init__()
        self.block = block
        self.live = 0
        self.storages = {}  # id of the C++ storage -> Allocation; a key is dropped when its storage is freed
        self.reset_peak()

    def reset_peak(self):
        self.peak, self.largest, self.peak_pending = self.live, [], True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tensors_in(out):
            self.see_tensor(t, func)
        return out

    def see_tensor(self, t, func):
        if is_traceable_wrapper_subclass(t):  # FSDP's DTensor holds nothing itself: its local shard counts
            for inner in (getattr(t, name) for name in t.__tensor_flatten__()[0]):
                if isinstance(inner, torch.Tensor):
                    self.see_tensor(inner, func)
        elif t.device.type != "meta":  # a module built under torch.device("meta") holds nothing
            self.see(t, func)

    def see(self, t, func):
        storage = t.untyped_storage()
        key, nbytes = storage._cdata, rounded(storage.nbytes(), self.block)
        record = self.storages.get(key)
        if record is not None and record.storage() is not storage:  # an address reused before a free
            self.free(key, record)
            record = None
        if record is None:
            record = Allocation(nbytes, tuple(t.shape), t.dtype, str(func.overloadpacket),
                                weakref.ref(storage))
            self.storages[key] = record
            weakref.finalize(storage, self.free, key, record).atexit = False
            self.grow(nbytes)
        elif nbytes > record.nbytes:  # resized in place (an out= argument)
            self.grow(nbytes - record.nbytes)
            record.nbytes = nbytes

    def resized(self, storage):
        """A storage resized in place (FSDP frees and refills its gathered weights so)."""
        record = self.storages.get(storage._cdata)
        if record is not None:
            nbytes = rounded(storage.nbytes(), self.block)
            if nbytes > record.nbytes:
                self.grow(nbytes - record.nbytes)
                record.nbytes = nbytes
            else:
                self.shrink(record, nbytes)

    def shrink(self, record, nbytes):
        if self.peak_pending:  # as a free: the live storages until now are those at the peak
            self.snapshot()
        self.live -= record.nbytes - nbytes
        record.nbytes = nbytes

    def grow(self, nbytes):
        self.live += nbytes
        if self.live > self.peak:
            self.peak, self.peak_pending = self.live, True

    def free(self, key, record):
        if self.storages.get(key) is not record:  # already freed, its address since reused
            return
        # until the first free after a new peak the live storages are exactly those at the peak
        if self.peak_pending:
            self.snapshot()
        self.live -= self.storages.pop(key).nbytes

    def snapshot(self):
        self.largest = heapq.nlargest(LARGEST_TENSORS, self.storages.values(), key=lambda s: s.nbytes)
        self.peak_pending = False


# -----------------------------------------------------------------------------
# The worst case for data-dependent ops, which raise under fake tensors


def worst_nonzero(t):
    """nonzero(t) with every element true: (numel, dim) long."""
    return torch.empty((t.numel(), t.dim()), dtype=torch.long, device=t.device)


def worst_indices(indices):
    """Boolean (or uint8) masks among index/index_put's indices replaced by their worst-case nonzero's
    columns, as the CUDA kernels replace them (a mask of k dims indexes k dims)."""
    out = []
    for index in indices:
        if index is not None and index.dtype in (torch.bool, torch.uint8):
            out.extend(worst_nonzero(index).unbind(1))
        else:
            out.append(index)
    return out


def has_mask(indices):
    return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)


INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
             aten._index_put_impl_.default, aten._unsafe_index_put.default}
ASSUMPTIONS = {
    aten.nonzero.default: "nonzero: every element true",
    aten.index.Tensor: "x[mask]: every element of the mask true",
    aten.index_put.default: "x[mask] = v: every element of the mask true",
    aten.masked_select.default: "masked_select: every element of the mask true",
    aten._local_scalar_dense.default: ".item() / bool() / int() / float() of a tensor: 1",
}


class WorstCase(TorchDispatchMode):
    """Answers the ops whose output shape or value depends on data. `assumed` counts each answer by what it
    assumed, so the report can say."""

    def __init__(self):
        super().__init__()
        self.assumed = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default:
            # truthy, and a safe step count for AdamW's bias correction (1 - beta ** step)
            self.assumed[ASSUMPTIONS[func]] += 1
            return 1
        if func is aten.nonzero.default:
            self.assumed[ASSUMPTIONS[func]] += 1
            return worst_nonzero(args[0])
        if func is aten.masked_select.default:
            self.assumed[ASSUMPTIONS[func]] += 1
            return args[0].new_empty(torch.broadcast_shapes(args[0].shape, args[1].shape).numel())
        if func in INDEX_OPS and has_mask(args[1]):
            self.assumed[ASSUMPTIONS[aten.index.Tensor if func is aten.index.Tensor
                                     else aten.index_put.default]] += 1
            return func(args[0], worst_indices(args[1]), *args[2:], **kwargs)
        return func(*args, **kwargs)


# -----------------------------------------------------------------------------
# The session and its phases


@dataclasses.dataclass
class Phase:
    name: str
    repeat: int  # the code ran once for `repeat` such steps: FLOPs, bytes and time are multiplied
    peak_bytes: int  # including what was live before (the weights)
    live_after_bytes: int
    largest: list  # [Allocation] at the phase's peak, biggest first
    flops: int  # of one run, before `repeat`
    operand_bytes: int

    def seconds(self, efficiency):
        """Roofline time on an H100 at `efficiency` of the bf16 peak, `repeat` times."""
        return self.repeat * max(self.flops / (efficiency * H100_BF16_FLOPS),
                                 self.operand_bytes / H100_BYTES_PER_SECOND)


class Session:
    def __init__(self, tracker, counter, worst_case):
        self.tracker, self.counter, self.worst_case = tracker, counter, worst_case
        self.phases = []
        self.current = None  # (name, repeat, FLOPs and bytes at its start) of the phase being recorded

    def begin(self, name, repeat=1):
        """Start recording a phase (the code until end()); phases do not nest."""
        assert self.current is None, "phases do not nest"
        self.current = (name, repeat, self.counter.flops, self.counter.operand_bytes)
        self.tracker.reset_peak()

    def end(self):
        """Stop recording the current phase: its peak, live bytes after, largest tensors, FLOPs, bytes."""
        (name, repeat, flops, operand_bytes), self.current = self.current, None
        tracker, counter = self.tracker, self.counter
        if tracker.peak_pending:  # no free since the peak: the live storages are those at the peak
            tracker.snapshot()
        self.phases.append(Phase(name, repeat, tracker.peak, tracker.live, tracker.largest,
                                 counter.flops - flops, counter.operand_bytes - operand_bytes))

    @contextlib.contextmanager
    def phase(self, name, repeat=1):
        """Record the peak, live bytes after, largest tensors, FLOPs and operand bytes of the code inside."""
        self.begin(name, repeat)
        try:
            yield
        finally:
            self.end()

    def report(self, gpu_memory_gib=79, efficiency=(0.4, 0.6)):
        """(text, fits): a table of the phases, the largest tensors at the highest peak and what the
        worst-case mode assumed; fits is False when a phase's peak exceeds gpu_memory_gib."""
        efficiencies = sorted(efficiency, reverse=True)
        times = " ".join(f"{f's @ {e:.0%}':>9}" for e in efficiencies)
        header = f"{'phase':<40} {'peak GiB':>9} {'after GiB':>9} {'TFLOP':>9} {times}"
        lines = [header, "-" * len(header)]
        for p in self.phases:
            name = p.name if p.repeat == 1 else f"{p.name} x{p.repeat}"
            times = " ".join(f"{p.seconds(e):>9.2f}" for e in efficiencies)
            lines.append(f"{name:<40} {p.peak_bytes / GIB:>9.2f} {p.live_after_bytes / GIB:>9.2f} "
                         f"{p.repeat * p.flops / 1e12:>9.1f} {times}")
        tflop = sum(p.repeat * p.flops for p in self.phases) / 1e12
        times = " ".join(f"{sum(p.seconds(e) for p in self.phases):>9.2f}" for e in efficiencies)
        lines.append(f"{'total':<40} {'':>9} {'':>9} {tflop:>9.1f} {times}")
        lines.append(f"time = max(FLOPs / (efficiency x {H100_BF16_FLOPS / 1e12:.0f} TFLOP/s), bytes of the "
                     f"matmuls and attention / {H100_BYTES_PER_SECOND / 1e12:.2f} TB/s): an H100 SXM")
        if self.phases:
            top = max(self.phases, key=lambda p: p.peak_bytes)
            lines.append(f"\nlargest tensors at the highest peak: {top.name}, {top.peak_bytes / GIB:.2f} GiB")
            lines.extend(f"  {a.nbytes / GIB:8.3f} GiB  {str(a.shape):<26} {str(a.dtype)[6:]:<9} from {a.op}"
                         for a in top.largest)
        if self.worst_case.assumed:
            lines.append("\nassumed (data-dependent ops answered with the worst case):")
            lines.extend(f"  {n:>6} x {what}" for what, n in self.worst_case.assumed.items())
        over = [p for p in self.phases if p.peak_bytes > gpu_memory_gib * GIB]
        lines.extend(f"\nDOES NOT FIT: phase {p.name!r} peaks at {p.peak_bytes / GIB:.2f} GiB, more than the "
                     f"budget of {gpu_memory_gib} GiB" for p in over)
        return "\n".join(lines), not over


@contextlib.contextmanager
def session(block=CUDA_BLOCK_BYTES):
    """Fake tensors on the CPU device (real tensors made before are accepted), under the memory tracker, the
    FLOP counter and the worst-case mode, in that order (the last is the first to see an op). `block`: the
    allocator's rounding (1 counts exact bytes)."""
    tracker, counter, worst_case = MemoryTracker(block), FlopCounter(), WorstCase()
    resize, own = torch.UntypedStorage.resize_, "resize_" in torch.UntypedStorage.__dict__

    def tracked_resize(storage, size):  # no op sees a storage resized in place: tell the tracker
        result = resize(storage, size)
        tracker.resized(storage)
        return result

    torch.UntypedStorage.resize_ = tracked_resize
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), tracker, counter, worst_case:
            yield Session(tracker, counter, worst_case)
    finally:
        if own:
            torch.UntypedStorage.resize_ = resize
        else:  # inherited: remove the patch, the class's own attribute
            del torch.UntypedStorage.resize_


@contextlib.contextmanager
def fake_world(world_size):
    """torch's fake process group of world_size ranks, this process its rank 0, and a CPU device mesh over it,
    made before any fake tensor (the mesh's coordinates are real data): FSDP2 shards, gathers and reduces
    fake tensors as one rank of that world would, its collectives doing nothing."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield init_device_mesh("cpu", (world_size,))
    finally:
        dist.destroy_process_group()


def cuda_like_autocast(dtype=torch.bfloat16):
    """The bf16 autocast of a CUDA run, on the CPU device: linears, matmuls and attention run in bf16. Its
    fp32 list is the CPU's: CUDA's also lifts softmax, log_softmax, exp, log, pow and sum of bf16 inputs to
    fp32, which our code does by hand before each (RMSNorm, RoPE, token_logprobs, the sampler's float64).
    Without the weight cache: a run leaves autocast after each forward, which empties it, where one region
    spans the whole dry run (autograd still saves each cast weight it needs for backward)."""
    return torch.autocast("cpu", dtype=dtype, cache_enabled=False)


def build_model(config_dict, dtype=torch.bfloat16):
    """model.LLaDA at a config.json's shape (a dict, or a ModelConfig), every parameter a fake `dtype` tensor
    on the CPU device, in eval mode. Call inside session(): the parameters count as live memory from here on.
    Built with `dtype` as the default dtype, so no copy in another dtype ever exists."""
    cfg = config_dict if isinstance(config_dict, M.ModelConfig) else M.ModelConfig.from_llada(config_dict)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return M.LLaDA(cfg).eval()
    finally:
        torch.set_default_dtype(default_dtype)


# -----------------------------------------------------------------------------
# What the stages share: the flags, synthetic prompts, the sampler for one block, the report


def add_flags(parser, world_size=True):
    """The dry run's flags, the same in sft.py, grpo.py and evaluate.py (whose ranks each sample a batch of
    their own: no world size)."""
    parser.add_argument("--dry-run", action="store_true", help="run setup and the first step on fake "
                        "tensors at the checkpoint's shape (its config.json: no weights read) and print each "
                        "phase's memory, FLOPs and H100 time; exits 1 when a phase does not fit")
    parser.add_argument("--dry-run-gpu-memory", type=float, default=79.0,
                        help="GiB one GPU offers to the dry run (an 80 GB H100: 79)")
    if world_size:
        parser.add_argument("--dry-run-world-size", type=int, default=None,
                            help="dry-run one rank of a torchrun world of this size (its share of the batch)")
    parser.add_argument("--dry-run-prompt-tokens", type=int, default=200,
                        help="the dry run's synthetic prompts have this many tokens (d1: at most 200; "
                             "grpo.py takes --max-prompt-length when given)")


def checkpoint_shape(path):
    """(tokenizer, config.json as a dict) of a checkpoint folder: all the dry run reads of it."""
    import checkpoint as C  # the file formats; imported here, so that the engine above needs only the model
    if C.is_adapter(path):
        raise SystemExit(f"--dry-run reads a full checkpoint's config.json: {path} is an adapter folder; "
                         "merge it first (python checkpoint.py merge ADAPTER OUT)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise SystemExit(f"--dry-run needs {path}/config.json and the tokenizer files (no weights): download "
                         "those first, e.g. huggingface-cli download GSAI-ML/LLaDA-8B-Instruct config.json "
                         "tokenizer.json tokenizer_config.json special_tokens_map.json --local-dir DIR")
    return C.load_tokenizer(path), C.read_config(path)


def synthetic_prompts(tokenizer, num_prompts, prompt_tokens):
    """Records whose chat prompt is at least prompt_tokens long: cut to their last prompt_tokens tokens
    (max_prompt_length) they are prompts of exactly that length, for any tokenizer."""
    text = " ".join(["1"] * (4 * prompt_tokens))
    return [{"prompt": [{"role": "user", "content": text}], "prefill": ""} for _ in range(num_prompts)]


class StopSampling(Exception):
    """Raised by the dry run's model after the first block of the sampler."""


def sample_one_block(run, model, sample, sampler, *, prompt_length, name, calls=1):
    """Run `sample()`, a call of the real sampler on `model` (e.g. generate.generate_records), for the first
    two forward passes of its first block: a block's first pass (the fast sampler's full pass that keeps the
    keys and values) and one of its other passes (the same shape every time: cached, with the fast sampler),
    each a phase repeated for every pass of every block. A block has steps / blocks passes, or block_length
    with threshold decoding (one commit per step: its worst case). Where the fast sampler asks for the logits
    of its still-masked positions (a bool mask), the dry run's model gives those of the whole block: every
    position masked, a block's first step. calls: how many sampler calls (generation batches) the real run
    makes, each like the first. Returns the assumptions, for the report."""
    num_blocks = sampler["gen_length"] // sampler["block_length"]
    passes = (sampler["block_length"] if sampler["threshold"] is not None
              else sampler["steps"] // num_blocks)
    block = slice(prompt_length, prompt_length + sampler["block_length"])
    forward, own_forward, made = model.forward, model.__dict__.get("forward"), 0

    def probe(x, attention_mask=None, positions=slice(None), **kwargs):
        nonlocal made
        made += 1
        if made > min(passes, 2):
            raise StopSampling
        if made == 2:
            run.end()
            run.begin(f"{name}: other passes", repeat=calls * num_blocks * (passes - 1))
        if not isinstance(positions, torch.Tensor):
            return forward(x, attention_mask, positions, **kwargs)
        out = forward(x, attention_mask, block, **kwargs)  # (rows, block_length, V), or (logits, kv)
        return (out[0].flatten(0, 1), out[1]) if isinstance(out, tuple) else out.flatten(0, 1)

    model.forward = probe  # this model object, for this call only
    run.begin(f"{name}: first pass of a block", repeat=calls * num_blocks)
    try:
        sample()
    except StopSampling:
        pass
    finally:
        if own_forward is None:
            del model.forward
        else:
            model.forward = own_forward
    run.end()
    return [f"the sampler: {calls} call(s) of {num_blocks} blocks of {passes} forward passes, each pass as "
            "the first block's first or second, every position of the block masked (a block's first step, "
            "its worst case)"]


def materialise_optimizer_state(optimizer, params, keep_grads=False):
    """AdamW's moments exist from a run's first optimiser step on, and are live in every later phase: one
    step on zero gradients at lr 0 makes them now, before the phases. keep_grads: leave the (zero) gradients
    in place, as an earlier micro-batch of the same step would have."""
    for p in params:
        p.grad = torch.zeros_like(p)
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    if not keep_grads:
        optimizer.zero_grad(set_to_none=True)


def finish(run, gpu_memory_gib, notes):
    """Print the report and the notes; the exit status: 0 when every phase fits, else a message."""
    text, fits = run.report(gpu_memory_gib)
    print(text)
    print("\nthe dry run assumed:")
    for note in notes:
        print(f"  - {note}")
    if not fits:
        return (f"--dry-run: a phase needs more than --dry-run-gpu-memory {gpu_memory_gib} GiB (above): "
                "lower the batch, or use --grad-checkpointing, LoRA or --fsdp")
    return 0
