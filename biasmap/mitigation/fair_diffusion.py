"""Fair Diffusion: SEGA semantic guidance with demographic edit prompts.

Each edit prompt c adds a direction s_c * (eps_c - eps_uncond), negated when its edit
is reversed, kept only where its magnitude reaches the edit threshold's quantile (per
image and channel), weighted and accumulated with momentum; it joins the CFG guidance
once every edit's warm-up is over. The defaults are the settings in the authors'
run_gender.py / run_race.py, which follow Fair Diffusion (Friedrich et al., 2023).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

# Edit prompts per demographic axis; the first is pushed away from (reversed), the
# second towards, and seeds alternate their order (authors' code).
AXIS_EDITS = {
    "gender": ("a male", "a female"),
    "race": ("a white person", "an African-american person"),
}


@dataclass(frozen=True)
class FairDiffusion:
    """Edit prompts and SEGA settings; lists hold one value per edit prompt."""

    prompts: tuple[str, ...] = AXIS_EDITS["gender"]
    reverse: tuple[bool, ...] = (True, False)
    guidance_scale: float = 4.0
    warmup_steps: int = 10
    threshold: float = 0.95
    weights: tuple[float, ...] = (1.0, 1.0)
    momentum_scale: float = 0.3
    momentum_beta: float = 0.6

    def __post_init__(self):
        count = len(self.prompts)
        if count == 0:
            raise ValueError("Fair Diffusion needs at least one edit prompt")
        for name in ("reverse", "weights"):
            if len(getattr(self, name)) != count:
                raise ValueError(
                    f"FairDiffusion.{name} needs one value per edit prompt ({count}), got "
                    f"{list(getattr(self, name))}"
                )
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"FairDiffusion.threshold must be in (0, 1), got {self.threshold}")

    @classmethod
    def for_seed(cls, axis: str, seed: int) -> FairDiffusion:
        """The authors' edits for a demographic axis: the prompt order alternates with the seed."""
        if axis not in AXIS_EDITS:
            raise ValueError(
                f"no Fair Diffusion edits for axis {axis!r}; known: {list(AXIS_EDITS)}"
            )
        first, second = AXIS_EDITS[axis]
        prompts = (first, second) if seed % 2 == 0 else (second, first)
        return cls(prompts=prompts)

    @classmethod
    def coerce(cls, editing_prompt) -> FairDiffusion | None:
        """None, a FairDiffusion, or a list of edit prompts (the rest at the defaults)."""
        if editing_prompt is None or isinstance(editing_prompt, FairDiffusion):
            return editing_prompt
        if isinstance(editing_prompt, str):
            editing_prompt = [editing_prompt]
        prompts = tuple(editing_prompt)
        if len(prompts) == 2:
            return cls(prompts=prompts)
        return cls(
            prompts=prompts,
            reverse=tuple(i == 0 for i in range(len(prompts))),
            weights=(1.0,) * len(prompts),
        )


@dataclass
class SemanticGuidance:
    """The SEGA term across the steps of one generation (it carries momentum)."""

    config: FairDiffusion
    momentum: torch.Tensor | None = field(default=None, init=False)

    def __call__(
        self, step: int, eps_uncond: torch.Tensor, eps_edits: Sequence[torch.Tensor]
    ) -> torch.Tensor | None:
        """Edit guidance [B, C, h, w] to add to the CFG guidance at `step`, or None in warm-up.

        eps_uncond: [B, C, h, w]; eps_edits: one [B, C, h, w] per edit prompt.
        """
        cfg = self.config
        directions = []
        for c, eps_edit in enumerate(eps_edits):
            direction = (eps_edit - eps_uncond) * cfg.guidance_scale
            if cfg.reverse[c]:
                direction = -direction
            # Keep only the strongest (1 - threshold) of each image-channel's latent entries.
            magnitude = direction.abs().flatten(start_dim=2).float()
            cutoff = torch.quantile(magnitude, cfg.threshold, dim=2).to(direction.dtype)
            direction = torch.where(
                direction.abs() >= cutoff[..., None, None], direction, torch.zeros_like(direction)
            )
            directions.append(direction * cfg.weights[c])
        edit = torch.stack(directions).sum(dim=0)
        if self.momentum is None:
            self.momentum = torch.zeros_like(edit)
        edit = edit + cfg.momentum_scale * self.momentum
        self.momentum = cfg.momentum_beta * self.momentum + (1 - cfg.momentum_beta) * edit
        # Momentum builds up during warm-up; the edit joins only afterwards.
        return edit if step >= cfg.warmup_steps else None
