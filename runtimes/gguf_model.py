"""GPT-S in numpy: the forward pass over dequantized GGUF weights, its KV cache, and scoped
OpenBLAS thread control. The torch-free twin of gpts_edge/model.py (a parity test pins them)."""

from __future__ import annotations

from typing import Any

import numpy as np

from gpts_edge.config import ModelConfig
from gpts_edge.constants import XSA_EPS


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: np.float32) -> np.ndarray:
    return x * (1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)) * w


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


class NumpyGPTS:
    """The reference forward (gpts_edge/model.py) in float32 numpy."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, np.ndarray]) -> None:
        self.cfg = cfg
        f32 = np.float32
        self.embed = np.ascontiguousarray(weights["model.embed_tokens.weight"], dtype=f32)
        self.head = np.ascontiguousarray(self.embed.T)
        self.eps = f32(cfg.rms_norm_eps)
        self.layers = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."

            def t(name: str, p: str = p) -> np.ndarray:
                return np.ascontiguousarray(weights[p + name].T, dtype=f32)  # (in, out): x @ w

            qkv = np.concatenate(
                [t("self_attn.q_proj.weight"), t("self_attn.k_proj.weight"), t("self_attn.v_proj.weight")],
                axis=1,
            )
            gate_up = np.concatenate([t("mlp.gate_proj.weight"), t("mlp.up_proj.weight")], axis=1)
            self.layers.append(
                {
                    "attn_norm": weights[p + "input_layernorm.weight"].astype(f32),
                    "qkv": qkv,
                    "o": t("self_attn.o_proj.weight"),
                    "ffn_norm": weights[p + "post_attention_layernorm.weight"].astype(f32),
                    "gate_up": gate_up,
                    "down": t("mlp.down_proj.weight"),
                }
            )
        self.norm = weights["model.norm.weight"].astype(f32)
        hd = cfg.head_dim
        self.inv_freq = f32(cfg.rope_theta) ** (-np.arange(0, hd, 2, dtype=f32) / f32(hd))

    def _rope(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin (B, 1, T, D) in the rotate-half layout (cat(freqs, freqs))."""
        freqs = positions.astype(np.float32)[..., None] * self.inv_freq
        emb = np.concatenate([freqs, freqs], axis=-1)
        return np.cos(emb)[:, None], np.sin(emb)[:, None]

    @staticmethod
    def _apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        half = x.shape[-1] // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin

    def forward(
        self,
        ids: np.ndarray,
        past: list[tuple[np.ndarray, np.ndarray]] | None,
        positions: np.ndarray,
        attention_mask: np.ndarray | None,
    ) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
        """Logits (B, T, V) and this call's new (k, v) per layer, each (B, KV, T, D).

        ``past``: per layer (k, v) of shape (B, KV, P, D); ``attention_mask``: (B, P + T) or None.
        """
        cfg = self.cfg
        B, T = ids.shape
        P = past[0][0].shape[2] if past else 0
        H, KV, D, G = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.group_size
        cos, sin = self._rope(positions)
        bias = None
        if attention_mask is not None or P:
            S = P + T
            q_pos = np.arange(P, S)[:, None]
            allowed = (np.arange(S)[None, :] <= q_pos)[None]  # (1, T, S)
            if attention_mask is not None:
                allowed = allowed & (np.asarray(attention_mask)[:, None, :] != 0)
                # A query whose keys are all padding would get NaN; let it see itself (as model.py).
                allowed = allowed | (np.arange(S)[None, :] == q_pos)[None]
            bias = np.where(allowed, np.float32(0), np.float32(-np.inf))[:, None, None]  # (B, 1, 1, T, S)
        else:
            causal = np.triu(np.full((T, T), -np.inf, dtype=np.float32), k=1)
            bias = causal[None, None, None]
        scale = np.float32(1.0 / np.sqrt(D))
        x = self.embed[ids]
        new_kv = []
        for i, lw in enumerate(self.layers):
            h = _rms_norm(x, lw["attn_norm"], self.eps)
            qkv = h @ lw["qkv"]
            q = qkv[..., : H * D].reshape(B, T, H, D).transpose(0, 2, 1, 3)
            k = qkv[..., H * D : (H + KV) * D].reshape(B, T, KV, D).transpose(0, 2, 1, 3)
            v = qkv[..., (H + KV) * D :].reshape(B, T, KV, D).transpose(0, 2, 1, 3)
            q, k = self._apply_rope(q, cos, sin), self._apply_rope(k, cos, sin)
            v = np.ascontiguousarray(v)
            new_kv.append((k, v))
            if past:
                k_all = np.concatenate([past[i][0], k], axis=2)
                v_all = np.concatenate([past[i][1], v], axis=2)
            else:
                k_all, v_all = k, v
            qg = q.reshape(B, KV, G, T, D)  # query head h = g_kv * G + j reads KV head g_kv
            scores = (qg @ k_all[:, :, None].swapaxes(-1, -2)) * scale + bias  # (B, KV, G, T, S)
            scores -= scores.max(axis=-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(axis=-1, keepdims=True)
            y = probs @ v_all[:, :, None]  # (B, KV, G, T, D)
            if cfg.exclusive_attention:
                vc = v[:, :, None]  # this call's values, same position as the query
                yv = np.sum(y * vc, axis=-1, keepdims=True)
                vv = np.maximum(np.sum(vc * vc, axis=-1, keepdims=True), np.float32(XSA_EPS))
                y = y - (yv / vv) * vc
            y = y.reshape(B, H, T, D).transpose(0, 2, 1, 3).reshape(B, T, H * D)
            x = x + y @ lw["o"]
            h = _rms_norm(x, lw["ffn_norm"], self.eps)
            gu = h @ lw["gate_up"]
            f = cfg.intermediate_size
            x = x + (_silu(gu[..., :f]) * gu[..., f:]) @ lw["down"]
        x = _rms_norm(x, self.norm, self.eps)
        return x @ self.head, new_kv


class KVCache:
    """Preallocated per-layer key/value buffers for one sequence; grows when full."""

    def __init__(self, cfg: ModelConfig) -> None:
        shape = (1, cfg.num_kv_heads, cfg.context_length, cfg.head_dim)
        self.k = [np.zeros(shape, np.float32) for _ in range(cfg.num_layers)]
        self.v = [np.zeros(shape, np.float32) for _ in range(cfg.num_layers)]
        self.length = 0

    def past(self) -> list[tuple[np.ndarray, np.ndarray]] | None:
        n = self.length
        return [(k[:, :, :n], v[:, :, :n]) for k, v in zip(self.k, self.v, strict=True)] if n else None

    def append(self, new: list[tuple[np.ndarray, np.ndarray]]) -> None:
        t = new[0][0].shape[2]
        end = self.length + t
        if end > self.k[0].shape[2]:
            grow = max(end, 2 * self.k[0].shape[2])
            self.k = [
                np.concatenate([k, np.zeros_like(k[:, :, : grow - k.shape[2]])], axis=2) for k in self.k
            ]
            self.v = [
                np.concatenate([v, np.zeros_like(v[:, :, : grow - v.shape[2]])], axis=2) for v in self.v
            ]
        for i, (k, v) in enumerate(new):
            self.k[i][:, :, self.length : end] = k
            self.v[i][:, :, self.length : end] = v
        self.length = end


class BlasThreads:
    """Scoped thread count for numpy's OpenBLAS (found among the loaded libraries, Linux only).

    A decode step multiplies matrices of a few hundred KB: OpenBLAS's thread pool costs more than
    it saves there, and on a busy machine waiting for its threads made decoding ~10x slower.
    Elsewhere (no /proc, Accelerate, MKL) this does nothing.
    """

    _funcs: tuple[Any, Any] | None | bool = False  # False: not looked up yet

    @classmethod
    def _lookup(cls) -> tuple[Any, Any] | None:
        if cls._funcs is False:
            cls._funcs = None
            try:
                import ctypes

                with open("/proc/self/maps") as fh:
                    libs = {line.split()[-1] for line in fh if "openblas" in line.lower() and "/" in line}
                for lib in sorted(libs):
                    handle = ctypes.CDLL(lib)
                    for suffix in ("64_", "", "_64"):
                        for prefix in ("scipy_openblas", "openblas"):
                            setter = getattr(handle, f"{prefix}_set_num_threads{suffix}", None)
                            getter = getattr(handle, f"{prefix}_get_num_threads{suffix}", None)
                            if setter is not None and getter is not None:
                                setter.argtypes, setter.restype, getter.restype = (
                                    [ctypes.c_int],
                                    None,
                                    ctypes.c_int,
                                )
                                cls._funcs = (getter, setter)
                                return cls._funcs
            except (OSError, AttributeError):
                cls._funcs = None
        return cls._funcs  # type: ignore[return-value]

    def __init__(self, n: int | None) -> None:
        self.n, self.prev = n, None

    def __enter__(self) -> None:
        funcs = self._lookup() if self.n else None
        if funcs:
            self.prev = funcs[0]()
            if self.prev != self.n:
                funcs[1](self.n)

    def __exit__(self, *exc: object) -> None:
        funcs = self._funcs
        if self.prev is not None and funcs and self.prev != self.n:
            funcs[1](self.prev)
