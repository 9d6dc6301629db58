"""upsafe_ext: controllable LLM safety for Hugging Face / PyTorch, on fused C++/CUDA kernels."""
from . import _ext, ops  # noqa: F401  (loads the kernels, registers fake impls and autograd)
from . import upcycle  # noqa: F401  (registers the upcycled model type with transformers' Auto classes)

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]
