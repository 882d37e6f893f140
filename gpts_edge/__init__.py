"""gpts-edge: GPT-S-1.4M (XGQA) on the edge.

from gpts_edge import load
m = load("out/")                    # an exported ONNX folder
print(m.generate("The future of AI is", max_new_tokens=40))
"""

from gpts_edge.errors import GptsError

__version__ = "0.1.0"
__all__ = ["GptsError", "load", "__version__"]


def load(path=None, threads=None):
    """Open an exported ONNX folder (default: a cached export of the bundled model) for generation."""
    from gpts_edge.api import load as _load

    return _load(path, threads=threads)
