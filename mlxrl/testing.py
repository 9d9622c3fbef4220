"""For tests (mlxrl's and those of code built on it); mlxrl itself never imports this module.

The tiny models live in the runtime module `mlxrl.tiny_models` (they are what `tiny://qwen2`
names); this module re-exports what tests use from it: `build_tiny_model(out_dir, arch, ...)` for a
model in a folder of the test's own, `tiny_model(arch, ...)` for the cached one, and the token ids
and chat template they share.
"""

from mlxrl.tiny_models import (  # noqa: F401
    ARCHS,
    CHAT_TEMPLATE,
    EOS_ID,
    IM_START_ID,
    PAD_ID,
    build_tiny_model,
    build_tokenizer,
    make_config,
    make_weights,
    tiny_model,
)
