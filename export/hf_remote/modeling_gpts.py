"""GPT-S (XGQA attention) for Hugging Face transformers (loaded with ``trust_remote_code=True``).

Shipped inside folders written by ``gpts-edge export --format hf``; it imports nothing from
gpts_edge. The arithmetic follows gpts_edge/model.py step by step so that fp32 logits agree
with the reference model to float rounding:

    tokens -> embed -> L x [ x + XGQA(RMSNorm(x)) ; x + SwiGLU(RMSNorm(x)) ] -> RMSNorm -> lm_head

XGQA is grouped-query attention followed, per query head h and position i, by removing the
component of the attention output y along the value vector v of the same position from the KV
head h reads:  z = y - (y . v) / max(v . v, eps) * v.  That v is the value computed in the
current call, never one read back from the cache.

The KV cache is the transformers ``Cache`` API (a ``DynamicCache`` by default); the head is tied
to the token embedding (``tie_word_embeddings``), so ``lm_head.weight`` is not stored.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_gpts import GPTSConfig

XSA_EPS = 1e-12

# transformers 5 renamed the cache argument/output field from ``past_key_values`` to ``cache``;
# this file speaks whichever the installed version uses.
_CACHE_FIELD = (
    "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"
)


class GPTSRMSNorm(nn.Module):
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
    """cos, sin of shape (B, 1, T, head_dim), "rotate half" layout, always fp32.

    Computed per call rather than kept in a buffer: it is tiny, and a non-persistent buffer
    would have to survive meta-device loading and device_map placement."""
    inv_freq = theta ** (
        -torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim
    )
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos()[:, None], emb.sin()[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def exclusive(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    yv = (y * v).sum(-1, keepdim=True)
    vv = (v * v).sum(-1, keepdim=True).clamp_min(XSA_EPS)
    return y - (yv / vv) * v


class GPTSAttention(nn.Module):
    def __init__(self, config: GPTSConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.group = self.num_heads // self.num_kv_heads
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k_all, v_all = cache.update(k, v, self.layer_idx)
        else:
            k_all, v_all = k, v
        k_rep = k_all.repeat_interleave(self.group, dim=1)
        v_rep = v_all.repeat_interleave(self.group, dim=1)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=mask)
        if self.config.exclusive_attention:
            y = exclusive(y, v.repeat_interleave(self.group, dim=1))
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return self.o_proj(y)


class GPTSMLP(nn.Module):
    def __init__(self, config: GPTSConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GPTSDecoderLayer(nn.Module):
    def __init__(self, config: GPTSConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = GPTSRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = GPTSAttention(config, layer_idx)
        self.post_attention_layernorm = GPTSRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GPTSMLP(config)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class GPTSPreTrainedModel(PreTrainedModel):
    config_class = GPTSConfig
    base_model_prefix = "model"
    _no_split_modules = ["GPTSDecoderLayer"]
    supports_gradient_checkpointing = False
    _supports_cache_class = True
    _supports_static_cache = False


def _attention_bool_mask(
    attention_mask: torch.Tensor | None, past_len: int, T: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean (B or 1, 1, T, past+T) "may attend" mask, the same rule as gpts_edge/model.py:
    causal, everything cached before this call, minus padding; a query whose keys are all
    padding may see itself (softmax over nothing would give NaN)."""
    if attention_mask is not None and attention_mask.dim() == 4:
        # An already expanded mask: boolean "may attend", or additive floats (0 = attend).
        return attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    if attention_mask is None and not past_len:
        return None
    total = past_len + T
    q_pos = torch.arange(past_len, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None, None]
    if attention_mask is not None:
        if attention_mask.shape[-1] != total:
            raise ValueError(
                f"attention_mask has {attention_mask.shape[-1]} columns; expected past ({past_len}) + new ({T})"
            )
        allowed = allowed & attention_mask[:, None, None, :].bool()
        allowed = allowed | (k_pos == q_pos)[None, None]
    return allowed


class GPTSModel(GPTSPreTrainedModel):
    def __init__(self, config: GPTSConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GPTSDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = GPTSRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, Cache):
            raise ValueError(
                "GPT-S takes a transformers Cache instance (e.g. DynamicCache), not legacy tuples"
            )
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        past_len = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + T, device=x.device).expand(B, T)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
        mask = _attention_bool_mask(attention_mask, past_len, T, x.device)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        x = self.norm(x)
        return BaseModelOutputWithPast(last_hidden_state=x, **{_CACHE_FIELD: cache if use_cache else None})


class GPTSForCausalLM(GPTSPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: GPTSConfig) -> None:
        super().__init__(config)
        self.model = GPTSModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        # The head runs on every position and logits_to_keep slices afterwards: a matmul over a
        # different number of rows rounds differently, and computing it like gpts_edge/model.py
        # keeps prefill logits bit-identical to the reference (the cost is negligible here).
        logits = self.lm_head(out.last_hidden_state)
        if isinstance(logits_to_keep, int):
            # 0 keeps everything: slice(-0, None) is the whole sequence.
            logits = logits[:, slice(-logits_to_keep, None)]
        else:
            logits = logits[:, logits_to_keep]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1).to(logits.device),
                ignore_index=-100,
            )
        new_cache = getattr(out, _CACHE_FIELD)
        if return_dict is False:
            return tuple(t for t in (loss, logits, new_cache) if t is not None)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: new_cache})
