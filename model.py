"""
The masked diffusion language model (dLLM) and everything about its files.

A LLaDA-compatible bidirectional transformer (Nie et al. 2025, "Large Language Diffusion Models"):
pre-RMSNorm blocks, RoPE, full (non-causal) attention, SwiGLU MLP, no biases, an untied LM head.
`logits = model(input_ids)` with shape (B, L, V). The model never sees a causal mask: it is trained to
predict the tokens hidden behind the mask token `mask_id` anywhere in the sequence.

This file also owns
- loading and saving checkpoints in LLaDA's published layout (config.json + safetensors shards, the
  tensor names of LLaDA's own modeling code), streamed one shard at a time;
- the offline character-level tokenizer of the tiny tasks;
- LoRA written by hand, with adapters saved in PEFT's format;
- the masked-diffusion primitives that SFT and diffu-GRPO share: forward masking with the LLaDA SFT
  loss, and per-token log-probabilities.

It imports none of the other scripts.
"""

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

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


# Presets. "llada-8b" is LLaDA-8B-Instruct's shape. The tiny ones use the character tokenizer below
# (their vocabulary and special ids are filled in from it by build_model).
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
# The network. Module names follow LLaDA's modeling code so that the checkpoint table below is one
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
        kv = (k, v)
        if self.n_kv_heads != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        # bidirectional: no causal mask, only the optional key-padding mask
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x + self.attn_out(y.transpose(1, 2).reshape(B, L, -1))
        h = self.ff_norm(x)
        x = x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))
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

    def forward(self, input_ids, attention_mask=None, positions=slice(None), past_kv=None, queries=slice(None),
                return_kv=False):
        """input_ids (B, L) -> logits (B, L, V). attention_mask (B, L) of 0/1 hides padded keys;
        without it every position attends to every position, exactly as LLaDA did for d1. `positions`, a
        slice, keeps the logits of those positions only: the sampler reads one block and the estimator the
        completion, and at a 126k vocabulary the LM head over the prompt would cost memory for nothing.

        Key/value caching (the sampler's prefix and dual caches, Fast-dLLM, Wu et al. 2025): `queries`, a
        slice of input_ids' positions, are the only positions run through the network (RoPE at their
        absolute positions); every other position's keys and values come from past_kv, a list of per-layer
        (k, v) of the whole sequence (B, n_kv_heads, L, head_dim) after RoPE, as return_kv=True returns them
        (then the result is (logits, kv), the queried positions' keys and values in place of past_kv's).
        `positions` are absolute and must lie within `queries`. Cached calls are never checkpointed."""
        B, L = input_ids.shape
        cos, sin = self.rope(L, input_ids.device)
        attn_mask = None
        if attention_mask is not None:
            attn_mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L) over keys
        caching = past_kv is not None or return_kv
        if caching:  # the queried positions only: (B, Lq, d_model) and their RoPE rows
            q0, q1, step = queries.indices(L)
            if step != 1 or (q0, q1) != (0, L) and past_kv is None:
                raise ValueError(f"queries {queries} need past_kv for the positions outside them (and a step of 1)")
            p0, p1, p_step = positions.indices(L) if positions != slice(None) else (q0, q1, 1)  # default: all queried
            if p1 > p0 and (p0 < q0 or p1 > q1):
                raise ValueError(f"positions {positions} must lie within queries {queries}")
            x = self.wte(input_ids[:, q0:q1])
            cos, sin = cos[q0:q1], sin[q0:q1]
            positions = slice(p0 - q0, p1 - q0, p_step) if p1 > p0 else slice(0, 0)
            kv = []
        else:
            x = self.wte(input_ids)
        for i, block in enumerate(self.blocks):
            if caching:
                x, layer_kv = block(x, cos, sin, attn_mask, None if past_kv is None else past_kv[i], (q0, q1),
                                    return_kv=True)
                kv.append(layer_kv)
            # on whenever a backward will follow (GRPO computes its gradients in eval mode: no dropout)
            elif self.gradient_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, attn_mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, attn_mask)
        logits = self.ff_out(self.ln_f(x[:, positions]))
        # a padded embedding (rows past the vocabulary) is cut; otherwise no slice, so no strided view to copy
        logits = logits[..., : self.cfg.vocab_size] if self.cfg.embedding_size > self.cfg.vocab_size else logits
        return (logits, kv) if return_kv else logits


def num_parameters(model):
    return sum(p.numel() for p in model.parameters())


# -----------------------------------------------------------------------------
# The tiny tasks' tokenizer: one token per character, built offline with `tokenizers`.
# Its chat template is LLaDA's shape in short: <|startoftext|><|user|>{prompt}<|assistant|>{reply}

TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|startoftext|>", "<|mdm_mask|>", "<|user|>", "<|assistant|>",
                       "<|system|>", "<|eot_id|>", "<|unk|>"]
TINY_CHARS = "\n" + "".join(chr(c) for c in range(32, 127))  # newline and printable ASCII
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{% elif m['role'] == 'user' %}<|user|>"
    "{% else %}<|assistant|>{% endif %}{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}<|eot_id|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Tokenizer files are written in the format transformers 4.x and 5.x both read (a v5 save_pretrained
# writes a tokenizer_config.json that 4.x rejects), so checkpoints move between the two.
TOKENIZER_CONFIG_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token")


def build_tiny_tokenizer():
    """A character-level PreTrainedTokenizerFast with LLaDA-style special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(TINY_SPECIAL_TOKENS)}
    for ch in TINY_CHARS:
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")  # every char a token
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(TINY_SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", unk_token="<|unk|>", mask_token="<|mdm_mask|>",
        chat_template=TINY_CHAT_TEMPLATE, model_max_length=4096)


def mask_token_id(tokenizer):
    """The [MASK] id: the tokenizer's mask token, else LLaDA's <|mdm_mask|>."""
    if tokenizer.mask_token_id is not None:
        return tokenizer.mask_token_id
    return tokenizer.convert_tokens_to_ids("<|mdm_mask|>")


def stop_token_ids(tokenizer):
    """Ids that end a completion: EOS and end-of-turn (LLaDA: <|endoftext|> 126081, <|eot_id|> 126348)."""
    ids = {tokenizer.eos_token_id}
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    if isinstance(eot, int) and eot != tokenizer.unk_token_id:
        ids.add(eot)
    return sorted(i for i in ids if i is not None)


def encode_prompt(tokenizer, messages, prefill=""):
    """Token ids of a chat prompt: the template with the assistant header, then `prefill` (d1's evaluation
    appends "<reasoning>"). Rendered to text first, so it reads the same under transformers 4 and 5."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text + prefill, add_special_tokens=False)["input_ids"]


def save_tokenizer(tokenizer, path):
    tokenizer.backend_tokenizer.save(os.path.join(path, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast",
              "model_max_length": int(min(tokenizer.model_max_length, 10**9)),
              "clean_up_tokenization_spaces": False}
    for key in TOKENIZER_CONFIG_KEYS:
        value = getattr(tokenizer, key, None)
        if value is not None:
            config[key] = str(value)
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
        json.dump({k: config[k] for k in TOKENIZER_CONFIG_KEYS if k in config}, f, indent=2)


def load_tokenizer(path):
    """The tokenizer of a checkpoint folder (LLaDA's published one or ours). Loaded as the fast tokenizer
    class directly: AutoTokenizer would read config.json's auto_map and ask to run LLaDA's remote code."""
    from transformers import PreTrainedTokenizerFast

    if is_adapter(path) and not os.path.exists(os.path.join(path, "tokenizer.json")):
        path = adapter_base(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is not a checkpoint folder")
    if not os.path.exists(os.path.join(path, "tokenizer.json")) and not os.path.exists(
            os.path.join(path, "tokenizer_config.json")):
        raise FileNotFoundError(f"no tokenizer files (tokenizer.json / tokenizer_config.json) in {path}")
    return PreTrainedTokenizerFast.from_pretrained(path)


# -----------------------------------------------------------------------------
# Building a model: from a preset name or from a checkpoint folder


def build_model(preset, tokenizer=None, seed=0, device="cpu", dtype=torch.float32):
    """A randomly initialised model of a preset shape. Tiny presets take their vocabulary and special
    ids from the tokenizer."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)} or pass a checkpoint folder")
    cfg = dataclasses.replace(PRESETS[preset])
    if tokenizer is not None and preset != "llada-8b":
        cfg.vocab_size = cfg.embedding_size = len(tokenizer)
        cfg.mask_token_id = mask_token_id(tokenizer)
        cfg.eos_token_id = cfg.pad_token_id = tokenizer.eos_token_id
    model = LLaDA(cfg).init_weights(seed)
    return model.to(device=device, dtype=dtype)


# LLaDA's tensor names, in one table: ours -> theirs.
LLADA_PREFIX = "model.transformer."


def to_llada_name(name):
    return LLADA_PREFIX + name


def from_llada_name(name):
    if not name.startswith(LLADA_PREFIX):
        raise KeyError(f"unknown tensor {name!r}: LLaDA's tensors all start with {LLADA_PREFIX!r}")
    return name[len(LLADA_PREFIX):]


WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


def is_adapter(path):
    return os.path.exists(os.path.join(path, ADAPTER_CONFIG_NAME))


def adapter_base(path):
    """The base model folder a PEFT adapter folder names."""
    with open(os.path.join(path, ADAPTER_CONFIG_NAME)) as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base or not os.path.isdir(base):
        raise FileNotFoundError(f"adapter {path} names base model {base!r}, which is not a folder here; "
                                "edit base_model_name_or_path in its adapter_config.json")
    return base


def checkpoint_shards(path):
    """The safetensors files of a checkpoint folder, checked against its index."""
    index_path = os.path.join(path, INDEX_NAME)
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not os.path.exists(os.path.join(path, shard)):
                raise FileNotFoundError(f"shard {shard} listed in {index_path} is missing")
        return [os.path.join(path, s) for s in shards]
    single = os.path.join(path, WEIGHTS_NAME)
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {path}")


def read_config(path):
    """The ModelConfig of a checkpoint folder's config.json."""
    with open(os.path.join(path, "config.json")) as f:
        return ModelConfig.from_llada(json.load(f))


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
            f"full fine-tuning of {num_params / 1e9:.2f}B parameters needs {need / 2**30:.0f} GiB per GPU for fp32 "
            f"weights, gradients and AdamW state{' and the reference copy' if reference else ''}, more than this "
            f"GPU's {gpu_bytes / 2**30:.0f} GiB: pass --lora-r R to train LoRA adapters on a frozen bf16 base, or "
            "--fsdp to shard full fine-tuning over the GPUs")


def load_model(path, device="cpu", dtype=torch.float32):
    """Load a folder in LLaDA's layout (or a PEFT adapter folder on top of its base) into our model.

    Tensors stream one shard at a time, each converted to dtype on device and assigned into a model
    built on the meta device: host memory never holds a second copy of the weights."""
    if is_adapter(path):
        model = load_model(adapter_base(path), device, dtype)
        load_adapter(model, path)
        return model
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"no config.json in {path!r}: pass a checkpoint folder "
                                f"(LLaDA's layout) or a preset name ({', '.join(PRESETS)})")
    cfg = read_config(path)
    shards = checkpoint_shards(path)
    with torch.device("meta"):
        model = LLaDA(cfg)
    expected = dict(model.named_parameters())
    seen = set()
    for shard in shards:
        with safe_open(shard, framework="pt", device="cpu") as f:
            for key in f.keys():
                name = from_llada_name(key)
                if name not in expected:
                    raise KeyError(f"unknown tensor {key!r} in {shard}")
                tensor = f.get_tensor(key)
                if tuple(tensor.shape) != tuple(expected[name].shape):
                    raise ValueError(f"tensor {key!r} in {shard} has shape {tuple(tensor.shape)}, "
                                     f"the config expects {tuple(expected[name].shape)}")
                module_name, _, param_name = name.rpartition(".")
                module = model.get_submodule(module_name)
                setattr(module, param_name, nn.Parameter(tensor.to(device=device, dtype=dtype)))
                seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        raise KeyError(f"checkpoint {path} lacks {len(missing)} tensors, e.g. {to_llada_name(missing[0])!r}")
    return model


def merged_state(model):
    """Our parameters under their own names, LoRA (if any) merged into the base weights."""
    state = {}
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if pname in ("lora_A", "lora_B"):
                continue
            t = p.detach()
            if isinstance(module, LoRALinear) and pname == "weight" and module.lora_enabled:
                t = (t.float() + module.delta_weight()).to(t.dtype)  # added in fp32, rounded once to the base's dtype
            state[f"{name}.{pname}" if name else pname] = t
    return state


@contextlib.contextmanager
def files_into(path):
    """Write a set of files into folder `path` (created if needed): the caller writes them into a temporary
    folder, then each is moved into place with an atomic rename, so that no reader ever sees a half-written
    file."""
    os.makedirs(path, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=path)
    try:
        yield tmp
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(path, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_model(model, tokenizer, path, max_shard_bytes=5 * 2**30, extra_files=None, state=None):
    """Write a full checkpoint in LLaDA's published layout (LoRA merged in): config.json, safetensors
    shards under LLaDA's tensor names (+ index when sharded), tokenizer files. `extra_files` maps
    file names to JSON-able objects written alongside (arguments, step...). `state`, when given, holds the
    weights under our names (full_state_dict of a model sharded by FSDP) instead of the model's own."""
    state = {to_llada_name(k): v.contiguous() for k, v in (merged_state(model) if state is None else state).items()}
    with files_into(path) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(model.cfg.to_llada(), f, indent=2)
        shards, current, size = [], {}, 0
        for key, tensor in state.items():
            nbytes = tensor.numel() * tensor.element_size()
            if current and size + nbytes > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[key] = tensor
            size += nbytes
        shards.append(current)
        if len(shards) == 1:
            save_file({k: v.cpu() for k, v in shards[0].items()}, os.path.join(tmp, WEIGHTS_NAME),
                      metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file({k: v.cpu() for k, v in shard.items()}, os.path.join(tmp, name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            with open(os.path.join(tmp, INDEX_NAME), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        for name, obj in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(obj, f, indent=2)
    # weight files of an earlier save into the same folder that this one did not rewrite (other shards)
    keep = {WEIGHTS_NAME} if len(shards) == 1 else set(weight_map.values()) | {INDEX_NAME}
    for name in os.listdir(path):
        if name.startswith("model") and (name.endswith(".safetensors") or name == INDEX_NAME) and name not in keep:
            os.remove(os.path.join(path, name))


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
        lora_A = torch.empty(r, self.in_features, dtype=torch.float32)  # drawn on the CPU from add_lora's generator
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5), generator=generator)  # PEFT's default init of A
        self.lora_A = nn.Parameter(lora_A.to(self.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=self.weight.device, dtype=torch.float32))
        self.lora_enabled = True
        self.reference_delta = None  # (out, in): what the GRPO reference adds to the base once synced

    def delta_weight(self):
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x):
        y = F.linear(x, self.weight)
        if self.lora_enabled:
            h = self.lora_dropout(x)
            if not torch.is_autocast_enabled(x.device.type):  # under autocast the bf16 input stays bf16: no fp32 copy
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
        raise ValueError(f"unknown LoRA targets {sorted(bad)}; choose from {LORA_TARGETS}")
    generator = torch.Generator().manual_seed(seed)  # A's init; B starts at zero so the model is unchanged
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.blocks:
        for name in targets:
            linear = getattr(block, name)
            linear.__class__ = LoRALinear
            linear.add_adapter(r, alpha, dropout, generator)
    model.lora_config = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": list(targets)}
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
    """TRL's reference mix-up, ref_W = alpha * W + (1 - alpha) * ref_W, on the effective weights of a LoRA model.
    Policy and reference share the frozen base W0, so the mix acts on their deltas over it:
    ref_delta = alpha * s B A + (1 - alpha) * ref_delta, zero before the first sync. A mix of products is not the
    product of mixed factors, so the reference delta is dense: one (out, in) tensor per adapted layer, in the base's
    dtype (LLaDA-8B with q, k, v and up adapted: 3.2e9 numbers, 6.4 GB in bf16, allocated at the first sync)."""
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


def peft_name(module_name, which):
    # PEFT wraps LLaDAModelLM, whose submodule path is model.transformer.<ours>
    return f"base_model.model.{to_llada_name(module_name)}.{which}.weight"


def adapter_state(model):
    state = {}
    for name, m in lora_modules(model):
        state[peft_name(name, "lora_A")] = m.lora_A.detach().contiguous()
        state[peft_name(name, "lora_B")] = m.lora_B.detach().contiguous()
    return state


def save_adapter(model, path, base_model_name_or_path, extra_files=None):
    """Save the adapters in PEFT's format (adapter_config.json + adapter_model.safetensors)."""
    if not hasattr(model, "lora_config"):
        raise ValueError("save_adapter: the model has no LoRA adapters (add_lora first)")
    c = model.lora_config
    config = {"peft_type": "LORA", "task_type": None, "r": c["r"], "lora_alpha": c["lora_alpha"],
              "lora_dropout": c["lora_dropout"], "target_modules": c["target_modules"], "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
              "modules_to_save": None, "base_model_name_or_path": os.path.abspath(base_model_name_or_path)
              if os.path.isdir(base_model_name_or_path) else base_model_name_or_path,
              # PEFT matches target names by suffix: without a layer pattern "ff_out" would also catch the
              # LM head (model.transformer.ff_out); adapters live inside the blocks only
              "layers_pattern": "blocks", "layers_to_transform": list(range(model.cfg.n_layers))}
    with files_into(path) as tmp:
        with open(os.path.join(tmp, ADAPTER_CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=2)
        save_file({k: v.cpu() for k, v in adapter_state(model).items()}, os.path.join(tmp, ADAPTER_WEIGHTS_NAME),
                  metadata={"format": "pt"})
        for name, obj in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(obj, f, indent=2)


def load_adapter(model, path):
    """Add the adapters saved at path (PEFT's format) to model, in place."""
    with open(os.path.join(path, ADAPTER_CONFIG_NAME)) as f:
        c = json.load(f)
    if c.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {c.get('peft_type')!r}, only LORA adapters are supported")
    if not lora_modules(model):
        add_lora(model, c["r"], c["lora_alpha"], c.get("lora_dropout", 0.0), tuple(c["target_modules"]))
    modules = dict(lora_modules(model))
    weights_path = os.path.join(path, ADAPTER_WEIGHTS_NAME)
    if not os.path.exists(weights_path):
        raise FileNotFoundError(f"adapter folder {path} has no {ADAPTER_WEIGHTS_NAME}")
    pattern = re.compile(r"^base_model\.model\.model\.transformer\.(.+)\.(lora_A|lora_B)\.weight$")
    loaded = set()
    with safe_open(weights_path, framework="pt", device="cpu") as f:
        for key in f.keys():
            match = pattern.match(key)
            if not match or match.group(1) not in modules:
                raise KeyError(f"unknown adapter tensor {key!r} in {weights_path}")
            target = getattr(modules[match.group(1)], match.group(2))
            tensor = f.get_tensor(key)
            if tensor.shape != target.shape:
                raise ValueError(f"adapter tensor {key!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(tensor)
            loaded.add(key)
    missing = set(adapter_state(model)) - loaded
    if missing:
        raise KeyError(f"adapter {path} lacks {len(missing)} tensors, e.g. {sorted(missing)[0]!r}")
    return model


# -----------------------------------------------------------------------------
# Masked-diffusion primitives shared by SFT and diffu-GRPO


def forward_mask(input_ids, prompt_lengths, mask_id, eps=1e-3, generator=None, noise=None):
    """LLaDA's forward process for SFT. Per sequence t ~ U(0, 1), p = (1 - eps) t + eps; each response
    token is replaced by [MASK] with probability p; prompt tokens never are.
    The uniforms come from `noise` = (t (B,), u (B, >= L)) when the caller draws them (sft.py draws them for
    its whole global batch, so that a row's mask does not depend on how the batch is split over ranks),
    else from `generator`, on the CPU. Returns (noisy_ids (B, L), masked (B, L) bool, p (B, 1))."""
    B, L = input_ids.shape
    device = input_ids.device
    t, u = noise if noise is not None else (torch.rand(B, generator=generator), torch.rand(B, L, generator=generator))
    t, u = t.to(device), u[:, :L].to(device)
    p = ((1 - eps) * t + eps)[:, None]  # (B, 1)
    is_response = torch.arange(L, device=device)[None, :] >= prompt_lengths[:, None]
    masked = (u < p) & is_response
    noisy = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    return noisy, masked, p


def sft_loss(logits, input_ids, masked, p, prompt_lengths, start=0):
    """LLaDA's SFT loss (its appendix, eq. for SFT): the cross-entropy of every masked response token,
    weighted 1/p, summed and divided by the number of response tokens (d1's normalisation).
    logits (B, L - start, V) are those of positions start.. (the model's `positions=slice(start, None)`;
    start <= the shortest prompt, so every response position is there), input_ids/masked (B, L), p (B, 1),
    prompt_lengths (B,)."""
    L = input_ids.shape[1]
    masked, targets = masked[:, start:], input_ids[:, start:]
    ce = F.cross_entropy(logits[masked].float(), targets[masked], reduction="none")  # (num_masked,)
    num_response = (L - prompt_lengths).sum().clamp(min=1)
    return (ce / p.expand_as(masked)[masked]).sum() / num_response


LOGPROB_CHUNK_ELEMENTS = 2**28  # ~1 GiB of fp32 logits at a time in token_logprobs


def token_logprobs(logits, targets):
    """log p(target) at every position: -CE(logits_i, target_i). logits (B, L, V), targets (B, L) -> (B, L).
    Computed in fp32 chunks of rows to bound the (B, L, V) fp32 copy; each chunk is flattened to
    (rows * L, V), which needs no copy (cross_entropy over a transposed (B, V, L) view made one)."""
    B, L, V = logits.shape
    rows = max(1, LOGPROB_CHUNK_ELEMENTS // max(1, L * V))
    return torch.cat([-F.cross_entropy(logits[i:i + rows].float().flatten(0, 1), targets[i:i + rows].flatten(),
                                       reduction="none").view(-1, L) for i in range(0, B, rows)])


# -----------------------------------------------------------------------------
# Training checkpoints for exact resume: out_dir/checkpoint-<step>/ holds the weights (a full model in
# LLaDA's layout, or the LoRA adapter), trainer_state.pt (optimizer and RNG state, anything else the stage
# needs) and state.json (arguments and step). The folder is written under a temporary name and renamed, so
# a run killed at any moment, even mid-save, leaves the previous checkpoint intact.

CHECKPOINT_PREFIX = "checkpoint-"


def save_checkpoint(out_dir, step, model, tokenizer, base_model, trainer_state, args, keep=1, state=None):
    """Write checkpoint-<step> atomically, then delete all but the newest `keep` checkpoints. `state`: the
    gathered weights of a model sharded by FSDP (full_state_dict), written in place of the model's own."""
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + CHECKPOINT_PREFIX, dir=out_dir)
    if lora_modules(model):
        save_adapter(model, os.path.join(tmp, "adapter"), base_model)
    else:
        save_model(model, tokenizer, os.path.join(tmp, "model"), state=state)
    torch.save(trainer_state, os.path.join(tmp, "trainer_state.pt"))
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump({"step": step, "args": args}, f, indent=2)
    final = os.path.join(out_dir, f"{CHECKPOINT_PREFIX}{step:06d}")
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(tmp, final)
    # the new checkpoint is in place: the oldest beyond `keep` and leftovers of killed saves can go
    names = sorted(n for n in os.listdir(out_dir) if n.startswith(CHECKPOINT_PREFIX))
    old = [n for n in names if n != os.path.basename(final)][: max(0, len(names) - max(keep, 1))]
    for name in old + [n for n in os.listdir(out_dir) if n.startswith(".tmp-")]:
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    return final


def complete_checkpoints(out_dir):
    """The checkpoint folders of out_dir that hold a state.json (written last), newest first."""
    if not os.path.isdir(out_dir):
        return []
    names = sorted((n for n in os.listdir(out_dir) if n.startswith(CHECKPOINT_PREFIX)
                    and os.path.exists(os.path.join(out_dir, n, "state.json"))), reverse=True)
    return [os.path.join(out_dir, n) for n in names]


def load_checkpoint_weights(path, model):
    """Copy a checkpoint's weights (full model or adapter) into `model`, in place. A model sharded by FSDP
    gets them from rank 0, which alone reads the files."""
    if os.path.isdir(os.path.join(path, "adapter")):
        return load_adapter(model, os.path.join(path, "adapter"))
    if is_sharded(model):
        return load_full_state_dict(model, lambda: dict(load_model(os.path.join(path, "model")).named_parameters()))
    saved = load_model(os.path.join(path, "model"))
    with torch.no_grad():
        for (name, p), (name2, q) in zip(model.named_parameters(), saved.named_parameters()):
            assert name == name2, (name, name2)
            p.copy_(q)
    return model


def load_trainer_state(path):
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    # our own file, written by save_checkpoint: it holds RNG states (numpy tuples), hence weights_only=False
    # rank 0 wrote it; every rank reads it, memory-mapped: under FSDP it holds the full optimizer state, which
    # only rank 0 reads in full (load_full_optimizer_state)
    state["trainer_state"] = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False,
                                        map_location="cpu", mmap=True)
    return state


# Full fine-tuning sharded with FSDP2 (ddp.shard_model): its parameters are DTensors, each rank holding a
# 1 / world_size slice. Checkpoints hold the gathered full tensors, in the same files as an unsharded run:
# the weights stay in LLaDA's layout (evaluate.py and LLaDA's code read them as they are), at the cost of
# rank 0 holding one full copy in host memory while it writes (torch.distributed.checkpoint would write
# per-rank shards instead, in a layout nothing else here reads).
# (torch.distributed.checkpoint is imported only when a model is sharded: it adds seconds to every start)


def is_sharded(model):
    """Whether FSDP2's fully_shard was applied to the model."""
    if "torch.distributed.fsdp" not in sys.modules:
        return False
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def state_dict_options(load):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    if load:  # rank 0's full tensors, each rank keeping its slice
        return StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    return StateDictOptions(full_state_dict=True, cpu_offload=True)  # full tensors on rank 0's CPU, one at a time


def full_state_dict(model):
    """The model's state dict with full tensors: gathered onto rank 0 for a sharded model (a collective: every
    rank calls it; the others get {})."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(model, options=state_dict_options(load=False))


def full_optimizer_state(model, optimizer):
    """The optimizer's state dict, gathered onto rank 0 (tensors keyed by parameter name) when sharded."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer, options=state_dict_options(load=False))


def load_full_state_dict(model, read):
    """Load full weights into a model: `read()` returns them. A sharded model: rank 0 alone reads and every
    rank keeps its slice of rank 0's tensors; a read that fails on rank 0 raises on every rank (so that all
    ranks fall back to the same checkpoint)."""
    if not is_sharded(model):
        model.load_state_dict(read())
        return model
    state, error = {}, [None]
    if dist.get_rank() == 0:
        try:
            state = read()
        except Exception as e:  # told to every rank below, then raised everywhere
            error = [f"{type(e).__name__}: {e}"]
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise OSError(f"rank 0 could not read the weights ({error[0]})")
    from torch.distributed.checkpoint.state_dict import set_model_state_dict
    set_model_state_dict(model, state, options=state_dict_options(load=True))
    return model


def load_full_optimizer_state(model, optimizer, state):
    """Inverse of full_optimizer_state (rank 0's copy is the one broadcast when sharded)."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state if dist.get_rank() == 0 else {}, options=state_dict_options(load=True))


# Settings a resume may change: they extend the run or say where and how often to write, never what a step
# computes. (--max-steps moves the end, so a cosine or linear schedule spans the new length; gradient
# checkpointing only trades memory for time.) Any other changed flag is refused.
RESUME_MAY_CHANGE = ("max_steps", "max_seconds", "save_every", "eval_every", "eval_examples", "keep_checkpoints",
                     "resume", "out_dir", "data_dir", "grad_checkpointing", "log_every")


def changed_settings(saved_args, args):
    """The flags whose value differs from the checkpoint's, as '--name saved -> now' strings. Flags the
    checkpoint does not know (added to the script since) are not compared."""
    return [f"--{k.replace('_', '-')} {saved_args[k]!r} -> {v!r}" for k, v in sorted(args.items())
            if k in saved_args and k not in RESUME_MAY_CHANGE and saved_args[k] != v]


def resume(out_dir, args, model, optimizer, rank, world_size, log=print):
    """Continue a run from the newest readable checkpoint of out_dir, for sft.py and grpo.py alike: refuse
    one whose settings differ from `args` (a dict), load weights, optimizer state and this rank's RNG state,
    and fall back to the previous checkpoint, saying so, when one cannot be read (a damaged file).
    Returns (step, trainer_state), or (0, None) when out_dir holds no checkpoint."""
    candidates = complete_checkpoints(out_dir)
    if not candidates:
        log(f"--resume: no checkpoint in {out_dir}, starting from step 0")
        return 0, None
    for path in candidates:
        try:
            with open(os.path.join(path, "state.json")) as f:
                saved_args = json.load(f)["args"]
        except (OSError, ValueError, KeyError) as error:
            log(f"--resume: cannot read {path} ({type(error).__name__}: {error}); trying the previous checkpoint")
            continue
        changed = changed_settings(saved_args, args)
        if changed:  # a user error, not a damaged file: no fallback
            raise SystemExit(f"--resume: {path} was trained with other settings: {', '.join(changed)}. Run the "
                             f"command it was started with (these may change: "
                             f"{', '.join('--' + k.replace('_', '-') for k in RESUME_MAY_CHANGE)}), or choose a "
                             "new --out-dir")
        try:
            state = load_trainer_state(path)
            load_checkpoint_weights(path, model)
            load_full_optimizer_state(model, optimizer, state["trainer_state"]["optimizer"])
        except Exception as error:  # a truncated or corrupt file: safetensors, pickle and zip raise their own
            log(f"--resume: cannot read {path} ({type(error).__name__}: {error}); trying the previous checkpoint")
            continue
        rng = state["trainer_state"]["rng"]  # one state per rank
        if len(rng) != world_size:  # the data split, rollout noise and RNG streams depend on the world size
            raise SystemExit(f"--resume: {path} was written by a run of {len(rng)} ranks, this one has {world_size}: "
                             "resume it with as many")
        state["trainer_state"]["rng"] = rng[rank]
        log(f"resumed from {path} at step {state['step']}")
        return state["step"], state["trainer_state"]
    raise SystemExit(f"--resume: none of the {len(candidates)} checkpoints in {out_dir} can be read (see above); "
                     "remove them to start over")


def estimator_input(sequences, is_prompt, p_mask_prompt, mask_id, generator):
    """d1's one-pass log-prob estimator, its input (d1 Sec. 3.2): every completion token masked and each
    prompt token masked independently with probability p_mask_prompt. sequences (N, L); is_prompt (N, L)
    bool marks the conditioning tokens: the prompt, and in infilling tasks the canvas tokens the sampler
    was given (they are context, not actions). The random matrix is drawn on the CPU for the whole batch
    from `generator`, so the same seed gives the same mask on any device and for any chunking of the batch."""
    u = torch.rand(sequences.shape, generator=generator).to(sequences.device)
    masked = ~is_prompt | (u < p_mask_prompt)
    return torch.where(masked, torch.full_like(sequences, mask_id), sequences)


# DiffuCoder's released coupled-GRPO draws its masking ratio from U(0.2, 0.8): a ratio near 0 or 1 would give
# the 1/t or 1/(1 - t) weight below an unbounded variance
COUPLED_MASK_RATIO_RANGE = (0.2, 0.8)


def coupled_estimator_input(sequences, is_prompt, p_mask_prompt, mask_id, generator,
                            ratio_range=COUPLED_MASK_RATIO_RANGE):
    """Coupled sampling's input (DiffuCoder, Gong et al. 2025, coupled-GRPO): two passes whose masks over the
    action tokens (~is_prompt) are complementary. Per sequence t ~ U(ratio_range) and u ~ U(0, 1) per token;
    pass 1 masks the action tokens with u < t, pass 2 the others, so every action token is masked in exactly
    one pass and is read there with the other pass's tokens as context. The conditioning tokens (is_prompt)
    are masked as in d1's estimator, each with probability p_mask_prompt, the same draw in both passes.
    Each token's log-prob is weighted by the inverse of its pass's masking rate, halved because the two
    passes are two samples of LLaDA's ELBO, log p(x) >= E_t[(1/t) sum_{i masked at t} log p(x_i | x_t)]:
        log pi(o | q) ~ 1/2 [ (1/t) sum_{i in M_1} log p(o_i | x^1) + 1/(1-t) sum_{i in M_2} log p(o_i | x^2) ],
    an antithetic (t, 1 - t) pair (DiffuCoder also averages this with d1's fully masked pass; we do not).
    sequences, is_prompt (N, L); all randomness on the CPU from `generator`, as estimator_input.
    Returns (inputs (2, N, L), weights (2, N, L)): the two perturbed batches and each token's weight in each
    pass (0 where the pass does not read it)."""
    N, L = sequences.shape
    low, high = ratio_range
    u_prompt = torch.rand((N, L), generator=generator).to(sequences.device)
    t = (low + (high - low) * torch.rand((N, 1), generator=generator)).to(sequences.device)  # (N, 1)
    u = torch.rand((N, L), generator=generator).to(sequences.device)
    prompt_masked = is_prompt & (u_prompt < p_mask_prompt)
    first = ~is_prompt & (u < t)
    second = ~is_prompt & ~(u < t)  # the complement over the action tokens
    mask = torch.full_like(sequences, mask_id)
    inputs = torch.stack([torch.where(first | prompt_masked, mask, sequences),
                          torch.where(second | prompt_masked, mask, sequences)])
    weights = torch.stack([first / (2 * t), second / (2 * (1 - t))])
    return inputs, weights


def coupled_logprobs(policy, inputs, weights, sequences, attention_mask=None, prompt_length=0):
    """The coupled estimate of every completion token's log-prob (N, L - prompt_length): both passes of
    coupled_estimator_input's (inputs, weights) in one forward of 2N rows, each token read from the pass that
    masked it, with its weight. sequences (N, L) hold the targets; attention_mask (N, L) or None."""
    _, N, L = inputs.shape
    logits = policy(inputs.reshape(2 * N, L), None if attention_mask is None else attention_mask.repeat(2, 1),
                    slice(prompt_length, None))  # (2N, T, V)
    logp = token_logprobs(logits, sequences[:, prompt_length:].repeat(2, 1)).view(2, N, -1)
    return (weights[:, :, prompt_length:] * logp).sum(dim=0)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, epsilon, epsilon_high, beta):
    """The clipped diffu-GRPO objective (d1 eq. 3, with the k3 KL estimate), averaged over the masked-in
    completion tokens. logp, old_logp, ref_logp (N, T) per-token log-probs (ref_logp None when beta = 0),
    advantages (N, 1), mask (N, T) of 0/1. Returns (loss, mean KL, fraction of tokens whose ratio was clipped)."""
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    loss_tok = -torch.min(ratio * advantages, clipped * advantages)
    denominator = mask.sum().clamp(min=1)
    kl = torch.zeros((), device=logp.device)
    if beta > 0:
        delta = ref_logp - logp
        kl_tok = torch.exp(delta) - delta - 1  # k3: an unbiased, non-negative estimate of KL(pi || ref)
        loss_tok = loss_tok + beta * kl_tok
        kl = (kl_tok * mask).sum() / denominator
    # a token is clipped when the clip, not the ratio, sets its term of the min
    was_clipped = ((ratio < 1 - epsilon) & (advantages < 0)) | ((ratio > 1 + epsilon_high) & (advantages > 0))
    clip_fraction = (was_clipped.float() * mask).sum() / denominator
    return (loss_tok * mask).sum() / denominator, kl.detach(), clip_fraction.detach()


def wd1_weights(grouped_advantages):
    """wd1's group-relative weights (Tang et al. 2025, the weighted log-likelihood objective, as in their released
    trainer): w+ = softmax(A) over the group up-weights high-advantage completions, w- = softmax(-A) over the group
    up-weights low-advantage ones for the negative (unlearning) term. grouped_advantages (P, G) -> w+ - w- (P, G)."""
    return torch.softmax(grouped_advantages, dim=1) - torch.softmax(-grouped_advantages, dim=1)


def wd1_loss(logp, mask, weights, num_groups):
    """wd1's ratio-free objective: minus the weighted log-likelihood of the completions,
        loss = -(1 / num_groups) sum_i (w+_i - w-_i) log pi(o_i | q),  log pi(o_i | q) = sum_k logp_ik mask_ik,
    with the log-likelihood of the current policy alone (no old or reference policy). logp (N, T), mask (N, T)
    of 0/1, weights (N, 1) = w+ - w- of each completion's group, num_groups the number of groups the N rows
    stand for (N / G, fractional when a micro-batch splits a group)."""
    sequence_logp = (logp * mask).sum(dim=1, keepdim=True)  # (N, 1)
    return -(weights * sequence_logp).sum() / num_groups


SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def checkpoint_dtype(path):
    """The dtype a checkpoint folder stores its weights in (read from its first tensor's header entry)."""
    with safe_open(checkpoint_shards(path)[0], framework="pt", device="cpu") as f:
        return SAFETENSORS_DTYPES[f.get_slice(next(iter(f.keys()))).get_dtype()]


def merge_adapter(adapter, out):
    """Fold a LoRA adapter into its base and write a full checkpoint in the base's dtype: the base is loaded
    in that dtype (16 GB at 8B in bf16, not 32 GB of fp32) and each delta is added in fp32 (merged_state)."""
    base = adapter_base(adapter)
    save_model(load_model(adapter, dtype=checkpoint_dtype(base)), load_tokenizer(adapter), out)


# -----------------------------------------------------------------------------
# python model.py merge ADAPTER_DIR OUT_DIR: fold a LoRA adapter into its base and write a full checkpoint
# in LLaDA's layout (what d1 does between SFT and diffu-GRPO)

if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Merge a LoRA adapter folder into its base model.")
    parser.add_argument("command", choices=["merge"], help="what to do")
    parser.add_argument("adapter", help="adapter folder (adapter_config.json names the base)")
    parser.add_argument("out", help="where the merged checkpoint is written")
    args = parser.parse_args()
    if not is_adapter(args.adapter):
        raise SystemExit(f"{args.adapter} has no {ADAPTER_CONFIG_NAME}: not a LoRA adapter folder")
    merge_adapter(args.adapter, args.out)
    print(f"merged {args.adapter} into {adapter_base(args.adapter)} -> {args.out}")
