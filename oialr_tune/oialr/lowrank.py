"""Low-rank layers: W = U S Vᵀ with frozen orthonormal bases U, Vᵀ and a small trainable S.

Two kinds of layer carry the factorization:

* :class:`LowRankLayer` replaces an ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d``. Its forward runs
  factorized (``x → x·V → ·(U S)ᵀ``; for a conv: a k-filter conv, then a 1×1 conv) when that costs
  fewer multiply-adds per output position than the dense layer, i.e. when ``k(m+n) + k² < m·n``,
  and otherwise rebuilds W and runs the dense op. Both paths compute the same function.
* :class:`LowRankWeight` is a ``torch.nn.utils.parametrize`` parametrization for weights that a
  module uses directly rather than through a sub-module call (the projections of
  ``nn.MultiheadAttention``, whose fused kernel wants the dense matrix; under the authors' preset
  also grouped and depthwise conv kernels). It always rebuilds W.

Conv kernels are viewed as matrices ``[out, in·kh·kw]`` (m = out, n = in·kh·kw).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LowRankLayer", "LowRankWeight", "factorized_is_cheaper"]


def factorized_is_cheaper(rank: int, out_features: int, in_features: int) -> bool:
    """Whether ``x·V, ·S, ·U`` costs fewer multiply-adds per example than ``x·Wᵀ``."""
    return rank * (out_features + in_features) + rank * rank < out_features * in_features


class LowRankLayer(nn.Module):
    """A Linear / Conv1d / Conv2d layer stored as U S Vᵀ plus the original bias.

    Built with :meth:`from_dense` (exact SVD, full rank) or with placeholders of a given rank
    (:meth:`empty_like_dense`, used when a checkpoint restores a model mid-low-rank).
    """

    def __init__(
        self,
        U: torch.Tensor,
        S: torch.Tensor,
        Vt: torch.Tensor,
        bias: nn.Parameter | torch.Tensor | None,
        conv: dict | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("U", U.detach().clone())
        self.register_buffer("Vt", Vt.detach().clone())
        self.S = nn.Parameter(S.detach().clone())
        # The dense layer's own bias Parameter, not a copy: the optimizer already holds it (and its
        # state), so it keeps training after the swap.
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach().clone())
        # conv holds what F.convNd needs beyond the weight: kernel shape, stride, padding, dilation.
        self.conv = conv

    # --- construction -------------------------------------------------------------------------

    @staticmethod
    def _conv_spec(layer: nn.Module) -> dict | None:
        if isinstance(layer, nn.Linear):
            return None
        return {
            "dims": 1 if isinstance(layer, nn.Conv1d) else 2,
            "kernel_size": tuple(layer.kernel_size),
            "stride": tuple(layer.stride),
            "padding": layer.padding if isinstance(layer.padding, str) else tuple(layer.padding),
            "dilation": tuple(layer.dilation),
            "in_channels": layer.in_channels,
        }

    @classmethod
    def from_dense(cls, layer: nn.Module, U: torch.Tensor, S: torch.Tensor, Vt: torch.Tensor) -> LowRankLayer:
        """Wrap ``layer``'s bias and conv settings around the given factors of its weight."""
        return cls(U, S, Vt, layer.bias, cls._conv_spec(layer))

    @classmethod
    def empty_like_dense(cls, layer: nn.Module, rank: int) -> LowRankLayer:
        """A placeholder of the right shapes for ``load_state_dict`` to fill."""
        m, n = matrix_shape(layer)
        w = layer.weight
        z = lambda *s: torch.zeros(*s, device=w.device, dtype=w.dtype)  # noqa: E731
        return cls(z(m, rank), z(rank, rank), z(rank, n), layer.bias, cls._conv_spec(layer))

    U: torch.Tensor
    Vt: torch.Tensor

    def set_factors(self, U: torch.Tensor, S: torch.Tensor, Vt: torch.Tensor) -> nn.Parameter:
        """Replace the factors after a rotation or rank cut; returns the new trainable S."""
        self.U = U.detach().contiguous()
        self.Vt = Vt.detach().contiguous()
        self.S = nn.Parameter(S.detach().contiguous())
        return self.S

    def dense_matrix(self) -> torch.Tensor:
        """W = U S Vᵀ as an (m × n) matrix; gradients flow into S only."""
        return (self.U @ self.S) @ self.Vt

    # --- shape ---------------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return self.S.shape[0]

    @property
    def out_features(self) -> int:
        return self.U.shape[0]

    @property
    def in_features(self) -> int:
        return self.Vt.shape[1]

    @property
    def factorized(self) -> bool:
        """True when the forward runs as two thin ops instead of one dense op (cheaper at this rank)."""
        return factorized_is_cheaper(self.rank, self.out_features, self.in_features)

    def dense_weight(self) -> torch.Tensor:
        """The weight in the original layer's shape (``[out, in]`` or ``[out, in, *kernel]``)."""
        w = self.dense_matrix()
        if self.conv is None:
            return w
        return w.view(self.out_features, self.conv["in_channels"], *self.conv["kernel_size"])

    def to_dense(self) -> nn.Module:
        """An ordinary ``nn.Linear`` / ``nn.ConvNd`` holding W = U S Vᵀ (for export)."""
        has_bias = self.bias is not None
        kw = {"device": self.S.device, "dtype": self.S.dtype}
        if self.conv is None:
            dense: nn.Module = nn.Linear(self.in_features, self.out_features, bias=has_bias, **kw)
        else:
            c = self.conv
            conv_cls = nn.Conv1d if c["dims"] == 1 else nn.Conv2d
            dense = conv_cls(
                c["in_channels"], self.out_features, c["kernel_size"], stride=c["stride"],
                padding=c["padding"], dilation=c["dilation"], bias=has_bias, **kw,
            )
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight())
            if has_bias:
                dense.bias.copy_(self.bias)
        return dense

    # --- forward -------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.factorized:
            return self._dense_forward(x, self.dense_weight())
        # Fold S into U: one k×k·m product per call instead of a third op over the whole batch.
        US = self.U @ self.S
        if self.conv is None:
            return F.linear(F.linear(x, self.Vt), US, self.bias)
        c = self.conv
        conv = F.conv1d if c["dims"] == 1 else F.conv2d
        first = self.Vt.view(self.rank, c["in_channels"], *c["kernel_size"])
        h = conv(x, first, None, c["stride"], c["padding"], c["dilation"])
        second = US.view(self.out_features, self.rank, *([1] * c["dims"]))
        return conv(h, second, self.bias)

    def _dense_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if c is None:
            return F.linear(x, weight, self.bias)
        conv = F.conv1d if c["dims"] == 1 else F.conv2d
        return conv(x, weight, self.bias, c["stride"], c["padding"], c["dilation"])

    def extra_repr(self) -> str:
        kind = "linear" if self.conv is None else f"conv{self.conv['dims']}d"
        mode = "factorized" if self.factorized else "rebuilt"
        return f"{kind}, out={self.out_features}, in={self.in_features}, rank={self.rank}, {mode}"


class LowRankWeight(nn.Module):
    """Parametrization ``S ↦ U S Vᵀ`` for a weight its module uses directly (MHA projections).

    Registered with ``parametrize.register_parametrization(module, name, LowRankWeight(U, Vt,
    shape), unsafe=True)``; the trainable S is ``module.parametrizations[name].original``. `shape`
    is the weight's own shape when it is not the (m × n) matrix, e.g. the ``[out, in/groups, kh,
    kw]`` kernel of a grouped conv (the authors' preset rebuilds such kernels every forward).
    """

    U: torch.Tensor
    Vt: torch.Tensor

    def __init__(self, U: torch.Tensor, Vt: torch.Tensor, shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.register_buffer("U", U.detach().clone())
        self.register_buffer("Vt", Vt.detach().clone())
        self.shape = tuple(shape) if shape is not None else (U.shape[0], Vt.shape[1])

    def forward(self, S: torch.Tensor) -> torch.Tensor:
        return ((self.U @ S) @ self.Vt).view(self.shape)

    def right_inverse(self, W: torch.Tensor) -> torch.Tensor:
        # The projection of W onto the bases: exact when W = U S Vᵀ, as at registration.
        return self.U.T @ W.reshape(self.U.shape[0], -1) @ self.Vt.T


def matrix_shape(layer: nn.Module) -> tuple[int, int]:
    """(m, n) of a layer's weight viewed as a matrix ``[out, in·kernel]``."""
    w = layer.weight
    return w.shape[0], math.prod(w.shape[1:])
