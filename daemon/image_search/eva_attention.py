"""jina-clip's EVA vision attention through torch's fused ``scaled_dot_product_attention``.

jina-clip-implementation's ``eva_model.Attention`` (the EVA02 tower of jina-clip-v1/v2) has two
paths: xformers' ``memory_efficient_attention`` when xformers is installed and enabled, otherwise a
naive ``softmax(q k^T * scale) v`` that materialises an N x N matrix per head (1297 x 1297 at 512 px,
16 heads, 24 layers). Where xformers is not used (not installed, or disabled: jina's loader turns
``xattn`` off without CUDA or without xformers), ``patch_eva_attention`` gives each such module a forward
that is the remote code's own step for step (q/k/v projections with their biases, rotary embedding
of all tokens but the class token, inner layer norm, output projection, dropouts) with only the
attention product replaced by ``scaled_dot_product_attention``, which picks a flash or
memory-efficient kernel and never stores the N x N matrix.

The remote code is matched by class name and module (``Attention`` in a module named ``eva_model``)
and by the attributes its forward reads, so a differently shaped class is left alone.
"""

from __future__ import annotations

import types
from typing import Any

import structlog
import torch
import torch.nn.functional as F
from torch import nn

log = structlog.get_logger(__name__)

EVA_ATTENTION_CLASS = "Attention"
EVA_MODULE = "eva_model"
# Every attribute the replacement reads; a class lacking one is not the one mirrored here.
_ATTRIBUTES = ("num_heads", "scale", "subln", "q_bias", "v_bias", "rope", "xattn", "attn_drop",
               "inner_attn_ln", "proj", "proj_drop", "relative_position_bias_table")
_ORIGINAL_FORWARD = "_image_search_original_forward"


def is_eva_attention(module: nn.Module) -> bool:
    """Is this jina-clip's EVA ``Attention`` (by class name, module name and the attributes it has)?"""
    cls = type(module)
    if cls.__name__ != EVA_ATTENTION_CLASS or cls.__module__.rsplit(".", 1)[-1] != EVA_MODULE:
        return False
    projections = ("q_proj", "k_proj", "v_proj") if getattr(module, "subln", False) else ("qkv",)
    return all(hasattr(module, name) for name in _ATTRIBUTES + projections)


def _sdpa_forward(self: nn.Module, x: torch.Tensor, rel_pos_bias: torch.Tensor | None = None,
                  attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """eva_model.Attention.forward with the attention product fused; the rest is the remote code's."""
    if self.xattn or rel_pos_bias is not None or attn_mask is not None or self.relative_position_bias_table is not None:
        # xformers' path, and the relative-position biases EVA02 in jina-clip does not use: as written.
        return getattr(self, _ORIGINAL_FORWARD)(x, rel_pos_bias=rel_pos_bias, attn_mask=attn_mask)
    batch, tokens, _ = x.shape
    if self.subln:  # separate projections; k has no bias
        q = F.linear(x, self.q_proj.weight, self.q_bias)
        k = F.linear(x, self.k_proj.weight, None)
        v = F.linear(x, self.v_proj.weight, self.v_bias)
        q, k, v = (t.reshape(batch, tokens, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
    else:  # one fused projection; its bias is (q_bias, 0, v_bias)
        qkv_bias = None
        if self.q_bias is not None:
            qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, qkv_bias).reshape(batch, tokens, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (batch, heads, tokens, head_dim)
    if self.rope:  # rotary embedding of the patch tokens; the class token (first) is left as it is
        q = torch.cat((q[:, :, :1, :], self.rope(q[:, :, 1:, :])), -2).type_as(v)
        k = torch.cat((k[:, :, :1, :], self.rope(k[:, :, 1:, :])), -2).type_as(v)
    dropout = self.attn_drop.p if self.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=self.scale)
    out = out.transpose(1, 2).reshape(batch, tokens, -1)
    out = self.inner_attn_ln(out)
    out = self.proj(out)
    return self.proj_drop(out)


def patch_eva_attention(model: nn.Module) -> int:
    """Route every EVA attention module of ``model`` that does not use xformers through SDPA.

    Returns how many modules were patched (0 where xformers is used, or for a model without such
    modules). Patching twice is harmless: a patched module keeps its original forward once.
    """
    patched = 0
    for module in model.modules():
        if not is_eva_attention(module) or module.xattn:  # xformers' kernel is already a fused one
            continue
        if not hasattr(module, _ORIGINAL_FORWARD):
            # Stored on the instance's __dict__ (a bound method is neither a Module nor a Parameter).
            object.__setattr__(module, _ORIGINAL_FORWARD, module.forward)
        object.__setattr__(module, "forward", types.MethodType(_sdpa_forward, module))
        patched += 1
    if patched:
        first: Any = next(m for m in model.modules() if is_eva_attention(m))
        log.info("eva_attention_patched", modules=patched, attention="torch scaled_dot_product_attention",
                 replaces=f"{type(first).__module__}.{EVA_ATTENTION_CLASS} naive softmax (xformers not used)")
    return patched
