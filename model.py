"""
The masked diffusion language model (dLLM): the network, and LoRA on it.

A LLaDA-compatible bidirectional transformer (Nie et al. 2025, "Large Language Diffusion Models"):
pre-RMSNorm blocks, RoPE, full (non-causal) attention, SwiGLU MLP, no biases, an untied LM head.
`logits = model(input_ids)` with shape (B, L, V). The model never sees a causal mask: it is trained to
predict the tokens hidden behind the mask token `mask_id` anywhere in the sequence. Its module names are
LLaDA's, so that checkpoint.py maps LLaDA's published tensors onto it with one prefix.

Also here: LoRA written by hand (the adapters, switching them off for the GRPO reference policy, and that
reference's exact sync), and what full fine-tuning of a config needs in GPU memory. Everything about files
(checkpoints, tokenizers, adapters in PEFT's format) is in checkpoint.py; this file imports none of ours.
"""

import contextlib
import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Configuration: the fields of LLaDA's config.json that define the network


@dataclasses.dataclass
class ModelConfig:
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    mlp_hidden_size: int = 12288
    vocab_size: int = 126464
    embedding_size: int = 126464  # rows of the embedding and LM head (>= vocab_size, padded)
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    max_sequence_length: int = 4096
    mask_token_id: int = 126336
    eos_token_id: int = 126081
    pad_token_id: int = 126081
    init_std: float = 0.02

    @property
    def head_dim(self):
        return self.d_model // self.n_heads

    @classmethod
    def from_llada(cls, cfg: dict):
        """Read LLaDA's config.json (unknown fields are ignored; architecture switches are checked)."""
        unsupported = {"alibi": False, "weight_tying": False, "include_bias": False, "rope": True,
                       "block_type": "llama", "layer_norm_type": "rms", "activation_type": "silu",
                       "include_qkv_bias": False, "attention_layer_norm": False, "input_emb_norm": False,
                       "scale_logits": False}
        for key, expected in unsupported.items():
            if key in cfg and cfg[key] != expected:
                raise ValueError(f"config.json has {key}={cfg[key]!r}; this model.py supports only "
                                 f"{key}={expected!r} (LLaDA-8B's architecture)")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in cfg.items() if k in fields and v is not None}
        if "n_kv_heads" not in kwargs or kwargs.get("n_kv_heads") is None:
            kwargs["n_kv_heads"] = kwargs.get("n_heads", cls.n_heads)
        if "mlp_hidden_size" not in kwargs:  # LLaDA's block: mlp_hidden_size, else mlp_ratio * d_model
            kwargs["mlp_hidden_size"] = (cfg.get("mlp_ratio") or 4) * kwargs.get("d_model", cls.d_model)
        kwargs.setdefault("rope_theta", 10000.0)  # LLaDAConfig's default when config.json omits it
        if "embedding_size" not in kwargs:
            kwargs["embedding_size"] = kwargs.get("vocab_size", cls.vocab_size)
        return cls(**kwargs)

    def to_llada(self):
        """A config.json that LLaDA's own modeling code (configuration_llada.LLaDAConfig) loads."""
        return {
            "architectures": ["LLaDAModelLM"],
            "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                         "AutoModel": "modeling_llada.LLaDAModelLM",
                         "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
            "model_type": "llada",
            "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "attention_dropout": 0.0,
            "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
            "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama",
            "d_model": self.d_model, "embedding_dropout": 0.0, "embedding_size": self.embedding_size,
            "eos_token_id": self.eos_token_id, "flash_attention": False, "include_bias": False,
            "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
            "init_fn": "mitchell", "init_std": self.init_std, "input_emb_norm": False,
            "layer_norm_type": "rms", "layer_norm_with_affine": True, "mask_token_id": self.mask_token_id,
            "max_sequence_length": self.max_sequence_length, "mlp_hidden_size": self.mlp_hidden_size,
            "mlp_ratio": max(1, self.mlp_hidden_size // self.d_model),
            "multi_query_attention": None, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
            "n_layers": self.n_layers, "pad_token_id": self.pad_token_id, "precision": "amp_bf16",
            "residual_dropout": 0.0, "rms_norm_eps": self.rms_norm_eps, "rope": True,
            "rope_full_precision": True, "rope_theta": self.rope_theta, "scale_logits": False,
            "use_cache": False, "vocab_size": self.vocab_size, "weight_tying": False,
        }


# Presets. "llada-8b" is LLaDA-8B-Instruct's shape. The tiny ones use checkpoint.py's character tokenizer
# (their vocabulary and special ids are filled in from it by checkpoint.build_model).
PRESETS = {
    "llada-8b": ModelConfig(),
    # ~200k parameters: small enough to learn 4x4 Sudoku on a laptop CPU
    "tiny": ModelConfig(d_model=64, n_layers=4, n_heads=4, n_kv_heads=4, mlp_hidden_size=176,
                        max_sequence_length=256),
    # ~2x wider and deeper, for when the tiny one is too small
    "small": ModelConfig(d_model=128, n_layers=6, n_heads=4, n_kv_heads=4, mlp_hidden_size=352,
                         max_sequence_length=512),
    # ~60M parameters with a 32k vocabulary: the benchmark's "real-ish" model
    "bench-60m": ModelConfig(d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, mlp_hidden_size=1408,
                             vocab_size=32000, embedding_size=32000, mask_token_id=31999,
                             eos_token_id=31998, pad_token_id=31998, max_sequence_length=2048),
}

# -----------------------------------------------------------------------------
# The network. Module names follow LLaDA's modeling code so that checkpoint.py's name table is one
# prefix: our `blocks.3.q_proj.weight` is LLaDA's `model.transformer.blocks.3.q_proj.weight`.


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalised in fp32 whatever the activation dtype, as LLaDA does
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(seq_len, head_dim, theta, device):
    """RoPE tables (seq_len, head_dim) in fp32, rotate-half layout (LLaDA's RotaryEmbedding)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


class Block(nn.Module):
    """One LLaDA "llama" block: x + attn(norm(x)), then x + swiglu(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        kv_dim = cfg.n_kv_heads * cfg.head_dim
        self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, kv_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, kv_dim, bias=False)
        self.attn_out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.ff_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.ff_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden_size, bias=False)  # gate
        self.up_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(cfg.mlp_hidden_size, cfg.d_model, bias=False)  # down

    def forward(self, x, cos, sin, attn_mask, past_kv=None, queries=None, return_kv=False):
        """x (B, L, d_model) -> x. For key/value caching, x may hold only positions queries = (q0, q1) of a
        longer sequence, cos/sin (Lq, head_dim) being their RoPE rows (their absolute positions): the keys and
        values of the other positions then come from past_kv = (k, v), each (B, n_kv_heads, L_all, head_dim)
        after RoPE. return_kv=True returns (x, (k, v)), the keys and values of the whole sequence this
        attention read: the queried positions' own in place of past_kv's."""
        B, L, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, L, D)
        k = self.k_proj(h).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        # RoPE in full precision (LLaDA's rope_full_precision=True)
        dtype = q.dtype
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(dtype)
        if past_kv is not None:  # the cached keys/values before and after the queried positions
            (q0, q1), (past_k, past_v) = queries, past_kv
            k = torch.cat([past_k[:, :, :q0], k, past_k[:, :, q1:]], dim=2)  # (B, n_kv_heads, L_all, D)
            v = torch.cat([past_v[:, :, :q0], v, past_v[:, :, q1:]], dim=2)
        kv = (k, v) if return_kv else None  # held needlessly, it would outlive the grouped-query copies
        if self.n_kv_heads != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        # bidirectional: no causal mask, only the optional key-padding mask
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x + self.attn_out(y.transpose(1, 2).reshape(B, L, -1))
        h = self.ff_norm(x)
        if torch.is_grad_enabled():
            x = x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))
        else:  # in place: one (B, L, mlp_hidden_size) tensor less at the sampler's peak, the same numbers
            x = x + self.ff_out(F.silu(self.ff_proj(h), inplace=True).mul_(self.up_proj(h)))
        return (x, kv) if return_kv else x


class LLaDA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.embedding_size, cfg.d_model)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.ln_f = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.ff_out = nn.Linear(cfg.d_model, cfg.embedding_size, bias=False)  # LM head, untied
        self.gradient_checkpointing = False
        self._rope_cache = {}

    def init_weights(self, seed=0):
        """Random init: N(0, init_std) everywhere. A small embedding std matters: at N(0, 1) the token
        signal drowns RoPE's position signal and a tiny model never learns to copy the given cells."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or name == "ln_f.weight":
                nn.init.ones_(p)
            else:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * self.cfg.init_std)
        return self

    def rope(self, seq_len, device):
        key = (seq_len, str(device))
        if key not in self._rope_cache:
            self._rope_cache = {key: rope_cos_sin(seq_len, self.cfg.head_dim, self.cfg.rope_theta, device)}
        return self._rope_cache[key]

    def forward(self, input_ids, attention_mask=None, positions=slice(None), past_kv=None,
                queries=slice(None), return_kv=False):
        """input_ids (B, L) -> logits (B, L, V). attention_mask (B, L) of 0/1 hides padded keys;
        without it every position attends to every position, exactly as LLaDA did for d1. `positions`, a
        slice, keeps the logits of those positions only: the sampler reads one block and the estimator the
        completion, and at a 126k vocabulary the LM head over the prompt would cost memory for nothing.
        positions may also be a (B, L) bool mask: the logits (N, V) of its N True positions, row by row (the
        fast sampler reads only the block's still-masked positions).

        Key/value caching (the sampler's prefix and dual caches, Fast-dLLM, Wu et al. 2025): `queries`, a
        slice of input_ids' positions, are the only positions run through the network (RoPE at their
        absolute positions); every other position's keys and values come from past_kv, a list of per-layer
        (k, v) of the whole sequence (B, n_kv_heads, L, head_dim) after RoPE, as return_kv=True returns them
        (then the result is (logits, kv), the queried positions' keys and values in place of past_kv's).
        `positions` are absolute and must lie within `queries`. Cached calls are never checkpointed."""
        B, L = input_ids.shape
        position_mask = isinstance(positions, torch.Tensor)
        cos, sin = self.rope(L, input_ids.device)
        attn_mask = None
        if attention_mask is not None:
            attn_mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L) over keys
        caching = past_kv is not None or return_kv
        if caching:  # the queried positions only: (B, Lq, d_model) and their RoPE rows
            q0, q1, step = queries.indices(L)
            if step != 1 or (q0, q1) != (0, L) and past_kv is None:
                raise ValueError(f"queries {queries} need past_kv for the positions outside them "
                                 "(and a step of 1)")
            if position_mask:
                if positions[:, :q0].any() or positions[:, q1:].any():
                    raise ValueError(f"the positions mask must lie within queries {queries}")
                positions = positions[:, q0:q1]
            else:
                # the default slice(None): all the queried positions
                p0, p1, p_step = positions.indices(L) if positions != slice(None) else (q0, q1, 1)
                if p1 > p0 and (p0 < q0 or p1 > q1):
                    raise ValueError(f"positions {positions} must lie within queries {queries}")
                positions = slice(p0 - q0, p1 - q0, p_step) if p1 > p0 else slice(0, 0)
            x = self.wte(input_ids[:, q0:q1])
            cos, sin = cos[q0:q1], sin[q0:q1]
        else:
            x = self.wte(input_ids)
        kv = [] if return_kv else None  # only when asked: with past_kv it would hold the cache twice
        for i, block in enumerate(self.blocks):
            if caching:
                layer_past = None if past_kv is None else past_kv[i]
                if return_kv:
                    x, layer_kv = block(x, cos, sin, attn_mask, layer_past, (q0, q1), return_kv=True)
                    kv.append(layer_kv)
                else:
                    x = block(x, cos, sin, attn_mask, layer_past, (q0, q1))
            # on whenever a backward will follow (GRPO computes its gradients in eval mode: no dropout)
            elif self.gradient_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, attn_mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, attn_mask)
        logits = self.ff_out(self.ln_f(x[positions] if position_mask else x[:, positions]))
        # a padded embedding (rows past the vocabulary) is cut; otherwise no slice, so no strided view to copy
        logits = (logits[..., : self.cfg.vocab_size] if self.cfg.embedding_size > self.cfg.vocab_size
                  else logits)
        return (logits, kv) if return_kv else logits


def autocast(device, dtype=torch.bfloat16):
    """bf16 (or `dtype`) autocast on GPUs; plain fp32 on CPUs (most CPUs run bf16 matmuls far slower
    than fp32)."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


# fp32 logits per chunk of chunked_cross_entropy (256 MiB): a chunk's backward holds ~4 such tensors
LOGPROB_CHUNK_ELEMENTS = 2**26


class ChunkedCrossEntropy(torch.autograd.Function):
    """F.cross_entropy(logits.float(), targets, reduction="none"): logits (N, V), targets (N,) -> (N,) fp32,
    `rows` rows at a time, each chunk's fp32 copy and log-softmax recomputed in backward: only the logits
    (bf16 under autocast) are saved, where cross_entropy saves an fp32 (N, V) log-softmax (1.8 GiB per
    3840 tokens at LLaDA's vocabulary). A row's loss and gradient do not depend on its chunk: the same kernels
    run on the same rows, so values and gradients are bitwise those of one call."""

    @staticmethod
    def forward(ctx, logits, targets, rows):
        ctx.save_for_backward(logits, targets)
        ctx.rows = rows
        return torch.cat([F.cross_entropy(logits[i:i + rows].float(), targets[i:i + rows], reduction="none")
                          for i in range(0, len(logits), rows)])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        logits, targets = ctx.saved_tensors
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for i in range(0, len(logits), ctx.rows):
            with torch.enable_grad():  # the chunk's forward again, then its backward alone
                chunk = logits[i:i + ctx.rows].detach().requires_grad_()
                loss = F.cross_entropy(chunk.float(), targets[i:i + ctx.rows], reduction="none")
                grad_logits[i:i + ctx.rows] = torch.autograd.grad(loss, chunk, grad_output[i:i + ctx.rows])[0]
        return grad_logits, None, None


def chunked_cross_entropy(logits, targets):
    """F.cross_entropy(logits.float(), targets, reduction="none"): logits (N, V), targets (N,) -> (N,) fp32,
    in chunks of LOGPROB_CHUNK_ELEMENTS // V rows recomputed in backward (ChunkedCrossEntropy). Rows that fit
    one chunk take one plain call: recomputed, it would hold the logits beside a new log-softmax."""
    rows = max(1, LOGPROB_CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    if len(logits) <= rows:
        return F.cross_entropy(logits.float(), targets, reduction="none")
    return ChunkedCrossEntropy.apply(logits, targets, rows)


def token_logprobs(logits, targets):
    """log p(target) at every position: -CE(logits_i, target_i). logits (B, L, V), targets (B, L) ->
    (B, L), in fp32 chunks of positions (chunked_cross_entropy). The logits are flattened to (B * L, V),
    which needs no copy (cross_entropy over a transposed (B, V, L) view would make one)."""
    B, L, V = logits.shape
    return -chunked_cross_entropy(logits.flatten(0, 1), targets.flatten()).view(B, L)


def num_parameters(model):
    return sum(p.numel() for p in model.parameters())


def config_parameters(cfg):
    """How many parameters a model of this config has (counted on the meta device: no memory)."""
    with torch.device("meta"):
        return num_parameters(LLaDA(cfg))


# Full fine-tuning keeps, per trained parameter, an fp32 weight, an fp32 gradient and AdamW's two fp32
# moments; GRPO with beta > 0 adds a frozen fp32 reference copy. Activations come on top.
BYTES_PER_TRAINED_PARAMETER = 16
BYTES_PER_REFERENCE_PARAMETER = 4


def full_finetuning_bytes(num_params, world_size=1, fsdp=False, reference=False):
    """Bytes per GPU of the weights, gradients, AdamW state (and reference) of full fine-tuning: all of them
    on every rank under DDP, a 1 / world_size shard of each under FSDP."""
    per_parameter = BYTES_PER_TRAINED_PARAMETER + (BYTES_PER_REFERENCE_PARAMETER if reference else 0)
    return num_params * per_parameter // (world_size if fsdp else 1)


def check_full_finetuning_fits(num_params, gpu_bytes, world_size=1, fsdp=False, reference=False):
    """Refuse, before loading anything, a full fine-tuning whose states alone exceed the GPU's memory (an 8B
    model needs ~128 GB per GPU under DDP: forgetting --lora-r should not end in an out-of-memory error)."""
    need = full_finetuning_bytes(num_params, world_size, fsdp, reference)
    if need > gpu_bytes:
        raise SystemExit(
            f"full fine-tuning of {num_params / 1e9:.2f}B parameters needs {need / 2**30:.0f} GiB per GPU "
            f"for fp32 weights, gradients and AdamW state{' and the reference copy' if reference else ''}, "
            f"more than this GPU's {gpu_bytes / 2**30:.0f} GiB: pass --lora-r R to train LoRA adapters on "
            "a frozen bf16 base, or --fsdp to shard full fine-tuning over the GPUs")


# -----------------------------------------------------------------------------
# LoRA (Hu et al. 2021), by hand: W x + (alpha / r) * B A dropout(x), A (r, in), B (out, r), B = 0 at start.

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")


class LoRALinear(nn.Linear):
    """An nn.Linear with a low-rank update. It keeps the base `weight` under its own name, so that the
    base checkpoint table does not change when adapters are added."""

    def add_adapter(self, r, alpha, dropout, generator=None):
        self.r, self.scaling = r, alpha / r
        self.lora_dropout = nn.Dropout(dropout)
        # adapters train in fp32 even on a bf16 base: AdamW updates of bf16 weights lose small steps
        # A is drawn on the CPU from add_lora's generator, with PEFT's default init
        lora_A = torch.empty(r, self.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(lora_A.to(self.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=self.weight.device,
                                               dtype=torch.float32))
        self.lora_enabled = True
        self.reference_delta = None  # (out, in): what the GRPO reference adds to the base once synced

    def delta_weight(self):
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x):
        y = F.linear(x, self.weight)
        if self.lora_enabled:
            h = self.lora_dropout(x)
            # under autocast the bf16 input stays bf16: no fp32 copy
            if not torch.is_autocast_enabled(x.device.type):
                h = h.to(self.lora_A.dtype)
            y = y + (F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling).to(y.dtype)
        elif self.reference_delta is not None:  # the synced reference policy: W0 + its dense delta
            y = y + F.linear(x, self.reference_delta)
        return y


def add_lora(model, r, alpha, dropout=0.0, targets=LORA_TARGETS, seed=0):
    """Turn the target linears inside the blocks into LoRALinear (never the LM head); freeze the rest.
    Returns the model, whose trainable parameters are now the adapters alone."""
    bad = set(targets) - set(LORA_TARGETS)
    if bad:
        raise ValueError(f"unknown LoRA targets {sorted(bad)}; choose from {LORA_TARGETS} (LLaDA's names for "
                         "Llama's o_proj, gate_proj and down_proj are attn_out, ff_proj and ff_out)")
    generator = torch.Generator().manual_seed(seed)  # A's init; B starts at zero so the model is unchanged
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.blocks:
        for name in targets:
            linear = getattr(block, name)
            linear.__class__ = LoRALinear
            linear.add_adapter(r, alpha, dropout, generator)
    model.lora_config = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout,
                         "target_modules": list(targets)}
    return model


def lora_modules(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


@contextlib.contextmanager
def adapters_disabled(model):
    """The reference policy of LoRA GRPO: adapters switched off inside the blocks, which leaves the base model
    until sync_lora_reference has given the layers a reference delta."""
    modules = [m for _, m in lora_modules(model)]
    for m in modules:
        m.lora_enabled = False
    try:
        yield model
    finally:
        for m in modules:
            m.lora_enabled = True


def sync_lora_reference(model, alpha):
    """TRL's reference mix-up, ref_W = alpha * W + (1 - alpha) * ref_W, on the effective weights of a LoRA
    model. Policy and reference share the frozen base W0, so the mix acts on their deltas over it:
    ref_delta = alpha * s B A + (1 - alpha) * ref_delta, zero before the first sync. A mix of products is
    not the product of mixed factors, so the reference delta is dense: one (out, in) tensor per adapted
    layer, in the base's dtype (LLaDA-8B with q, k, v and up adapted: 3.2e9 numbers, 6.4 GB in bf16,
    allocated at the first sync)."""
    with torch.no_grad():
        for _, m in lora_modules(model):
            delta = m.delta_weight().to(m.weight.dtype)
            if m.reference_delta is None:
                m.reference_delta = alpha * delta
            else:
                m.reference_delta.mul_(1 - alpha).add_(delta, alpha=alpha)


def reference_deltas(model):
    """{module name: reference delta} of the layers a sync has reached (for checkpoints)."""
    return {name: m.reference_delta for name, m in lora_modules(model) if m.reference_delta is not None}


def set_reference_deltas(model, deltas):
    for name, m in lora_modules(model):
        if name in deltas:
            m.reference_delta = deltas[name].to(device=m.weight.device, dtype=m.weight.dtype)


# -----------------------------------------------------------------------------
# `python model.py merge ADAPTER_DIR OUT_DIR` is an alias of checkpoint.py's command line

if __name__ == "__main__":
    import os
    import runpy

    runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoint.py"),
                   run_name="__main__")
