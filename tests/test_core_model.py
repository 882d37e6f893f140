"""The reference XGQA model: parameter count, cached vs full forward, a naive second
implementation, the v.v = 0 guard, and left-padded batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gpts_edge.checkpoint import load_checkpoint
from gpts_edge.config import PRESETS, ModelConfig
from gpts_edge.model import GPTS, exclusive, load_model
from gpts_edge.names import expected_shapes

TOL = 1e-5


def test_card_model_has_exactly_1426176_parameters() -> None:
    cfg = ModelConfig()
    model = GPTS(cfg)
    # nn.Module.parameters() yields each tensor once, so a separately stored head would show up here.
    assert sum(p.numel() for p in model.parameters()) == 1_426_176
    assert cfg.num_parameters == 1_426_176
    assert sum(math.prod(s) for s in expected_shapes(cfg).values()) == 1_426_176


def test_bundled_checkpoint_has_exactly_1426176_parameters() -> None:
    ckpt = load_checkpoint(None)
    assert ckpt.config == ModelConfig()
    assert sum(w.size for w in ckpt.weights.values()) == 1_426_176
    assert "lm_head.weight" not in ckpt.weights


def test_head_is_tied_to_the_embedding() -> None:
    model = GPTS(PRESETS["tiny"]).init_weights(0).eval()
    ids = torch.tensor([[5, 17, 300]])
    logits, _ = model(ids)
    with torch.no_grad():
        model.embed_tokens.weight[42] += 1.0  # changes the head row 42 as well as the input of token 42
    logits2, _ = model(ids)
    changed = (logits2 - logits).abs()[0, :, :].amax(0)
    assert changed[42] > 1e-3


# --- cached forward ---------------------------------------------------------------------------
# Tolerances. The bound is max |diff| <= 1e-5. It holds exactly as stated for the
# algorithm (float64: ~1e-13 measured) and for seeded init weights in float32 (~1.5e-6 measured).
# For the *trained* checkpoint in float32 the logits reach ~30 and each path on its own is
# ~3.5e-5 away from the float64 result (fp32 rounding through 5 layers), so there the bound is
# 1e-5 relative to the largest logit (measured 1.4e-4 absolute = 5e-6 relative).


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls run faster on one thread, and CI has only two cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def card_model() -> GPTS:
    """The bundled, really trained GPT-S-1.4M: realistic activations for the comparisons."""
    return load_model(None)


@pytest.fixture(scope="module")
def card_model64(card_model) -> GPTS:
    m = GPTS(card_model.cfg).double().eval()
    m.load_state_dict(card_model.state_dict())
    return m


def _random_context(cfg: ModelConfig, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        1, cfg.vocab_size, (1, cfg.context_length), generator=torch.Generator().manual_seed(seed)
    )


def _text_context(n: int) -> torch.Tensor:
    from gpts_edge.checkpoint import default_model_dir
    from gpts_edge.tokenizer import load_tokenizer

    tok = load_tokenizer(default_model_dir() / "tokenizer.json")
    text = (
        "The future of AI is small. A tiny model runs on a phone, in a browser, on a watch. "
        "It reads the words so far and guesses the next one, again and again. "
    ) * 30
    ids = tok.encode(text).ids[:n]
    assert len(ids) == n
    return torch.tensor([ids])


def _cached_logits(model: GPTS, ids: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    out, cache, pos = [], None, 0
    with torch.no_grad():
        for n in chunks:
            logits, cache = model(ids[:, pos : pos + n], cache)
            out.append(logits)
            pos += n
    assert pos == ids.shape[1]
    return torch.cat(out, dim=1)


def _worst(cached: torch.Tensor, full: torch.Tensor) -> tuple[float, int]:
    per_pos = (cached - full).abs().amax(-1)[0]
    return float(per_pos.max()), int(per_pos.argmax())


CHUNKS = [7, 1, 33, 2, 64, 5, 100, 1, 171]  # uneven chunk sizes, 384 in all


@pytest.mark.parametrize("chunks", [[1] * 384, CHUNKS], ids=["one-token", "multi-token"])
def test_cached_forward_equals_full_forward_at_every_position_float64(card_model64, chunks) -> None:
    ids = _random_context(card_model64.cfg)
    with torch.no_grad():
        full, _ = card_model64(ids)
    assert full.shape[1] == 384
    diff, pos = _worst(_cached_logits(card_model64, ids, chunks), full)
    assert diff <= TOL, f"worst position {pos}: {diff:.3g}"


@pytest.mark.parametrize("chunks", [[1] * 384, CHUNKS], ids=["one-token", "multi-token"])
def test_cached_forward_equals_full_forward_seeded_weights_float32(chunks) -> None:
    model = GPTS(ModelConfig()).init_weights(0).eval()
    ids = _random_context(model.cfg, seed=1)
    with torch.no_grad():
        full, _ = model(ids)
    diff, pos = _worst(_cached_logits(model, ids, chunks), full)
    assert diff <= TOL, f"worst position {pos}: {diff:.3g}"


@pytest.mark.parametrize("chunks", [[1] * 384, CHUNKS], ids=["one-token", "multi-token"])
def test_cached_forward_equals_full_forward_trained_float32(card_model, chunks) -> None:
    ids = _text_context(384)
    with torch.no_grad():
        full, _ = card_model(ids)
    diff, pos = _worst(_cached_logits(card_model, ids, chunks), full)
    bound = TOL * float(full.abs().max())
    assert diff <= bound, f"worst position {pos}: {diff:.3g} > {bound:.3g}"


def test_cached_forward_with_xsa_off_equals_full_forward(tiny_checkpoint_plain) -> None:
    model = load_model(tiny_checkpoint_plain)
    assert not model.cfg.exclusive_attention
    ids = torch.randint(1, 4096, (2, model.cfg.context_length), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full, _ = model(ids)
    cached = _cached_logits(model, ids, [10, 1, 1, 20, 32])
    assert float((cached - full).abs().max()) <= TOL


# --- a deliberately naive second implementation ------------------------------------------------
def naive_logits(weights: dict[str, np.ndarray], cfg: ModelConfig, ids: list[int]) -> np.ndarray:
    """Float64 loops over positions and heads, straight from the definitions in the issue."""
    W = {k: v.astype(np.float64) for k, v in weights.items()}
    H, KV, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    T = len(ids)

    def rmsnorm(x, w):
        return x / math.sqrt(sum(float(t) * float(t) for t in x) / len(x) + cfg.rms_norm_eps) * w

    def rope(vec, pos):
        half = hd // 2
        out = np.empty(hd)
        for i in range(half):
            angle = pos * cfg.rope_theta ** (-2.0 * i / hd)
            c, s = math.cos(angle), math.sin(angle)
            out[i] = vec[i] * c - vec[i + half] * s
            out[i + half] = vec[i + half] * c + vec[i] * s
        return out

    def softmax(scores):
        m = max(scores)
        e = [math.exp(s - m) for s in scores]
        tot = sum(e)
        return [x / tot for x in e]

    x = [W["model.embed_tokens.weight"][t].copy() for t in ids]
    for layer in range(cfg.num_layers):
        p = f"model.layers.{layer}."
        h = [rmsnorm(x[t], W[p + "input_layernorm.weight"]) for t in range(T)]
        q = [W[p + "self_attn.q_proj.weight"] @ h[t] for t in range(T)]
        k = [W[p + "self_attn.k_proj.weight"] @ h[t] for t in range(T)]
        v = [W[p + "self_attn.v_proj.weight"] @ h[t] for t in range(T)]
        attn_out = []
        for i in range(T):
            z_all = []
            for head in range(H):
                g = head // (H // KV)  # the KV head this query head reads
                qi = rope(q[i][head * hd : (head + 1) * hd], i)
                keys = [rope(k[j][g * hd : (g + 1) * hd], j) for j in range(i + 1)]
                vals = [v[j][g * hd : (g + 1) * hd] for j in range(i + 1)]
                w = softmax([float(qi @ kj) / math.sqrt(hd) for kj in keys])
                y = sum(wj * vj for wj, vj in zip(w, vals, strict=True))
                if cfg.exclusive_attention:
                    own = vals[i]  # value vector of the same position, same KV head
                    vv = float(own @ own)
                    if vv > 0:
                        y = y - float(y @ own) / vv * own
                z_all.append(y)
            attn_out.append(W[p + "self_attn.o_proj.weight"] @ np.concatenate(z_all))
        x = [x[t] + attn_out[t] for t in range(T)]
        for t in range(T):
            m = rmsnorm(x[t], W[p + "post_attention_layernorm.weight"])
            gate = W[p + "mlp.gate_proj.weight"] @ m
            up = W[p + "mlp.up_proj.weight"] @ m
            act = np.array([gi / (1.0 + math.exp(-gi)) for gi in gate]) * up
            x[t] = x[t] + W[p + "mlp.down_proj.weight"] @ act
    final = [rmsnorm(x[t], W["model.norm.weight"]) for t in range(T)]
    return np.stack([W["model.embed_tokens.weight"] @ f for f in final])


@pytest.mark.parametrize("xsa", [True, False], ids=["xsa-on", "xsa-off"])
@pytest.mark.parametrize("weights", ["trained-float64", "seeded-float32"])
def test_model_equals_naive_loop_implementation(card_model, xsa: bool, weights: str) -> None:
    cfg = card_model.cfg.replace(exclusive_attention=xsa)
    model = GPTS(cfg)
    if weights == "trained-float64":
        model.load_state_dict(card_model.state_dict())
        model.double()
    else:
        model.init_weights(5)
    model.eval()
    ids = [464, 2003, 286, 9, 318, 1, 77, 3000, 12, 12, 12, 4095, 0, 250, 51, 7]
    with torch.no_grad():
        got = model(torch.tensor([ids]))[0][0].double().numpy()
    want = naive_logits({k: v.detach().numpy() for k, v in state_to_named(model).items()}, cfg, ids)
    diff = np.abs(got - want).max()
    assert diff <= TOL, f"max |diff| {diff:.3g}"


def state_to_named(model: GPTS) -> dict[str, torch.Tensor]:
    return {f"model.{k}": v for k, v in model.state_dict().items()}


def test_xsa_actually_changes_the_output(card_model) -> None:
    """Guards the naive comparison against a switch that does nothing."""
    plain = GPTS(card_model.cfg.replace(exclusive_attention=False))
    plain.load_state_dict(card_model.state_dict())
    ids = torch.tensor([[464, 2003, 286, 9, 318]])
    with torch.no_grad():
        assert float((plain.eval()(ids)[0] - card_model(ids)[0]).abs().max()) > 1e-2


def test_xsa_output_is_orthogonal_to_own_value() -> None:
    g = torch.Generator().manual_seed(0)
    y, v = torch.randn(2, 4, 6, 32, generator=g), torch.randn(2, 4, 6, 32, generator=g)
    z = exclusive(y, v)
    assert float((z * v).sum(-1).abs().max()) < 1e-5


def test_zero_value_vector_produces_no_nan() -> None:
    y = torch.randn(1, 4, 3, 8)
    v = torch.zeros(1, 4, 3, 8)
    z = exclusive(y, v)
    assert torch.equal(z, y)

    # In the model: a token whose embedding is zero has RMSNorm output 0, hence v = 0 at its
    # position in layer 0 while other positions have v != 0. Forward and backward stay finite.
    model = GPTS(PRESETS["tiny"]).init_weights(0)
    with torch.no_grad():
        model.embed_tokens.weight[7] = 0.0
    ids = torch.tensor([[7, 3, 7, 9, 7]])
    logits, _ = model(ids)
    assert torch.isfinite(logits).all()
    logits.logsumexp(-1).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        cached = _cached_logits(model, ids, [1] * 5)
    assert torch.isfinite(cached).all() and float((cached - logits.detach()).abs().max()) <= TOL


# --- left padding -------------------------------------------------------------------------------
def test_left_padded_batch_equals_unpadded_rows(card_model64) -> None:
    card_model = card_model64  # float64: the comparison checks masking and positions, not fp32 rounding
    rows = [[464, 2003, 286, 9, 318, 1, 77], [12, 13], [3000, 4, 5, 6]]
    T = max(map(len, rows))
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r) :] = torch.tensor(r)
        mask[b, T - len(r) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        batched, _ = card_model(ids, position_ids=pos, attention_mask=mask)
        assert torch.isfinite(batched).all()  # padding rows included
        for b, r in enumerate(rows):
            single, _ = card_model(torch.tensor([r]))
            diff = float((batched[b, T - len(r) :] - single[0]).abs().max())
            assert diff <= TOL, f"row {b}: {diff:.3g}"


def test_left_padded_batch_continues_with_cache(card_model64) -> None:
    """Prefill a left-padded batch, then decode one token per row: equals each row alone."""
    card_model = card_model64
    rows = [[464, 2003, 286, 9], [12, 13]]
    nxt = [[318], [14]]
    ids = torch.tensor([[464, 2003, 286, 9], [0, 0, 12, 13]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        _, cache = card_model(ids, position_ids=pos, attention_mask=mask)
        mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        pos2 = pos[:, -1:] + 1
        step, _ = card_model(torch.tensor(nxt), cache, position_ids=pos2, attention_mask=mask2)
        for b in range(2):
            single, _ = card_model(torch.tensor([rows[b] + nxt[b]]))
            assert float((step[b, -1] - single[0, -1]).abs().max()) <= TOL


def test_torch_runtime_forward_logits_handles_left_padding(tiny_checkpoint) -> None:
    from gpts_edge.torch_runtime import TorchRuntime

    rt = TorchRuntime(tiny_checkpoint)
    ids = np.array([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    batched = rt.forward_logits(ids, mask)
    alone = rt.forward_logits(np.array([[5, 6, 7]]))
    assert np.abs(batched[0, 2:] - alone[0]).max() <= TOL
    assert np.abs(batched[1] - rt.forward_logits(ids[1:])[0]).max() <= TOL
