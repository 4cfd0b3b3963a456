"""ZCA whitening of images (docs/algorithms.md#normalisation-and-zca-whitening): fitted by kornia,
applied a chunk of rows at a time."""

from __future__ import annotations

import kornia
import torch
from torch import Tensor

# docs/algorithms.md#normalisation-and-zca-whitening: kornia ZCAWhitening(eps=0.1, compute_inv=True)
ZCA_EPS = 0.1
CHUNK_ELEMENTS = 1 << 23  # bounds the temporary float memory of chunked transforms (32 MB)


class ZCA:
    """A fitted ZCA whitening: z = (flat(x) - mean) @ transform, x = flat(z) @ transform_inv + mean.

    The matrices come from kornia's `ZCAWhitening`
    (docs/algorithms.md#normalisation-and-zca-whitening); applying them is a plain matmul a chunk of
    rows at a time, so temporary memory stays at one chunk; `out=x` whitens in place.
    """

    def __init__(self, mean: Tensor, transform: Tensor, transform_inv: Tensor) -> None:
        self.mean = mean.reshape(1, -1)  # [1, D]
        self.transform = transform  # [D, D], symmetric
        self.transform_inv = transform_inv  # [D, D]

    @classmethod
    def fit(cls, x: Tensor, eps: float = ZCA_EPS) -> ZCA:
        """Fit on images [N, C, H, W] in [0, 1]: unbiased covariance, eps added to eigenvalues."""
        whitening = kornia.enhance.ZCAWhitening(eps=float(eps), compute_inv=True).fit(x)
        return cls(whitening.mean_vector, whitening.transform_matrix, whitening.transform_inv)

    def __call__(self, x: Tensor, *, out: Tensor | None = None) -> Tensor:
        """Whiten images [N, C, H, W] (or [N, D]); same shape out."""
        return _affine_chunked(x, self.transform, shift_before=self.mean, shift_after=None, out=out)

    def inverse(self, z: Tensor) -> Tensor:
        """Undo the whitening: recovers the [0, 1] images."""
        # Adding the mean after the matmul equals kornia's (z + mean @ W) @ W_inv without the
        # round trip of the mean through both matrices.
        return _affine_chunked(z, self.transform_inv, shift_before=None, shift_after=self.mean)

    def state_dict(self) -> dict[str, Tensor]:
        return {"mean": self.mean, "transform": self.transform, "transform_inv": self.transform_inv}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> ZCA:
        return cls(state["mean"], state["transform"], state["transform_inv"])


def _affine_chunked(
    x: Tensor,
    matrix: Tensor,
    *,
    shift_before: Tensor | None,
    shift_after: Tensor | None,
    out: Tensor | None = None,
) -> Tensor:
    """(flat(x) - shift_before) @ matrix + shift_after, a chunk of rows at a time, into `out`."""
    flat = x.reshape(len(x), -1)
    if flat.shape[1] != matrix.shape[0]:
        raise ValueError(f"ZCA fitted on {matrix.shape[0]} features, got images {tuple(x.shape)}")
    matrix = matrix.to(flat.device, flat.dtype)
    result = torch.empty_like(x) if out is None else out
    out_flat = result.view(len(x), -1)  # a chunk is read whole before its rows are written
    rows = max(1, CHUNK_ELEMENTS // flat.shape[1])
    for start in range(0, len(flat), rows):
        chunk = flat[start : start + rows]
        if shift_before is not None:
            chunk = chunk - shift_before.to(flat.device, flat.dtype)
        chunk = chunk @ matrix
        if shift_after is not None:
            chunk = chunk + shift_after.to(flat.device, flat.dtype)
        out_flat[start : start + rows] = chunk
    return result
