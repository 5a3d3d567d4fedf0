"""
The files of a run, and how a run continues from them.

- tokenizers: the offline character tokenizer of the tiny tasks, and a checkpoint's tokenizer files,
  written in the form transformers 4.x and 5.x both read;
- models in LLaDA's published layout (config.json + safetensors shards under the tensor names of LLaDA's
  own modeling code), streamed one shard at a time; a preset model built from random weights;
- LoRA adapters in PEFT's format (adapter_config.json + adapter_model.safetensors), and their merge into
  the base (`python checkpoint.py merge ADAPTER_DIR OUT_DIR`);
- resumable training checkpoints (weights, optimizer and RNG state, arguments), written atomically, and
  the one `resume` routine that sft.py and grpo.py both call; the metrics JSONL beside them.

model.py is the network; this file is everything about its files.
"""

import contextlib
import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

import ddp
from model import LORA_TARGETS, PRESETS, LLaDA, LoRALinear, ModelConfig, add_lora, lora_modules

# -----------------------------------------------------------------------------
# Tokenizers: the tiny tasks' own, one token per character, built offline with `tokenizers` (its chat
# template is LLaDA's shape in short: <|startoftext|><|user|>{prompt}<|assistant|>{reply}); the special
# ids; tokenizer files

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


def load_tokenizer(path, base=None):
    """The tokenizer of a checkpoint folder (LLaDA's published one or ours); an adapter folder without one
    gives its base's (`base`: as for adapter_base). Loaded as the fast tokenizer class directly: AutoTokenizer
    would read config.json's auto_map and ask to run LLaDA's remote code."""
    from transformers import PreTrainedTokenizerFast

    if is_adapter(path) and not os.path.exists(os.path.join(path, "tokenizer.json")):
        path = adapter_base(path, base)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is not a checkpoint folder")
    if not os.path.exists(os.path.join(path, "tokenizer.json")) and not os.path.exists(
            os.path.join(path, "tokenizer_config.json")):
        raise FileNotFoundError(f"no tokenizer files (tokenizer.json / tokenizer_config.json) in {path}")
    return PreTrainedTokenizerFast.from_pretrained(path)


# -----------------------------------------------------------------------------
# Models: a preset built from random weights, or a folder in LLaDA's layout


def preset_config(preset, tokenizer=None):
    """A preset's ModelConfig. Tiny presets take their vocabulary and special ids from the tokenizer."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)} "
                         "or pass a checkpoint folder")
    cfg = dataclasses.replace(PRESETS[preset])
    if tokenizer is not None and preset != "llada-8b":
        cfg.vocab_size = cfg.embedding_size = len(tokenizer)
        cfg.mask_token_id = mask_token_id(tokenizer)
        cfg.eos_token_id = cfg.pad_token_id = tokenizer.eos_token_id
    return cfg


def build_model(preset, tokenizer=None, seed=0, device="cpu", dtype=torch.float32):
    """A randomly initialised model of a preset shape (preset_config)."""
    model = LLaDA(preset_config(preset, tokenizer)).init_weights(seed)
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


def adapter_base(path, base=None):
    """The base model folder of a PEFT adapter folder: `base` when given (the scripts' --base-model), else the
    one its adapter_config.json names. d1's adapters name a hub id (GSAI-ML/LLaDA-8B-Instruct), and nothing
    here downloads: such a base must be given as a local folder."""
    if base is not None:
        if not os.path.isdir(base):
            raise FileNotFoundError(f"--base-model {base!r} is not a folder (the base model of {path})")
        return base
    with open(os.path.join(path, ADAPTER_CONFIG_NAME)) as f:
        named = json.load(f).get("base_model_name_or_path")
    if not named or not os.path.isdir(named):
        raise FileNotFoundError(f"adapter {path} names base model {named!r}, which is not a local folder: "
                                "pass --base-model DIR, the folder of that base model in LLaDA's layout, or "
                                f"set base_model_name_or_path in {os.path.join(path, ADAPTER_CONFIG_NAME)}")
    return named


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


def load_model(path, device="cpu", dtype=torch.float32, base=None):
    """Load a folder in LLaDA's layout (or a PEFT adapter folder on top of its base) into our model. `base`
    overrides the base folder an adapter names (adapter_base); a full checkpoint ignores it.

    Tensors stream one shard at a time, each converted to dtype on device and assigned into a model
    built on the meta device: host memory never holds a second copy of the weights."""
    if is_adapter(path):
        model = load_model(adapter_base(path, base), device, dtype)
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
                # added in fp32, rounded once to the base's dtype
                t = (t.float() + module.delta_weight()).to(t.dtype)
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
    state = {to_llada_name(k): v.contiguous()
             for k, v in (merged_state(model) if state is None else state).items()}
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
                save_file({k: v.cpu() for k, v in shard.items()}, os.path.join(tmp, name),
                          metadata={"format": "pt"})
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
        if (name.startswith("model") and (name.endswith(".safetensors") or name == INDEX_NAME)
                and name not in keep):
            os.remove(os.path.join(path, name))


# -----------------------------------------------------------------------------
# LoRA adapters in PEFT's format, and their merge into the base (d1 merges between SFT and diffu-GRPO)


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
        save_file({k: v.cpu() for k, v in adapter_state(model).items()},
                  os.path.join(tmp, ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        for name, obj in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(obj, f, indent=2)


def load_adapter(model, path):
    """Add the adapters saved at path (PEFT's format) to model, in place.

    Target names that match no module are skipped with one warning, as PEFT skips them: d1's adapters list
    Llama's o_proj, gate_proj and down_proj (LLaDA's attn_out, ff_proj, ff_out), so PEFT adapted q, k, v and
    up_proj alone and saved no tensors for the others. Tensors a file does hold for a skipped target have no
    module to go to: they are ignored, and counted in the warning. No target matching is an error, as in
    PEFT."""
    with open(os.path.join(path, ADAPTER_CONFIG_NAME)) as f:
        c = json.load(f)
    if c.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {c.get('peft_type')!r}, only LORA adapters are supported")
    targets = c["target_modules"]
    if isinstance(targets, str):  # PEFT's other form, a regex over full module names
        raise ValueError(f"{path}: target_modules is the pattern {targets!r}; only a list of names is read")
    found = [t for t in targets if t in LORA_TARGETS]
    skipped = [t for t in targets if t not in LORA_TARGETS]
    if not found:
        raise ValueError(f"adapter {path}: none of its target_modules {targets} names a module of the model; "
                         f"the linears of its blocks are {list(LORA_TARGETS)}")
    if not lora_modules(model):
        add_lora(model, c["r"], c["lora_alpha"], c.get("lora_dropout", 0.0), tuple(found))
    modules = dict(lora_modules(model))
    weights_path = os.path.join(path, ADAPTER_WEIGHTS_NAME)
    if not os.path.exists(weights_path):
        raise FileNotFoundError(f"adapter folder {path} has no {ADAPTER_WEIGHTS_NAME}")
    pattern = re.compile(r"^base_model\.model\.model\.transformer\.(.+)\.(lora_A|lora_B)\.weight$")
    loaded, ignored = set(), 0
    with safe_open(weights_path, framework="pt", device="cpu") as f:
        for key in f.keys():
            match = pattern.match(key)
            if match and match.group(1) not in modules and match.group(1).rpartition(".")[2] in skipped:
                ignored += 1
                continue
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
    if skipped and ddp.rank() == 0:
        ignored_note = f"; {ignored} tensors saved for them ignored" if ignored else ""
        warnings.warn(f"adapter {path}: target_modules {skipped} match no module of the model and are "
                      f"skipped (as PEFT skips them); adapted: {found}{ignored_note}")
    return model


SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def checkpoint_dtype(path):
    """The dtype a checkpoint folder stores its weights in (read from its first tensor's header entry)."""
    with safe_open(checkpoint_shards(path)[0], framework="pt", device="cpu") as f:
        return SAFETENSORS_DTYPES[f.get_slice(next(iter(f.keys()))).get_dtype()]


def merge_adapter(adapter, out, base=None):
    """Fold a LoRA adapter into its base (`base`: as for adapter_base) and write a full checkpoint in the
    base's dtype: the base is loaded in that dtype (16 GB at 8B in bf16, not 32 GB of fp32) and each delta is
    added in fp32 (merged_state)."""
    base = adapter_base(adapter, base)
    model = load_model(adapter, dtype=checkpoint_dtype(base), base=base)
    save_model(model, load_tokenizer(adapter, base), out)


# -----------------------------------------------------------------------------
# Training checkpoints for exact resume: out_dir/checkpoint-<step>/ holds the weights (a full model in
# LLaDA's layout, or the LoRA adapter), trainer_state.pt (optimizer and RNG state, anything else the stage
# needs) and state.json (arguments and step). The folder is written under a temporary name and renamed, so
# a run killed at any moment, even mid-save, leaves the previous checkpoint intact.

CHECKPOINT_PREFIX = "checkpoint-"
METRICS_NAME = "metrics.jsonl"  # one JSON record per step beside the checkpoints (plot.py reads it)


def save_checkpoint(out_dir, step, model, optimizer, tokenizer, base_model, args, extra=None):
    """checkpoint-<step> of a run: the weights (or adapter), the optimizer state, every rank's RNG state
    and `extra` (more of a stage's state), with `args` (a dict) and the step. Every rank calls it: the RNG
    states are gathered (each rank continues its own stream on resume) and, under FSDP, the weights and
    optimizer state too; rank 0 writes, keeping the newest args["keep_checkpoints"]."""
    rng = ddp.gather_objects(rng_state())
    weights = full_state_dict(model) if is_sharded(model) else None
    optimizer_state = full_optimizer_state(model, optimizer)
    if ddp.rank() == 0:
        path = write_checkpoint(out_dir, step, model, tokenizer, base_model,
                                {"optimizer": optimizer_state, "rng": rng, **(extra or {})}, args,
                                args["keep_checkpoints"], weights)
        print(f"saved {path}", flush=True)
    ddp.barrier()


def save_final_model(model, tokenizer, out_dir, base_model, args):
    """The trained model in out_dir, with its arguments (training_args.json): a full model in LLaDA's
    layout, or the adapter folder in PEFT's format. Every rank calls it (under FSDP the weights are
    gathered onto rank 0)."""
    weights = full_state_dict(model) if is_sharded(model) else None
    if ddp.rank() == 0:
        save_weights(model, tokenizer, out_dir, base_model, weights, extra_files={"training_args.json": args})


def save_weights(model, tokenizer, path, base_model, state=None, extra_files=None):
    """The adapter folder in PEFT's format (LoRA), else the full model in LLaDA's layout (`state`: the
    gathered weights of a model sharded by FSDP, written in place of the model's own)."""
    if lora_modules(model):
        save_adapter(model, path, base_model, extra_files=extra_files)
    else:
        save_model(model, tokenizer, path, extra_files=extra_files, state=state)


def write_checkpoint(out_dir, step, model, tokenizer, base_model, trainer_state, args, keep, state=None):
    """Write checkpoint-<step> atomically, then delete all but the newest `keep` checkpoints. `state`: the
    gathered weights of a model sharded by FSDP (full_state_dict), written in place of the model's own."""
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + CHECKPOINT_PREFIX, dir=out_dir)
    save_weights(model, tokenizer, os.path.join(tmp, "adapter" if lora_modules(model) else "model"),
                 base_model, state)
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
        return load_full_state_dict(
            model, lambda: dict(load_model(os.path.join(path, "model")).named_parameters()))
    saved = load_model(os.path.join(path, "model"))
    with torch.no_grad():
        for (name, p), (name2, q) in zip(model.named_parameters(), saved.named_parameters()):
            assert name == name2, (name, name2)
            p.copy_(q)
    return model


def load_trainer_state(path):
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    # our own file (write_checkpoint), which may hold Python's and NumPy's RNG states (tuples): hence
    # weights_only=False. Rank 0 wrote it; every rank reads it, memory-mapped: under FSDP it holds the full
    # optimizer state, which only rank 0 reads in full (load_full_optimizer_state)
    state["trainer_state"] = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False,
                                        map_location="cpu", mmap=True)
    return state


# Full fine-tuning sharded with FSDP2 (ddp.shard_model): its parameters are DTensors, each rank holding a
# 1 / world_size slice. Checkpoints hold the gathered full tensors, in the same files as an unsharded run:
# the weights stay in LLaDA's layout (evaluate.py and LLaDA's code read them as they are), at the cost of
# rank 0 holding one full copy in host memory while it writes (torch.distributed.checkpoint would write
# per-rank shards instead, in a layout nothing else here reads). torch.distributed.checkpoint is imported
# only when a model is sharded: the import adds seconds to every start.


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
    # full tensors on rank 0's CPU, one at a time
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


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
    set_optimizer_state_dict(model, optimizer, state if dist.get_rank() == 0 else {},
                             options=state_dict_options(load=True))


# Settings a resume may change: they extend the run or say where and how often to write, never what a step
# computes. (--max-steps moves the end, so a cosine or linear schedule spans the new length; gradient
# checkpointing only trades memory for time.) Any other changed flag is refused.
RESUME_MAY_CHANGE = ("max_steps", "max_seconds", "save_every", "eval_every", "eval_examples",
                     "keep_checkpoints", "resume", "out_dir", "data_dir", "grad_checkpointing", "log_every")


def add_run_flags(parser, out_dir, eval_every, save_every):
    """The flags, shared by sft.py and grpo.py, that say where a run writes and how often (a resume may change
    them), and --resume itself."""
    parser.add_argument("--log-every", type=int, default=10,
                        help="print a line every N steps (metrics.jsonl gets every step)")
    parser.add_argument("--eval-every", type=int, default=eval_every,
                        help="held-out accuracy every N steps; 0 = only at the end")
    parser.add_argument("--eval-examples", type=int, default=500, help="held-out examples to evaluate")
    parser.add_argument("--out-dir", default=out_dir, help="final model, checkpoints and metrics.jsonl")
    parser.add_argument("--save-every", type=int, default=save_every,
                        help="resumable checkpoint every N steps; 0 = off")
    parser.add_argument("--keep-checkpoints", type=int, default=2,
                        help="resumable checkpoints kept (the newest)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in --out-dir")


def changed_settings(saved_args, args):
    """The flags whose value differs from the checkpoint's, as '--name saved -> now' strings. Flags the
    checkpoint does not know (newer than it) are not compared."""
    return [f"--{k.replace('_', '-')} {saved_args[k]!r} -> {v!r}" for k, v in sorted(args.items())
            if k in saved_args and k not in RESUME_MAY_CHANGE and saved_args[k] != v]


def resume(out_dir, args, model, optimizer, rank, world_size, log=print):
    """Continue a run from the newest readable checkpoint of out_dir, for sft.py and grpo.py alike:
    refuse one whose settings differ from `args` (a dict), load weights, optimizer state and this rank's
    RNG state, cut the metrics log back to the checkpoint's step, and fall back to the previous
    checkpoint, saying so, when one cannot be read (a damaged file).
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
            log(f"--resume: cannot read {path} ({type(error).__name__}: {error}); "
                "trying the previous checkpoint")
            continue
        changed = changed_settings(saved_args, args)
        if changed:  # a user error, not a damaged file: no fallback
            raise SystemExit(f"--resume: {path} was trained with other settings: {', '.join(changed)}. "
                             f"Run the command it was started with (these may change: "
                             f"{', '.join('--' + k.replace('_', '-') for k in RESUME_MAY_CHANGE)}), "
                             "or choose a new --out-dir")
        try:
            state = load_trainer_state(path)
            load_checkpoint_weights(path, model)
            load_full_optimizer_state(model, optimizer, state["trainer_state"]["optimizer"])
        except Exception as error:  # a truncated or corrupt file: safetensors, pickle and zip raise their own
            log(f"--resume: cannot read {path} ({type(error).__name__}: {error}); "
                "trying the previous checkpoint")
            continue
        rng = state["trainer_state"]["rng"]  # one state per rank
        if len(rng) != world_size:  # the data split, rollout noise and RNG streams depend on the world size
            raise SystemExit(f"--resume: {path} was written by a run of {len(rng)} ranks, this one has "
                             f"{world_size}: resume it with as many")
        set_rng_state(rng[rank])
        # the steps a killed run logged after its checkpoint are computed again: drop them from its metrics
        truncate_jsonl(os.path.join(out_dir, METRICS_NAME), state["step"])
        log(f"resumed from {path} at step {state['step']}")
        return state["step"], state["trainer_state"]
    raise SystemExit(f"--resume: none of the {len(candidates)} checkpoints in {out_dir} can be read "
                     "(see above); remove them to start over")


# The RNG state of one rank (saved in every checkpoint) and the run's metrics log


def rng_state():
    """torch's global RNG (LoRA dropout draws from it; data, masks and sampling noise use explicit
    generators)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])  # Python's and NumPy's states, if saved, stay unused
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def log_jsonl(path, record):
    """Append one metrics record to a JSONL file (rank 0 alone writes)."""
    if ddp.rank() != 0:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path):
    """The records of a metrics JSONL, in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_jsonl(path, step):
    """Drop the records after `step` from a metrics JSONL: on resume, the steps a killed run logged after
    its last checkpoint are computed again, and must not appear twice (rank 0 alone writes)."""
    if ddp.rank() != 0 or not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(kept)


# -----------------------------------------------------------------------------
# python checkpoint.py merge ADAPTER_DIR OUT_DIR: fold a LoRA adapter into its base and write a full
# checkpoint in LLaDA's layout (what d1 does between SFT and diffu-GRPO)

if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Merge a LoRA adapter folder into its base model.")
    parser.add_argument("command", choices=["merge"], help="what to do")
    parser.add_argument("adapter", help="adapter folder (adapter_config.json names the base)")
    parser.add_argument("out", help="where the merged checkpoint is written")
    parser.add_argument("--base-model", default=None, help="the base model folder (default: the one "
                        "adapter_config.json names; d1's adapters name a hub id, which is no folder here)")
    args = parser.parse_args()
    if not is_adapter(args.adapter):
        raise SystemExit(f"{args.adapter} has no {ADAPTER_CONFIG_NAME}: not a LoRA adapter folder")
    try:
        base = adapter_base(args.adapter, args.base_model)
    except FileNotFoundError as err:  # a user error: the message says what to pass
        raise SystemExit(str(err)) from None
    merge_adapter(args.adapter, args.out, base)
    print(f"merged {args.adapter} into {base} -> {args.out}")
