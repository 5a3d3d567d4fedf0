"""
Distributed training by hand, on torch.distributed: the process group, collectives, and sharding.

The same script runs three ways:
    python sft.py                                        # one process, no process group (world 1)
    torchrun --standalone --nproc_per_node=2 sft.py      # CPU processes over gloo
    torchrun --standalone --nproc_per_node=8 sft.py      # GPUs over nccl, one per process
    torchrun --nnodes 2 --nproc_per_node=8 --rdzv-backend c10d --rdzv-endpoint HOST:PORT sft.py  # per node

Every rank runs the same code path. Data is sharded by rank, gradients of the trainable parameters
are averaged with all_reduce (flattened into buckets, not one call per tensor), metrics are averaged
before rank 0 prints them, and rank 0 alone writes files.
"""

import contextlib
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# Process group


def init():
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK):
    nccl on CUDA, gloo on CPU; with no RANK, a single process of world 1.
    Returns (rank, world_size, device)."""
    if "RANK" not in os.environ:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return 0, 1, device
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        # the GPU comes from the rank on this node (RANK is global across nodes); modulo the GPUs this process
        # sees, since a launcher may show each process one GPU (SLURM --gpus-per-task=1: always cuda:0)
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    return rank, world_size, device


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if is_distributed() else 0


def world_size():
    return dist.get_world_size() if is_distributed() else 1


def cleanup():
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()
        # gloo's worker thread may still be freeing tensors of the last collective; if the interpreter is
        # already shutting down it cannot take the GIL and aborts the process: let it finish
        time.sleep(0.2)


# -----------------------------------------------------------------------------
# Preemption: SLURM (and torchrun, which forwards it to every worker) sends SIGTERM before killing a job

_sigterm = {"received": False}


def stop_on_sigterm():
    """From now on SIGTERM only raises a flag: the loop finishes its step, agrees with the other ranks on
    stopping (any_rank(sigterm_received()), since each rank sees the signal at its own moment), saves a
    checkpoint and exits. A second SIGTERM changes nothing; a SIGKILL mid-save leaves the previous
    checkpoint intact (checkpoints are written under a temporary name, then renamed)."""
    def handler(signum, frame):  # no print here: a print interrupted by the signal would be re-entered
        _sigterm["received"] = True

    signal.signal(signal.SIGTERM, handler)


def sigterm_received():
    return _sigterm["received"]


def exit_after_preemption(step):
    """Every rank, once the checkpoint of `step` is saved: say how to continue, and exit with status 0."""
    print0(f"SIGTERM: stopped after step {step} and saved its checkpoint; "
           "the same command with --resume continues")
    cleanup()
    raise SystemExit(0)


def print0(*args, **kwargs):
    if rank() == 0:
        print(*args, **kwargs, flush=True)


def barrier():
    if is_distributed():
        dist.barrier()


# -----------------------------------------------------------------------------
# Gradients, parameters and metrics

BUCKET_ELEMENTS = 2**26  # 64M elements per all_reduce: bounds the extra memory of the flat copy


def all_reduce_gradients(params):
    """Average the gradients of `params` over ranks, in place. Gradients are flattened into buckets so
    that a LoRA model with hundreds of adapter tensors costs a handful of collectives."""
    if not is_distributed():
        return
    grads = [p.grad for p in params if p.grad is not None and not is_dtensor(p.grad)]  # FSDP averaged those
    world = world_size()
    i = 0
    while i < len(grads):
        bucket, n = [], 0
        while i < len(grads) and (not bucket or n + grads[i].numel() <= BUCKET_ELEMENTS):
            bucket.append(grads[i])
            n += grads[i].numel()
            i += 1
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def broadcast_parameters(module):
    """Copy rank 0's trainable parameters to every rank, so that all ranks start identical. Frozen ones
    (a LoRA base: 16 GB at 8B) are not sent: every rank loaded them from the same files."""
    if not is_distributed():
        return
    for p in module.parameters():
        if p.requires_grad and not is_dtensor(p):  # FSDP shards were cut from the same full weights
            dist.broadcast(p.data, src=0)


def assert_parameters_identical(module):
    """Check that every rank holds the same trainable parameters (a cheap checksum, gathered): a broken
    gradient average shows up here, not as a silently diverged run. Sums accumulate in fp64 without an
    fp64 copy of each tensor."""
    # sharded: one copy, nothing to compare
    if not is_distributed() or any(is_dtensor(p) for p in module.parameters()):
        return
    with torch.no_grad():
        checksum = sum(float(p.sum(dtype=torch.float64)) + float(p.abs().sum(dtype=torch.float64))
                       for p in module.parameters() if p.requires_grad)
    sums = gather_objects(checksum)
    if any(s != sums[0] for s in sums):
        raise RuntimeError(f"parameters differ across ranks (checksums {sums})")
    print0(f"parameters identical on all {len(sums)} ranks")


# -----------------------------------------------------------------------------
# FSDP2 for full fine-tuning that does not fit one GPU: torch's own sharding, not ours. Parameters,
# gradients and AdamW state are split over the ranks (DTensors); each block's full weights are gathered just
# before it runs and freed after, and its gradients are averaged over the ranks by a reduce-scatter in the
# backward pass (so all_reduce_gradients, broadcast_parameters and assert_parameters_identical skip them).


def shard_model(model, device, mesh=None):
    """fully_shard each block, then the root (embedding, final norm, LM head). On GPUs the gathered weights
    are bf16 and gradients are reduced in fp32, as autocast would compute them. mesh: the ranks to shard
    over (default: the whole world)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy()
    if torch.device(device).type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    # the root too is sharded again after each forward (FSDP's default keeps it gathered for the backward),
    # so that the weights are always slices between steps (GRPO mixes the policy into the reference slice
    # by slice) and the gathered embedding and head do not sit in memory during rollouts
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    return model


def fsdp_modules(model):
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def unsharded(model):
    """Hold a sharded model's full weights for a stretch of no-grad forward passes that ranks run a
    different number of times (the sampler skips a step with nothing to commit; evaluation splits examples
    unevenly): with the weights gathered once, those passes need no collective. A no-op for a model that
    is not sharded."""
    modules = fsdp_modules(model) if "torch.distributed.fsdp" in sys.modules else []
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield model
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


def is_dtensor(t):
    return type(t).__name__ == "DTensor"  # without importing torch.distributed.tensor (seconds) when unused


def collective_device():
    """Where small tensors of metrics must live to be reduced: nccl reduces CUDA tensors only."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(metrics: dict):
    """Average a dict of floats over ranks (every rank must pass the same keys)."""
    if not is_distributed() or not metrics:
        return dict(metrics)
    keys = sorted(metrics)
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: v / world_size() for k, v in zip(keys, t.tolist())}


def all_reduce_sum(values):
    """Sum a list of floats over ranks."""
    if not is_distributed():
        return list(values)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def any_rank(flag: bool):
    """True on every rank when any rank says True: a stop flag that leaves no rank waiting."""
    return all_reduce_sum([1.0 if flag else 0.0])[0] > 0


def gather_objects(obj):
    """Every rank's picklable object, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def shard(items, rank, world_size):
    """The items rank `rank` owns: every world_size-th one, starting at rank."""
    return items[rank::world_size]
