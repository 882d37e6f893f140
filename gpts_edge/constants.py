"""Facts every layer shares: file names of the formats we write, the XSA clamp and the card's
sampling defaults. The bottom of the import graph (imports nothing of ours), so the torch model,
the numpy runtimes, the exporters and the JavaScript/Kotlin ports' tests all read one value."""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

# v·v is clamped here before dividing, so a zero value vector gives z = y (no NaN).
XSA_EPS = 1e-12

# A checkpoint directory (Hugging Face layout).
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
GENERATION_FILE = "generation_config.json"
# Beside them in ONNX and HF folders.
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENAI_FILE = "genai_config.json"  # onnxruntime-genai
ONNX_MODEL_FILE = "model.onnx"
ORT_MODEL_FILE = "model.ort"
DECODE_SUFFIX = ".decode.onnx"  # model.onnx -> model.decode.onnx, the runtime's fast step graph
LAST_LOGITS_SUFFIX = ".last_logits.onnx"
GGUF_SUFFIX = ".gguf"


def flavour_file(model_file: str, suffix: str) -> str:
    """The file name of a graph flavour beside ``model_file``: model.onnx -> model.decode.onnx for
    DECODE_SUFFIX, model.ort -> model.decode.ort (the ORT export converts each flavour to its own
    file). The one spelling the exporters, the runtime and the overwrite rules read."""
    path = PurePath(model_file)
    return f"{path.stem}{suffix.removesuffix('.onnx')}{path.suffix}"


# The one table of sampling defaults (the model card's): generation_config.json written with a
# checkpoint, the fallback for a field missing from one, and SamplingOptions' own defaults.
DEFAULT_GENERATION: dict[str, Any] = {
    "do_sample": True,
    "temperature": 0.8,
    "top_k": 0,
    "top_p": 0.95,
    "repetition_penalty": 1.1,
    "no_repeat_ngram_size": 4,
    "max_new_tokens": 80,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
