"""portable_dg: a portable runtime for block-diffusion language models (DiffusionGemma).

    import portable_dg
    model = portable_dg.load("path/to/checkpoint", backend="numpy")
    out = portable_dg.generate(model, prompt_ids, max_new_tokens=256, seed=0)
    print(out.text)
"""

from .engine import Engine, generate_batch
from .errors import PortableDGError
from .runtime import Context, Model, load
from .sampler import GenerateOutput, generate

__all__ = ["Context", "Engine", "GenerateOutput", "Model", "PortableDGError", "generate", "generate_batch",
           "load"]
__version__ = "0.1.0"
