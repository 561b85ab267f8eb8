"""The library versions recorded with every artifact and checkpoint (a leaf module: anything may import it)."""

from __future__ import annotations

import platform

import fullchain


def library_versions() -> dict[str, str]:
    import safetensors
    import tokenizers
    import torch

    return {
        "fullchain": fullchain.__version__,
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "tokenizers": tokenizers.__version__,
        "python": platform.python_version(),
    }
