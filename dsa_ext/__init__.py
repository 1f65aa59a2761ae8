"""dsa_ext: DeepSeek Sparse Attention as PyTorch operators.

The operators live in ``torch.ops.dsa`` (C++/CUDA, registered with fake kernels and autograd);
the functions here are their typed Python entry points. ``dsa_ext.reference`` holds the same
functions in plain PyTorch, the semantics every kernel is tested against.
"""
import torch  # noqa: F401  (first: _C links against libtorch/libc10, which importing torch loads)

from . import _C  # noqa: F401  (loads the shared library: registers torch.ops.dsa.*)
from . import ops as _ops  # noqa: F401  (fake kernels and autograd)
from . import fp8, ranges, reference
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


__all__ = [
    "indexer_logits",
    "topk_indices",
    "indexer_topk",
    "sparse_attention",
    "indexer_kl_loss",
    "reference",
    "ranges",
    "fp8",
    "set_index_checks",
    "index_checks_enabled",
    "built_with_cuda",
]
