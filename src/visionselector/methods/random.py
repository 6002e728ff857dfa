"""Random selection: a uniformly random subset of each sample's visual tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import SelectionMethod, check_options, register_method

__all__ = ["RandomMethod", "RandomOptions"]


@dataclass
class RandomOptions:
    """Options of :class:`RandomMethod`."""

    # torch.Generator.manual_seed takes [0, 2**64) (negative seeds would alias positive ones).
    seed: int = field(default=0, metadata={"help": "seed of the generator; the same inputs give the same selection",
                                           "at_least": 0, "below": 2**64})


@register_method
class RandomMethod(SelectionMethod):
    """Scores tokens with seeded uniform noise, so every call is reproducible.

    Args:
        seed: seed of the generator; the same inputs give the same selection.
    """

    name = "random"
    description = "uniformly random subset of the visual tokens (seeded, a floor for comparisons)"
    options_class = RandomOptions

    def __init__(self, hidden_size: int, seed: int = 0) -> None:
        super().__init__(hidden_size)
        self.seed = check_options(type(self), {"seed": seed})["seed"]

    def scores(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # One stream per sample, so a sample's selection does not depend on its batch.
        noise = torch.zeros(features.shape[:2], dtype=torch.float64)
        cpu_mask = mask.cpu()
        for row in range(noise.shape[0]):
            generator = torch.Generator(device="cpu").manual_seed(self.seed)
            noise[row, cpu_mask[row]] = torch.rand(int(cpu_mask[row].sum()), generator=generator, dtype=torch.float64)
        return noise.to(features.device)

    def selection_flops(self, visual: int, hidden: int, budget: int, prompt: int) -> int:
        """0: drawing noise and taking its top-k does no arithmetic on the tokens."""
        return 0

    def config_dict(self) -> dict:
        return {"seed": self.seed}
