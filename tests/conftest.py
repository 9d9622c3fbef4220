import contextlib
import os

import pytest

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


@pytest.fixture
def decode_blas_threads(monkeypatch):
    """OpenBLAS on 2 threads for the test (restored after): yields the bound library and the
    list of the thread counts each call of the sampler's decode loop ran with."""
    from mlxrl import _blas
    from mlxrl.mlx import sampling

    lib = _blas._library()
    assert lib is not None, f"OpenBLAS is not bound: {_blas.status}"
    seen, decode = [], sampling._decode
    monkeypatch.setattr(sampling, "_decode", lambda *a, **k: seen.append(
        lib.openblas_get_num_threads()) or decode(*a, **k))
    before = lib.openblas_get_num_threads()
    lib.openblas_set_num_threads(2)
    try:
        yield lib, seen
    finally:
        lib.openblas_set_num_threads(before)
