"""Run a folder from `gpts-edge export --format onnx` with plain onnxruntime + tokenizers + numpy.

This is how an application embeds the model without installing gpts-edge:

    pip install onnxruntime tokenizers numpy
    gpts-edge export --format onnx -o out/model.onnx      # once, where gpts-edge is installed
    python examples/embed_onnx.py out/ "The lighthouse keeper" --max-new-tokens 60

The graph takes the whole prompt in one call (prefill), then one token per call, feeding each
call's ``present.*`` outputs back as the next call's ``past_key_values.*`` inputs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("prompt", nargs="?", default="")
    ap.add_argument("--max-new-tokens", type=int, default=60)
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    config = json.loads((args.folder / "config.json").read_text())
    tokenizer = Tokenizer.from_file(str(args.folder / "tokenizer.json"))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(args.folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])

    layers, kv_heads = config["num_hidden_layers"], config["num_key_value_heads"]
    head_dim, context = config["head_dim"], config["max_position_embeddings"]
    eos = config["eos_token_id"]
    past = {
        f"past_key_values.{i}.{kind}": np.zeros((1, kv_heads, 0, head_dim), dtype=np.float32)
        for i in range(layers)
        for kind in ("key", "value")
    }
    present_names = [o.name for o in session.get_outputs()][1:]  # after "logits"

    ids = tokenizer.encode(args.prompt).ids if args.prompt else [eos]
    ids = ids[-context:]
    rng = np.random.default_rng(args.seed)
    generated: list[int] = []
    printed = ""
    new = ids
    length = 0
    for _ in range(args.max_new_tokens):
        if length + len(new) > context:
            break  # the context is full (a real app would slide the window and prefill again)
        feeds = {
            "input_ids": np.array([new], dtype=np.int64),
            "attention_mask": np.ones((1, length + len(new)), dtype=np.int64),
            "position_ids": np.arange(length, length + len(new), dtype=np.int64)[None],
            **past,
        }
        logits, *presents = session.run(None, feeds)
        length += len(new)
        past = {
            name.replace("present", "past_key_values"): t
            for name, t in zip(present_names, presents, strict=True)
        }
        token = sample(logits[0, -1], args.temperature, args.top_p, rng)
        if token == eos:
            break
        generated.append(token)
        text = tokenizer.decode(generated)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(printed) :])
            sys.stdout.flush()
            printed = text
        new = [token]
    sys.stdout.write("\n")


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)]
    q = p[keep] / p[keep].sum()
    return int(rng.choice(keep, p=q))


if __name__ == "__main__":
    main()
