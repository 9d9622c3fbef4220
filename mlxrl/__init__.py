"""mlxrl: DPO, GRPO and SFT with LoRA on MLX, with a PyTorch/TRL backend for CUDA."""

from mlxrl import _blas

_blas.bind_openblas()

__version__ = "0.1.0"
