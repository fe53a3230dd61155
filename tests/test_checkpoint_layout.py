"""The param tree's leaves, shapes and names on disk."""

from __future__ import annotations

import numpy as np

from gpt2jax.checkpoint_layout import hf_name, iter_leaves, openai_name, openai_shape, param_shapes
from gpt2jax.config import GPT2Config


def test_param_tree_names_and_shapes():
    config = GPT2Config(n_vocab=10, n_ctx=8, n_embd=4, n_head=2, n_layer=2)
    shapes = param_shapes(config)
    assert shapes[("h1", "attn", "c_attn", "w")] == (4, 12)
    assert shapes[("h0", "mlp", "c_proj", "w")] == (16, 4)
    assert sum(int(np.prod(s)) for s in shapes.values()) == config.num_params()
    assert hf_name(("h1", "mlp", "c_fc", "b")) == "h.1.mlp.c_fc.bias"
    assert hf_name(("ln_f", "g")) == "ln_f.weight"
    assert hf_name(("wte",)) == "wte.weight"


def test_openai_names_and_leaves():
    assert openai_name(("h0", "attn", "c_attn", "w")) == "model/h0/attn/c_attn/w"
    assert openai_shape(("h0", "attn", "c_attn", "w"), (4, 12)) == (1, 4, 12)  # a width-1 conv1d
    assert openai_shape(("h0", "attn", "c_attn", "b"), (12,)) == (12,)
    tree = {"wte": 1, "h0": {"ln_1": {"g": 2, "b": 3}}}
    assert list(iter_leaves(tree)) == [(("wte",), 1), (("h0", "ln_1", "g"), 2), (("h0", "ln_1", "b"), 3)]
