"""LoReFT (Wu et al. 2024, "ReFT: Representation Finetuning for Language Models"): a learned low-rank edit of the
residual stream, h + Rᵀ(Wh + b − Rh), with R ∈ ℝ^{r×d} of orthonormal rows. In the subspace R spans, the hidden
state's coordinates Rh are replaced by learned ones Wh + b; outside it nothing changes. R stays orthonormal through
a torch parametrization (`torch.nn.utils.parametrizations.orthogonal`), and the edit computes in float32 whatever
the model's dtype. As a `Steering` edit it is scaled by the row's strength: strength 1 is the paper's intervention.
"""

from __future__ import annotations

from typing import cast

import torch
from torch.nn.utils.parametrizations import orthogonal


class LowRankEdit(torch.nn.Module):
    """Called on hidden states [..., d], returns what LoReFT adds to them: Rᵀ(Wh + b − Rh)."""

    def __init__(self, hidden: int, rank: int, generator: torch.Generator | None = None):
        super().__init__()
        self.rotate = orthogonal(torch.nn.Linear(hidden, rank, bias=False))  # weight R: [rank, hidden]
        self.learned = torch.nn.Linear(hidden, rank)  # weight W, bias b
        with torch.no_grad():  # a seeded start, so a fit is repeatable
            generator = generator or torch.Generator().manual_seed(0)
            self.set_rotation(torch.linalg.qr(torch.randn(hidden, rank, generator=generator))[0].T)
            self.learned.weight.copy_(self.rotation)  # W = R, b = 0: the edit starts as the identity
            self.learned.bias.zero_()

    def set_rotation(self, rotation: torch.Tensor) -> None:
        """Assign R (orthonormal rows). The parametrization completes them to a square orthogonal basis drawn from
        torch's global random generator, and that basis shapes every gradient step on R: drawn under a fixed seed,
        a fit does not depend on what drew random numbers before it."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.rotate.weight = rotation

    @property
    def rank(self) -> int:
        return self.learned.out_features

    @property
    def rotation(self) -> torch.Tensor:
        """R, its rows orthonormal (the parametrization recomputes it from its free parameters)."""
        return cast(torch.Tensor, self.rotate.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        h = hidden.float()
        rotation = self.rotation
        return ((self.learned(h) - h @ rotation.T) @ rotation).to(hidden.dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        """R, W and b, detached, float32: what a vector file stores."""
        return {
            "R": self.rotation.detach().float().cpu().contiguous(),
            "W": self.learned.weight.detach().float().cpu().contiguous(),
            "b": self.learned.bias.detach().float().cpu().contiguous(),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> LowRankEdit:
        rank, hidden = tensors["W"].shape
        edit = cls(hidden, rank)
        with torch.no_grad():
            edit.set_rotation(tensors["R"].float())
            edit.learned.weight.copy_(tensors["W"])
            edit.learned.bias.copy_(tensors["b"])
        return edit.requires_grad_(False)


def random_edit(like: LowRankEdit, seed: int) -> LowRankEdit:
    """The control for a learned edit: its W and b in a random subspace of the same rank (R drawn at random)."""
    tensors = like.tensors()
    rank, hidden = tensors["R"].shape
    random = torch.randn(hidden, rank, generator=torch.Generator().manual_seed(seed))
    return LowRankEdit.from_tensors({**tensors, "R": torch.linalg.qr(random)[0].T.contiguous()})
