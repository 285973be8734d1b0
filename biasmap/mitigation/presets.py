"""Settings presets for energy-guided sampling: the paper's text and the authors' code.

DESIGN.md section 2 lists every difference; `guided_generate` takes a preset and lets
explicit arguments override any of its fields.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class GuidanceSettings:
    """Everything that decides the energy E and how its gradient is applied.

    cfg_half: whose queries give the maps ("cond" or "uncond"); solver, tau, iters,
    normalize: the soft top-k; topk_scope: "map" (one top-k over the whole map) or
    "row" (each map row keeps its own top-k, as the authors' code does);
    grad_norm_gate: apply guidance only to images whose ||grad||_2 is below it (None:
    always); guidance_scale: CFG gamma; inclusive_masks: hard masks use >= (True) or
    > (False) the quantile; eps: SoftIoU's epsilon; final_map_size: side of the maps
    the final IoU is measured on ("image" = image size, as OVAM's expand_size; None =
    the largest cross-attention resolution); guidance_map_size: side of each step's
    guidance maps (None = the largest captured block's resolution); aggregation: how
    block maps become one map, "one-stage" (each block resized straight to the map size,
    paper Eq. 2) or "two-stage" (OVAM: blocks summed at the largest captured block
    resolution, then that sum resized to the map size), for the per-step maps and the
    final aggregate alike (per-block BIoU maps are always each block resized straight).
    """

    cfg_half: str
    solver: str
    tau: float
    iters: int
    normalize: str
    topk_scope: str
    grad_norm_gate: float | None
    guidance_scale: float
    inclusive_masks: bool
    eps: float
    final_map_size: str | None
    guidance_map_size: int | None
    aggregation: str

    def override(self, **values) -> GuidanceSettings:
        """A copy with every non-None value replacing the preset's."""
        known = {f.name for f in fields(self)}
        unknown = set(values) - known
        if unknown:
            raise TypeError(f"unknown guidance settings {sorted(unknown)}; known: {sorted(known)}")
        return replace(self, **{k: v for k, v in values.items() if v is not None})


PRESETS: dict[str, GuidanceSettings] = {
    # The paper's text: conditional half, min-max normalised maps, the converged (exact)
    # soft top-k over the whole map, no gate. The paper gives no tau; 0.01 is the
    # authors' value.
    "paper": GuidanceSettings(
        cfg_half="cond",
        solver="exact",
        tau=0.01,
        iters=20,
        normalize="minmax",
        topk_scope="map",
        grad_norm_gate=None,
        guidance_scale=7.5,
        inclusive_masks=True,
        eps=1e-8,
        final_map_size=None,
        guidance_map_size=None,
        aggregation="one-stage",
    ),
    # The authors' run_gender.py: OVAM's default (unconditional) half, raw map sums,
    # 20 Sinkhorn iterations at tau=0.01, row-wise top-k, guidance only when
    # ||grad|| < 1, CFG 7.0, masks with >, final IoU at the image size; maps
    # aggregated in OVAM's two stages and expanded to 64x64 at every step
    # (get_ovam_callable(expand_size=(64, 64)) in run_gender.py), whatever the model.
    "official": GuidanceSettings(
        cfg_half="uncond",
        solver="sinkhorn",
        tau=0.01,
        iters=20,
        normalize="none",
        topk_scope="row",
        grad_norm_gate=1.0,
        guidance_scale=7.0,
        inclusive_masks=False,
        eps=1e-8,
        final_map_size="image",
        guidance_map_size=64,
        aggregation="two-stage",
    ),
}
