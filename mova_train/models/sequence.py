"""The model side of sequence parallelism: how the dual-tower step sees its share of the video sequence.

Model code stays single-device: a `SequenceShard` is handed in from outside (`mova_train.training.parallel`
implements it with DeepSpeed-Ulysses over a process group) and `MovaModel.forward` only slices the video tokens,
attends and gathers through it. Layouts: B batch, L tokens (Ln = L / size on one rank), H heads, d head_dim.
"""

from __future__ import annotations

import torch


class SequenceShard:
    """Rank `rank` of a group of `size` holds video tokens [rank*L/size, (rank+1)*L/size) of every sample.

    Subclasses provide the two collectives; both must be differentiable with the exact adjoint in backward (an
    all-to-all's is the reverse all-to-all, an all-gather's the sum-reduce-scatter), so that every rank
    back-propagating the same full loss gives, summed over the group, `size` times the single-device gradient.
    """

    def __init__(self, rank: int, size: int):
        if not (isinstance(size, int) and size >= 1 and isinstance(rank, int) and 0 <= rank < size):
            raise ValueError(f"sequence shard rank {rank!r} of size {size!r}: need 0 <= rank < size")
        self.rank, self.size = rank, size

    def span(self, length: int, what: str) -> slice:
        """This rank's tokens of a sequence of `length`; the split must be even (Ulysses exchanges equal parts)."""
        if length % self.size:
            raise ValueError(
                f"{what}: {length} tokens do not split evenly over the {self.size} ranks of the sequence-parallel "
                f"group; choose a frame count / resolution whose token count is a multiple of {self.size}"
            )
        n = length // self.size
        return slice(self.rank * n, (self.rank + 1) * n)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Self-attention over the whole sequence: q, k, v [B, Ln, H, d] (this rank's tokens) -> [B, Ln, H*d]."""
        raise NotImplementedError

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The whole sequence on every rank: x [B, Ln, ...] -> [B, L, ...] in rank order."""
        raise NotImplementedError
