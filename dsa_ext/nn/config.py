"""DSAConfig: what a conversion adds to every attention layer."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

__all__ = ["DSAConfig", "MODES"]

MODES = ("dense", "warmup", "sparse")


@dataclass
class DSAConfig:
    """What a conversion adds to every attention layer.

    n_heads, head_dim: indexer heads Hi and their width Di (V3.2: 64 x 128; small models want
    few heads). rope_dim: leading dims of q_idx/k_idx that get RoPE (V3.2: 64). topk: keys per
    query in sparse mode (V3.2: 2048). hadamard: rotate q_idx/k_idx by an orthonormal Hadamard
    matrix (head_dim a power of two). fp8_topk: select the top-k from e4m3 indexer scores
    (dsa_ext.fp8, as V3.2 runs its indexer); the KL loss stays in the input dtype. mode: the
    initial mode, one of MODES. loss_coeff: the weight of each layer's indexer KL loss (the mean
    over tokens) in the gradient the backward injects (see DSAAttention).
    """
    n_heads: int = 4
    head_dim: int = 64
    rope_dim: int = 32
    topk: int = 128
    rope_theta: float = 10000.0
    hadamard: bool = False
    fp8_topk: bool = False
    mode: str = "sparse"
    loss_coeff: float = 1.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"DSAConfig.mode: expected one of {MODES}, got {self.mode!r}")
        if self.topk < 1:
            raise ValueError(f"DSAConfig.topk: expected >= 1, got {self.topk}")
        if self.rope_dim % 2 or not 0 <= self.rope_dim <= self.head_dim:
            raise ValueError(f"DSAConfig.rope_dim: expected an even number in [0, head_dim="
                             f"{self.head_dim}], got {self.rope_dim}")
        if self.loss_coeff < 0:
            raise ValueError(f"DSAConfig.loss_coeff: expected >= 0, got {self.loss_coeff}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DSAConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
