"""GPT-S reference model in PyTorch: one readable file.

    tokens -> embed -> L x [ x + XGQA(RMSNorm(x)) ; x + SwiGLU(RMSNorm(x)) ] -> RMSNorm -> embed^T

XGQA (exclusive grouped-query attention), for query head h at position i:

    q_h,i  k_g,j  v_g,j          g = h // (num_heads / num_kv_heads)   (the KV head h reads)
    y_h,i = sum_j softmax_j(q_h,i . k_g,j / sqrt(d)) v_g,j              (plain causal GQA)
    z_h,i = y_h,i - (y_h,i . v_g,i) / (v_g,i . v_g,i) * v_g,i           (exclusive: remove the
                                                                        component along the token's
                                                                        own value vector)
    out_i = W_o [z_0,i ; ... ; z_H-1,i]

v_g,i is the value of the *same* position i, computed in the current call, never read back from
the KV cache. The denominator is clamped at XSA_EPS so v = 0 gives z = y instead of NaN.

The same ``forward`` serves training (no cache), prefill and decode (``cache`` holds per layer
``(k, v)`` of shape (B, kv_heads, past, head_dim)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gpts_edge.config import ModelConfig
from gpts_edge.constants import XSA_EPS

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, 1, T, head_dim) in the HF "rotate half" layout."""
    inv_freq = theta ** (
        -torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim
    )
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos()[:, None], emb.sin()[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def exclusive(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Remove from y its projection on v (same shape (B, H, T, D)); v . v = 0 leaves y unchanged."""
    yv = (y * v).sum(-1, keepdim=True)
    vv = (v * v).sum(-1, keepdim=True).clamp_min(XSA_EPS)
    return y - (yv / vv) * v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        cfg = self.cfg
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, cfg.num_heads, cfg.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)  # (B, KV, T, D)
        v = self.v_proj(x).view(B, T, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)  # (B, KV, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k_all, v_all = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        else:
            k_all, v_all = k, v
        g = cfg.group_size
        k_rep, v_rep = k_all.repeat_interleave(g, dim=1), v_all.repeat_interleave(g, dim=1)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=mask)
        if cfg.exclusive_attention:
            y = exclusive(y, v.repeat_interleave(g, dim=1))
        y = y.transpose(1, 2).reshape(B, T, cfg.num_heads * cfg.head_dim)
        return self.o_proj(y), (k_all, v_all)


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = dropout
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin, past, mask):
        a, present = self.self_attn(self.input_layernorm(x), cos, sin, past, mask)
        x = x + self._drop(a)
        x = x + self._drop(self.mlp(self.post_attention_layernorm(x)))
        return x, present

    def _drop(self, branch: torch.Tensor) -> torch.Tensor:
        # Only while fine-tuning: in eval mode (and at dropout 0) the branch passes untouched.
        if self.dropout and self.training:
            return F.dropout(branch, self.dropout, training=True)
        return branch


class GPTS(nn.Module):
    """Parameter names follow HF llama (``model.layers.0.self_attn.q_proj.weight`` ...) minus the
    ``model.`` prefix, which checkpoint.py adds; the head is tied to ``embed_tokens``.

    ``dropout`` is a training setting, not part of the architecture (never in config.json): the
    residual branches' outputs are dropped with this probability in train mode only."""

    def __init__(self, cfg: ModelConfig, dropout: float = 0.0) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, dropout) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def init_weights(self, seed: int | None = None) -> GPTS:
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        # Residual-branch outputs are scaled down so the residual stream's variance stays ~flat
        # with depth (GPT-2 style).
        out_std = 0.02 / math.sqrt(2 * self.cfg.num_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                std = out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """Logits (B, T, vocab) and the updated cache.

        attention_mask: (B, past + T) with 1 for real tokens and 0 for (left) padding.
        position_ids: (B, T); defaults to past, past+1, ...
        """
        B, T = input_ids.shape
        past_len = cache[0][0].shape[2] if cache else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + T, device=input_ids.device).expand(B, T)
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta)
        mask = None
        if attention_mask is not None or past_len:
            # Boolean (B, 1, T, past+T): causal within the call, everything before it, minus padding.
            total = past_len + T
            q_pos = torch.arange(past_len, total, device=input_ids.device)[:, None]
            k_pos = torch.arange(total, device=input_ids.device)[None, :]
            allowed = (k_pos <= q_pos)[None, None]
            if attention_mask is not None:
                allowed = allowed & attention_mask[:, None, None, :].bool()
                # A query whose keys are all padding would get NaN from softmax; let it see itself.
                allowed = allowed | _self_mask(T, total, input_ids.device)
            mask = allowed
        x = self.embed_tokens(input_ids)
        present: KVCache = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, cos, sin, cache[i] if cache else None, mask)
            present.append(kv)
        x = self.norm(x)
        logits = F.linear(x, self.embed_tokens.weight)
        return logits, present


def _self_mask(T: int, total: int, device: torch.device) -> torch.Tensor:
    """(T, total) boolean, True where the key is the query's own position."""
    return torch.arange(total, device=device)[None, :] == (
        torch.arange(T, device=device)[:, None] + total - T
    )


def load_model(path=None, device: str | torch.device = "cpu") -> GPTS:
    """A checkpoint directory (default: the bundled one) as an eval-mode fp32 model."""
    from gpts_edge.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    model = GPTS(ckpt.config)
    model.load_state_dict(weights_to_state(ckpt.weights))
    return model.to(device).eval()


def weights_to_state(weights: dict) -> dict[str, torch.Tensor]:
    """Checkpoint names (``model.`` prefix) -> this module's state dict."""
    return {k.removeprefix("model."): torch.as_tensor(v) for k, v in weights.items()}


def state_to_weights(model: nn.Module) -> dict:
    """This module's parameters -> checkpoint names and fp32 numpy arrays."""
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    model = getattr(model, "module", model)  # DDP wrapper
    return {f"model.{k}": v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
