"""
Shared fixtures of the test suite: the offline tiny tokenizer and a factory of small random models
built from the real model.py class. Also makes the repository root importable, so that
`python -m pytest tests` works from the root, and runs torch on one thread.
"""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import checkpoint as C
import model as M  # noqa: E402

# One intra-op thread: the tiny models gain nothing from more, and on a busy machine a second thread that
# is not scheduled stalls every parallel op.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    """The character-level tokenizer of the tiny tasks (built offline, no download)."""
    return C.build_tiny_tokenizer()


@pytest.fixture(scope="session")
def make_config(tokenizer):
    """ModelConfig factory: 2 layers, width 32, 4 query heads over 2 key/value heads (grouped-query, so the
    head bookkeeping is exercised), the tiny tokenizer's vocabulary and special ids. Keyword arguments
    override any field."""

    def make(**overrides):
        fields = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=48,
                      vocab_size=len(tokenizer), embedding_size=len(tokenizer), rope_theta=10000.0,
                      max_sequence_length=128, mask_token_id=C.mask_token_id(tokenizer),
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id, init_std=0.1)
        fields.update(overrides)
        return M.ModelConfig(**fields)

    return make


@pytest.fixture(scope="session")
def make_model(make_config):
    """A random fp32 model in eval mode: make_model(seed=0, **config_overrides)."""

    def make(seed=0, **overrides):
        torch.manual_seed(seed)
        return M.LLaDA(make_config(**overrides)).init_weights(seed).eval()

    return make


@pytest.fixture(scope="session")
def start(tmp_path_factory):
    """A tiny checkpoint whose completions earn some reward (helpers.digit_checkpoint), for grpo.py runs."""
    from helpers import digit_checkpoint
    return digit_checkpoint(tmp_path_factory.mktemp("start") / "digits")
