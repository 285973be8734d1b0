"""Each audited image's attribution maps, as the results store keeps them, and the IoU / BIoU
measured from them.

The audit stores every image's maps (the aggregate and each block, at the final map size) as
float16 in its row, and measures the row's IoU and BIoU from exactly those float16 values with
`threshold_metrics`. `biasmap report RUN_DIR --q Q` runs the same function on the same values,
so for an image whose generation does not depend on q (unguided methods) it gives bit for bit
what a fresh audit at q = Q would store.

Bytes per image: 2 * (1 + blocks) * concepts * S_h * S_w. SD1.5 at 512 px, default blocks (six,
mid excluded), 64 x 64 maps, one demographic concept and the profession: 2 * 7 * 2 * 4096 =
114,688 bytes; the planted model (four blocks, 16 x 16): 2 * 5 * 2 * 256 = 5,120; the tiny
random model (six blocks, 16 x 16): 7,168.

Concepts: the demographic concept words first (one, or several for an intersectional axis),
the profession last. The row's IoU is the profession's mask against the intersection (AND) of
the demographic masks, which is the ordinary concept-profession IoU when there is one concept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .. import ops

STORED_DTYPE = torch.float16
# Largest value kept as it is; larger maps are scaled by a power of two (exact in binary
# floating point, and masks are invariant to scale) so that float16 does not overflow (65504).
FLOAT16_SAFE_MAX = 2.0**15


def pack(aggregate: torch.Tensor, blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """The stored form of a batch's maps: float16 [B, 1 + N, C, S_h, S_w] on the CPU.

    aggregate: [B, C, S_h, S_w]; blocks: N tensors [B, C, S_h, S_w] in UNet order. An image
    whose maps exceed FLOAT16_SAFE_MAX is scaled by a power of two first (no metric depends on
    the maps' scale; the rounding to float16 is then the same relative rounding).
    """
    stacked = torch.stack([aggregate, *blocks], dim=1).detach().float().cpu()
    peak = stacked.abs().flatten(1).amax(dim=1)  # [B]
    exponent = torch.ceil(torch.log2(peak.clamp_min(1.0) / FLOAT16_SAFE_MAX)).clamp_min(0)
    scaled = stacked * torch.pow(2.0, -exponent).view(-1, 1, 1, 1, 1)
    return scaled.to(STORED_DTYPE)


def encode(maps: torch.Tensor) -> bytes:
    """One image's packed maps [1 + N, C, S_h, S_w] (float16) as little-endian bytes."""
    if maps.dtype != STORED_DTYPE:
        raise ValueError(f"stored maps are float16, got {maps.dtype}")
    return maps.contiguous().numpy().astype("<f2", copy=False).tobytes()


def decode(data: bytes, shape: Sequence[int]) -> torch.Tensor:
    """The float16 tensor [1 + N, C, S_h, S_w] that `encode` wrote."""
    array = np.frombuffer(data, dtype="<f2").astype(np.float16, copy=False)
    return torch.from_numpy(array.reshape(tuple(shape)).copy())


def nbytes(shape: Sequence[int]) -> int:
    """Bytes of one image's stored maps of shape [1 + N, C, S_h, S_w]."""
    return 2 * int(np.prod(shape))


@dataclass(frozen=True)
class ThresholdMetrics:
    """IoU metrics of a batch of stored maps at one quantile.

    iou: float32 [B], the profession's mask against the AND of the demographic masks, on the
    aggregate; biou: float32 [B, N], the same per block; biou_mean: float32 [B], its mean over
    blocks; concept_iou: float32 [B, C - 1], each demographic concept's own mask against the
    profession's, on the aggregate.
    """

    iou: torch.Tensor
    biou: torch.Tensor
    biou_mean: torch.Tensor
    concept_iou: torch.Tensor


def threshold_metrics(maps: torch.Tensor, q: float, inclusive: bool = True) -> ThresholdMetrics:
    """IoU, BIoU and per-concept IoU of stored maps [B, 1 + N, C, S_h, S_w] at quantile q.

    Every map gets its hard mask `map >= quantile_q(map)` (`>` when inclusive is False, the
    authors' comparison) with biasmap.ops.quantile_mask on the float16 values widened to
    float32; concepts 0 .. C-2 are demographic, C-1 the profession. The audit and the report
    both call this, so their numbers agree exactly. Rows are independent: the result of an
    image does not depend on the others in the batch.
    """
    if maps.dim() != 5 or maps.shape[1] < 2 or maps.shape[2] < 2:
        raise ValueError(
            f"stored maps must be [B, 1 + blocks, concepts >= 2, S_h, S_w], got {tuple(maps.shape)}"
        )
    batch, views, concepts, height, width = maps.shape
    flat = maps.float().reshape(batch * views * concepts, height * width)
    masks = ops.quantile_mask(flat, q, inclusive).view(batch, views, concepts, -1)
    demographic = masks[:, :, :-1].all(dim=2)  # [B, 1 + N, n]: the intersection
    profession = masks[:, :, -1]
    iou = ops.mask_iou(demographic.flatten(0, 1), profession.flatten(0, 1)).view(batch, views)
    pairs = masks[:, 0, :-1]  # [B, C - 1, n]
    concept_iou = ops.mask_iou(
        pairs.flatten(0, 1), profession[:, :1].expand_as(pairs).flatten(0, 1)
    ).view(batch, concepts - 1)
    biou = iou[:, 1:]
    return ThresholdMetrics(iou[:, 0], biou, biou.mean(dim=1), concept_iou)


# --------------------------------------------------------------------------- store tables


class MissingMapsError(ValueError):
    """Rows whose attribution maps were not stored, so they cannot be re-thresholded."""


# The paper's threshold analysis: mIoU against q.
THRESHOLD_GRID = tuple(round(0.1 * step, 1) for step in range(1, 10))


class StoredMaps:
    """The decoded maps of a store table's rows, for measuring them at any quantile.

    table: rows with the store's SCHEMA (biasmap.audit.schema), maps included. Rows are
    decoded once and grouped by map shape and mask comparison, so each quantile is one
    batched call of `threshold_metrics` per group.
    Raises MissingMapsError (naming how many rows lack maps) unless every row has them.
    """

    def __init__(self, table):
        self.num_rows = table.num_rows
        missing = table.column("maps").null_count
        if missing or not self.num_rows:
            raise MissingMapsError(
                f"{missing} of {self.num_rows} images have no stored attribution maps (the run "
                "was made before biasmap stored them, or with store_maps: false)"
            )
        columns = ("maps", "maps_shape", "masks_inclusive", "biou_blocks")
        groups: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
        for index, (data, shape, inclusive, blocks) in enumerate(
            zip(*(table.column(name).to_pylist() for name in columns), strict=True)
        ):
            key = (tuple(shape), inclusive is not False, tuple(blocks))
            groups.setdefault(key, []).append((index, decode(data, shape)))
        self._groups = [
            (np.array([i for i, _ in items]), torch.stack([m for _, m in items]), inclusive)
            for (_, inclusive, _), items in groups.items()
        ]

    def metrics(self, q: float) -> dict[str, list]:
        """Per row, in table order, at quantile q: {"iou": float, "biou_values": [float] per
        block, "biou_mean": float, "concept_ious": [float] per demographic concept}."""
        result: dict[str, list] = {
            name: [None] * self.num_rows
            for name in ("iou", "biou_values", "biou_mean", "concept_ious")
        }
        for rows, maps, inclusive in self._groups:
            measured = threshold_metrics(maps, q, inclusive)
            values = {
                "iou": measured.iou.tolist(),
                "biou_values": measured.biou.tolist(),
                "biou_mean": measured.biou_mean.tolist(),
                "concept_ious": measured.concept_iou.tolist(),
            }
            for name, column in values.items():
                for row, value in zip(rows.tolist(), column, strict=True):
                    result[name][row] = value
        return result


def rethresholded(table, q: float, stored: StoredMaps | None = None):
    """`table` (store rows with maps) with iou, biou_values, biou_mean and concept_ious
    measured at q from the stored maps; every other column as it was. Raises MissingMapsError."""
    import pyarrow as pa

    stored = stored or StoredMaps(table)
    measured = stored.metrics(q)
    for name in ("iou", "biou_values", "biou_mean", "concept_ious"):
        position = table.schema.get_field_index(name)
        field = table.schema.field(name)
        table = table.set_column(position, field, pa.array(measured[name], type=field.type))
    return table
