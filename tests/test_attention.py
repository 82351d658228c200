"""megarm's SDPA core attention equals megatron-core's DotProductAttention."""

from __future__ import annotations

import pytest
import torch

from megarm.testing import run_distributed
from tests.helpers import pair_batch, randomize_, tiny_config


def _both_backends(tp: int):
    from megatron.core import parallel_state as ps

    from megarm import distributed
    from megarm.model.attention import SDPAttention
    from megarm.model.builder import build_model
    from megarm.model.sharding import shard_state_dict

    distributed.init(tp)
    gen_cfg = tiny_config()
    full = None
    results = {}
    for backend in ("sdpa", "unfused"):
        cfg = tiny_config(f"model.attention_backend={backend}",
                          f"parallel.tensor_model_parallel_size={tp}")
        (model,) = build_model(cfg)
        uses_sdpa = any(isinstance(m, SDPAttention) for m in model.modules())
        assert uses_sdpa == (backend == "sdpa")
        if full is None:
            torch.manual_seed(0)
            full = randomize_({k: torch.empty(v.shape) for k, v in _full_shapes(gen_cfg).items()})
        model.load_state_dict(shard_state_dict(full, cfg.model.num_layers,
                                               ps.get_tensor_model_parallel_rank(), tp))
        batch = pair_batch(3, 20, cfg.model.vocab_size, seed=2)
        seq = batch.tokens.shape[1]
        causal = torch.ones(seq, seq, dtype=torch.bool).triu(1)
        # An explicit mask that also blocks the first two keys of every row but
        # the first two rows' own diagonal (so no query row is fully blocked).
        padded = causal.clone()
        padded[2:, :2] = True
        with torch.no_grad():
            results[backend] = [
                model(batch.tokens, batch.position_ids, mask, batch.reward_index)
                for mask in (None, causal[None, None].expand(6, 1, seq, seq),
                             padded[None, None].expand(6, 1, seq, seq))
            ]
    return results


def _full_shapes(cfg):
    """Parameter shapes of the TP=1 model, without building one at TP>1."""
    h, f = cfg.model.hidden_size, cfg.model.ffn_hidden_size
    heads, groups = cfg.model.num_attention_heads, cfg.model.num_query_groups
    d = h // heads
    qkv = (heads + 2 * groups) * d
    shapes = {"embedding.word_embeddings.weight": (256, h),
              "decoder.final_layernorm.weight": (h,), "value_head.weight": (1, h)}
    for i in range(cfg.model.num_layers):
        p = f"decoder.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "pre_mlp_layernorm.weight": (h,),
            p + "self_attention.linear_qkv.weight": (qkv, h),
            p + "self_attention.linear_qkv.bias": (qkv,),
            p + "self_attention.linear_proj.weight": (h, heads * d),
            p + "mlp.linear_fc1.weight": (2 * f, h), p + "mlp.linear_fc2.weight": (h, f),
        })
    return {k: torch.empty(v) for k, v in shapes.items()}


@pytest.mark.slow
def test_sdpa_equals_dot_product_attention_with_gqa():
    for tp, world in ((1, 1), (2, 2)):
        for results in run_distributed(_both_backends, world, tp):
            for sdpa, unfused in zip(results["sdpa"], results["unfused"], strict=True):
                torch.testing.assert_close(sdpa, unfused, rtol=0, atol=1e-5)
            # The masked variant really differs from plain causal attention.
            assert (results["sdpa"][2] - results["sdpa"][0]).abs().max() > 1e-4
