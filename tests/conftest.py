import contextlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# configs that enable W&B (Oumi recipes) run without a W&B account here; the W&B tests set their
# own mode (test_reporting.py)
os.environ.setdefault("WANDB_MODE", "disabled")

from mlxrl.runtime import mlx_runtime  # noqa: E402

# What mlxrl's entry points do, for the whole session: OpenBLAS bound before any test module
# imports mlx.core, and MLX's JIT kernels built with the vector flags in mlxrl's kernel folder.
_session = contextlib.ExitStack()
_session.enter_context(mlx_runtime())


def pytest_unconfigure(config):
    _session.close()
