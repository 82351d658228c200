"""The SDPA kernels megarm allows (megarm/platform/attention_kernels.py): flash >
memory-efficient > math, cuDNN only under MEGARM_SDPA_CUDNN=1, entered once per
attention call (not once per packed segment)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.nn.attention import SDPBackend

from megarm.platform import attention_kernels as ak

# torch's SDPBackend numbering (c10): the order torch._C._get_sdp_priority_order() reports
MATH, FLASH, EFFICIENT, CUDNN = 0, 1, 2, 3


def test_backends_are_flash_then_efficient_then_math_without_cudnn():
    assert ak.sdpa_backends({}) == [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                    SDPBackend.MATH]
    assert ak.sdpa_backends({"MEGARM_SDPA_CUDNN": "0"}) == ak.sdpa_backends({})
    assert ak.sdpa_backends({"MEGARM_SDPA_CUDNN": "1"})[0] == SDPBackend.CUDNN_ATTENTION
    with pytest.raises(ValueError, match="MEGARM_SDPA_CUDNN='yes please'"):
        ak.sdpa_backends({"MEGARM_SDPA_CUDNN": "yes please"})


def test_context_sets_torch_flags_and_order_then_restores_them():
    before = (torch.backends.cuda.cudnn_sdp_enabled(), torch._C._get_sdp_priority_order())
    with ak.sdpa_context({}):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled()
        assert torch.backends.cuda.math_sdp_enabled()
        assert torch._C._get_sdp_priority_order()[:3] == [FLASH, EFFICIENT, MATH]
    with ak.sdpa_context({"MEGARM_SDPA_CUDNN": "1"}):
        assert torch.backends.cuda.cudnn_sdp_enabled()
        assert torch._C._get_sdp_priority_order()[:4] == [CUDNN, FLASH, EFFICIENT, MATH]
    assert (torch.backends.cuda.cudnn_sdp_enabled(), torch._C._get_sdp_priority_order()) == before


def test_chosen_backend_on_cpu_is_torch_cpu_flash():
    # torch's CPU dispatch: its flash kernel (masks included), math otherwise.
    report = ak.backend_report(torch.device("cpu"), torch.bfloat16, length=16)
    assert report == {"packed": "FLASH_ATTENTION", "padded": "FLASH_ATTENTION",
                      "padded_masked": "FLASH_ATTENTION"}
    q = torch.zeros(1, 4, 8, 16)
    with torch.nn.attention.sdpa_kernel([SDPBackend.MATH]):
        # inside megarm's context the outer restriction is replaced, as torch does
        assert ak.chosen_backend(q, q, q, None, True) == "FLASH_ATTENTION"


def test_attention_enters_the_context_once_per_packed_stream(monkeypatch):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megarm.model import attention

    entered, seen = [], []
    real_context, real_sdpa = attention.sdpa_context, attention.F.scaled_dot_product_attention

    @contextlib.contextmanager
    def counting_context():
        entered.append(1)
        with real_context():
            yield

    def recording_sdpa(*args, **kwargs):
        seen.append((torch.backends.cuda.cudnn_sdp_enabled(), torch._C._get_sdp_priority_order()[:3]))
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(attention, "sdpa_context", counting_context)
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", recording_sdpa)
    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4,
                               num_query_groups=2, attention_dropout=0.0)
    layer = attention.SDPAttention(config, 1, AttnMaskType.causal, "self")
    torch.manual_seed(0)
    q, k, v = torch.randn(12, 4, 16), torch.randn(12, 2, 16), torch.randn(12, 2, 16)
    lengths = (5, 3, 4)
    cu = torch.tensor([0, 5, 8, 12], dtype=torch.int32)
    packed = attention.PackedSegments(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                      seq_lengths=lengths)
    out = layer(q, k, v, None, packed_seq_params=packed)
    assert len(entered) == 1 and seen == [(False, [FLASH, EFFICIENT, MATH])] * 3
    # equals the padded path segment by segment (same kernel family)
    start = 0
    for n in lengths:
        one = layer(q[start:start + n, None], k[start:start + n, None], v[start:start + n, None], None)
        torch.testing.assert_close(out[start:start + n], one[:, 0], rtol=1e-5, atol=1e-6)
        start += n
    assert len(entered) == 4
