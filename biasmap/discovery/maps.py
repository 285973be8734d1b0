"""AttributionMaps: per-block and aggregated concept maps, with IoU / BIoU (paper Eq. 3, 4, 6)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .. import ops

DEFAULT_Q = 0.7
AGGREGATIONS = ("one-stage", "two-stage")


def aggregate_blocks(
    block_maps: Sequence[torch.Tensor], size: tuple[int, int], aggregation: str = "one-stage"
) -> torch.Tensor:
    """Sum of block maps [B, C, h_i, w_i] on one [B, C, S_h, S_w] grid.

    "one-stage" (paper Eq. 2): every block resized bilinearly straight to `size`, then summed.
    "two-stage" (OVAM, the authors' code): every block resized to the largest block
    resolution among `block_maps` and summed; that sum is then resized to `size`. Bilinear
    resizes do not compose, so the two give different maps whenever `size` is not that
    largest resolution.
    """
    ops._checks.choice("aggregation", aggregation, AGGREGATIONS)
    size = tuple(size)
    if aggregation == "one-stage":
        return ops.resize_aggregate(list(block_maps), size)
    # A plain loop rather than max(key=...), which torch.compile cannot trace.
    largest = tuple(block_maps[0].shape[-2:])
    for block in block_maps[1:]:
        height, width = block.shape[-2:]
        if height * width > largest[0] * largest[1]:
            largest = (height, width)
    summed = ops.resize_aggregate(list(block_maps), largest)
    if largest == size:
        return summed
    return ops.resize_aggregate([summed], size)


class AttributionMaps:
    """Concept attribution maps of a batch of B generated images.

    aggregate: [B, C, S_h, S_w], the sum of the block maps; blocks: {name: [B, C, S_h, S_w]}
    in UNet order (down-64, ..., up-64); concepts: the C concept words, in the order given
    to `biasmap.trace`. Concepts are addressed by word or by index. Maps are float32.
    """

    def __init__(
        self,
        blocks: Mapping[str, torch.Tensor],
        concepts: Sequence[str],
        aggregate: torch.Tensor | None = None,
        meta: dict[str, Any] | None = None,
    ):
        if not blocks:
            raise ValueError("AttributionMaps needs at least one block map")
        self.blocks: dict[str, torch.Tensor] = dict(blocks)
        self.concepts: list[str] = list(concepts)
        first = next(iter(self.blocks.values()))
        for name, block in self.blocks.items():
            if (
                block.dim() != 4
                or block.shape != first.shape
                or block.shape[1] != len(self.concepts)
            ):
                raise ValueError(
                    f"block {name!r} has shape {tuple(block.shape)}; every block must be "
                    f"[B, C={len(self.concepts)}, S_h, S_w] with the same shape"
                )
        self.aggregate: torch.Tensor = (
            torch.stack(list(self.blocks.values())).sum(0) if aggregate is None else aggregate
        )
        self.meta: dict[str, Any] = dict(meta or {})

    @classmethod
    def from_block_sums(
        cls,
        block_sums: Mapping[str, torch.Tensor],
        size: tuple[int, int],
        concepts: Sequence[str],
        meta: dict[str, Any] | None = None,
        aggregation: str = "one-stage",
    ) -> AttributionMaps:
        """Resize per-block sums {name: [B, C, h_i, w_i]} bilinearly to `size` and wrap them.

        Each block's map is resized straight to `size` (its BIoU is measured on it); the
        aggregate is their sum ("one-stage") or OVAM's two-stage sum (see aggregate_blocks).
        """
        names = list(block_sums)
        sums = [block_sums[n] for n in names]
        resized = ops.resize_aggregate(sums, tuple(size), per_map=True)
        blocks = dict(zip(names, resized.unbind(dim=1), strict=True))  # each [B, C, S_h, S_w]
        if aggregation == "one-stage":
            aggregate = resized.sum(dim=1)  # the same sum, without resizing twice
        else:
            aggregate = aggregate_blocks(sums, tuple(size), aggregation)
        meta = {**(meta or {}), "aggregation": aggregation}
        return cls(blocks, concepts, aggregate=aggregate, meta=meta)

    # ------------------------------------------------------------------ access

    @property
    def batch_size(self) -> int:
        return self.aggregate.shape[0]

    @property
    def size(self) -> tuple[int, int]:
        """(S_h, S_w) of every map."""
        return tuple(self.aggregate.shape[-2:])

    @property
    def block_names(self) -> list[str]:
        return list(self.blocks)

    def index(self, concept: str | int) -> int:
        """Position of a concept given by word or index."""
        if isinstance(concept, int) and not isinstance(concept, bool):
            if not -len(self.concepts) <= concept < len(self.concepts):
                raise IndexError(
                    f"concept index {concept} out of range for concepts {self.concepts}"
                )
            return concept % len(self.concepts)
        if concept not in self.concepts:
            raise KeyError(f"concept {concept!r} is not one of the traced concepts {self.concepts}")
        return self.concepts.index(concept)

    def concept(self, concept: str | int, block: str | None = None) -> torch.Tensor:
        """[B, S_h, S_w] map of one concept, aggregated (block=None) or of one block."""
        if block is not None and block not in self.blocks:
            raise KeyError(f"block {block!r} is not one of {self.block_names}")
        source = self.aggregate if block is None else self.blocks[block]
        return source[:, self.index(concept)]

    def masks(
        self,
        concept: str | int,
        q: float = DEFAULT_Q,
        *,
        block: str | None = None,
        inclusive: bool = True,
    ) -> torch.Tensor:
        """Hard mask bool [B, S_h, S_w]: map >= its q-quantile.

        inclusive=False gives map > quantile, as the authors' code does.
        """
        maps = self.concept(concept, block)
        return ops.quantile_mask(maps.flatten(1), q, inclusive).view(maps.shape)

    # ------------------------------------------------------------------ metrics

    def iou(
        self,
        a: str | int | Sequence[str | int],
        b: str | int,
        q: float = DEFAULT_Q,
        *,
        inclusive: bool = True,
    ) -> torch.Tensor:
        """IoU [B] of the q-quantile masks of concepts a and b on the aggregated map (Eq. 3-4).

        a may be a list of concepts: their masks' intersection (AND) is compared with b's
        (an intersectional concept such as gender and race)."""
        return self._iou(a, b, q, None, inclusive)

    def biou(
        self,
        a: str | int | Sequence[str | int],
        b: str | int,
        q: float = DEFAULT_Q,
        *,
        inclusive: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Block IoU (Eq. 6): {block name: [B]} for every captured block, plus their "mean".
        a may be a list of concepts, as in `iou`."""
        per_block = {name: self._iou(a, b, q, name, inclusive) for name in self.blocks}
        per_block["mean"] = torch.stack(list(per_block.values())).mean(dim=0)
        return per_block

    def _iou(self, a, b, q, block, inclusive) -> torch.Tensor:
        if isinstance(a, list | tuple):
            if not a:
                raise ValueError("a list of concepts for an intersection must not be empty")
            masks = [self.masks(c, q, block=block, inclusive=inclusive).flatten(1) for c in a]
            mask_a = torch.stack(masks).all(dim=0)
        else:
            mask_a = self.masks(a, q, block=block, inclusive=inclusive).flatten(1)
        mask_b = self.masks(b, q, block=block, inclusive=inclusive).flatten(1)
        return ops.mask_iou(mask_a, mask_b)

    # ------------------------------------------------------------------ transforms

    def resize(self, size: int | tuple[int, int]) -> AttributionMaps:
        """New maps resized bilinearly (align_corners=False) to `size`: S or (S_h, S_w).

        The aggregate is the sum of the resized blocks, except for two-stage maps
        (meta["aggregation"] == "two-stage", OVAM's), whose aggregate is itself resized: that is
        OVAM's second stage when the maps are at the largest block resolution.
        """
        size = (size, size) if isinstance(size, int) else tuple(size)
        names = list(self.blocks)
        resized = ops.resize_aggregate([self.blocks[n] for n in names], size, per_map=True)
        blocks = dict(zip(names, resized.unbind(dim=1), strict=True))
        aggregate = resized.sum(dim=1)
        if self.meta.get("aggregation") == "two-stage":
            aggregate = ops.resize_aggregate([self.aggregate], size)
        return AttributionMaps(blocks, self.concepts, aggregate=aggregate, meta=self.meta)

    def select(self, index: int | slice | Sequence[int]) -> AttributionMaps:
        """Maps of some batch entries (an int keeps a batch dimension of 1)."""
        if isinstance(index, int):
            index = [index]
        blocks = {name: block[index] for name, block in self.blocks.items()}
        return AttributionMaps(
            blocks, self.concepts, aggregate=self.aggregate[index], meta=self.meta
        )

    def cpu(self) -> AttributionMaps:
        blocks = {name: block.cpu() for name, block in self.blocks.items()}
        return AttributionMaps(
            blocks, self.concepts, aggregate=self.aggregate.cpu(), meta=self.meta
        )

    def nbytes(self) -> int:
        """Bytes held by the block maps and the aggregate."""
        tensors = [*self.blocks.values(), self.aggregate]
        return sum(t.numel() * t.element_size() for t in tensors)

    def summary(self, a: str | int, b: str | int, q: float = DEFAULT_Q) -> dict[str, Any]:
        """JSON-ready IoU and BIoU of concepts a, b: {"iou": [B], "biou": {block: [B]}}."""
        return {
            "concepts": [self.concepts[self.index(a)], self.concepts[self.index(b)]],
            "q": q,
            "iou": self.iou(a, b, q).tolist(),
            "biou": {name: values.tolist() for name, values in self.biou(a, b, q).items()},
        }

    # ------------------------------------------------------------------ plots

    def plot(
        self, image, a: str | int, b: str | int, q: float = DEFAULT_Q, *, index: int = 0, path=None
    ):
        """Figure like the paper's Figure 3 for batch entry `index`: the image, each concept's
        heatmap overlay, the two q-masks, their overlap and the IoU. Returns a matplotlib Figure;
        saves it to `path` if given. image: PIL image, array [H, W, 3], tensor [3, H, W] or
        [B, 3, H, W], or a list of images."""
        from .. import viz

        return viz.plot_attribution(self, image, a, b, q, index=index, path=path)

    def plot_biou(
        self,
        a: str | int,
        b: str | int,
        q: float = DEFAULT_Q,
        *,
        index: int | None = None,
        path=None,
    ):
        """Bar chart of the per-block BIoU (paper Figures 4-6), averaged over the batch unless
        `index` picks one image. Returns a matplotlib Figure."""
        from .. import viz

        return viz.plot_biou(self, a, b, q, index=index, path=path)

    def __repr__(self) -> str:
        return (
            f"AttributionMaps(batch={self.batch_size}, concepts={self.concepts}, size={self.size}, "
            f"blocks={self.block_names})"
        )
