"""dsa_ext: DeepSeek Sparse Attention as PyTorch operators.

The operators live in ``torch.ops.dsa`` (C++/CUDA, registered with fake kernels and autograd);
the functions here are their typed Python entry points. ``dsa_ext.reference`` holds the same
functions in plain PyTorch, the semantics every kernel is tested against. ``dsa_ext.nn`` (loaded
with the package) has the modules that put DSA into a model; ``dsa_ext.hf`` (transformers models)
and ``dsa_ext.decoder`` (a plain decoder) are imported by name.
"""
import os

import torch  # noqa: F401  (first: _C links against libtorch/libc10, which importing torch loads)

try:
    from . import _C  # noqa: F401  (loads the shared library: registers torch.ops.dsa.*)
except ImportError as e:  # say what to do: a fresh checkout has no compiled library yet
    raise ImportError(f"dsa_ext's compiled operators do not load ({e}); build them in "
                      f"{os.path.dirname(__path__[0])}: "
                      f"`make build`, or `pip install --no-build-isolation -e .`") from e
from . import ops as _ops  # noqa: F401  (fake kernels and autograd)
from . import fp8, nn, reference  # nn: the modules (dsa_ext.nn.DSAConfig, ...) without a second import
from .ops import indexer_kl_loss, indexer_logits, indexer_topk, sparse_attention, topk_indices

__version__ = "0.1.0"
built_with_cuda: bool = _C.built_with_cuda


def set_index_checks(enabled: bool) -> None:
    """Make CUDA operators raise on index entries outside [-1, S) (default off: such entries are
    treated as -1, never read). One device synchronisation per call when on. CPU operators always
    check. The environment variable DSA_EXT_CHECK_INDICES=1 sets the default to on."""
    _C.set_index_checks(bool(enabled))


def index_checks_enabled() -> bool:
    return _C.index_checks_enabled()


def set_cpu_bf16_tiles(enabled: bool) -> None:
    """bfloat16 CPU kernels: use the AVX512-BF16 dot-product instruction where the CPU has it
    (default on; dot products exact, summed in float; attention probabilities rounded to
    bfloat16 before they weight v, as a bfloat16 matmul rounds them). Off: the rows are widened
    to float and every product is float. No effect on CPUs without AVX512-BF16."""
    _C.set_cpu_bf16_tiles(bool(enabled))


def cpu_bf16_tiles_enabled() -> bool:
    """Whether bfloat16 CPU kernels use AVX512-BF16 now (the CPU has it and it is switched on)."""
    return _C.cpu_bf16_tiles_enabled()


__all__ = [
    "indexer_logits",
    "topk_indices",
    "indexer_topk",
    "sparse_attention",
    "indexer_kl_loss",
    "reference",
    "fp8",
    "nn",
    "set_index_checks",
    "index_checks_enabled",
    "set_cpu_bf16_tiles",
    "cpu_bf16_tiles_enabled",
    "built_with_cuda",
]
