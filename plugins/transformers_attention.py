"""The decode step's attention: transformers' SDPA, with one query per row always packed.

For one new token per row, transformers' ``sdpa`` attention takes one of two
ways on a model whose query heads share key/value heads (SmolLM2: 9 and 3).
With a padding mask it packs each row's query heads onto their key/value head
(a (rows, 3, 3, 64) query) and calls SDPA once. Without a mask, which is what
one row (one user) or a batch without padding gets, it calls SDPA with
``enable_gqa=True`` instead, and torch's CPU kernel for that is far slower in
bfloat16: 43-98 us a call against 18-31 for one row, 271-689 against 63-114
for eight (60-200 cached tokens, AMD EPYC with AVX512-BF16). In the agent one
user got 1.08x the tokens/s (docs/agents/transformers.md, "How batching works").

``decode_sdpa`` packs in that case too, and hands everything else (prompts,
masked steps) to transformers' own function. The packed query's rows all sit
at the same position, so with no mask every one of them attends to every
cached token, as the unpacked one does.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import pack_gqa, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "decode_sdpa"
# Arguments that transformers' function handles and this short way does not.
SPECIAL = ("position_bias", "cache", "softcap", "sliding_window")


def decode_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, attention_mask: torch.Tensor | None,
                dropout: float = 0.0, scaling: float | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, None]:
    groups = getattr(module, "num_key_value_groups", 1)
    rows, heads, length, dim = query.shape
    special = any(kwargs.get(name) is not None for name in SPECIAL)
    if length != 1 or attention_mask is not None or groups == 1 or special or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    # transformers' own packing, which its function applies only with a mask.
    packed = pack_gqa(query, groups)
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, scale=scaling)
    return out.reshape(rows, heads, 1, dim).transpose(1, 2).contiguous(), None


def use_decode_sdpa(model: Any) -> bool:
    """Switch a model on transformers' ``sdpa`` attention to ``decode_sdpa``;
    any other attention is left as it is. True if switched."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(NAME, decode_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the masks SDPA takes
    model.set_attn_implementation(NAME)
    return True
