"""upsafe_ext: controllable LLM safety for Hugging Face / PyTorch, on fused C++/CUDA kernels."""
from . import _ext, ops  # noqa: F401  (loads the kernels, registers fake impls and autograd)

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]
