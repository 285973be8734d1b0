"""The audit results store's row: one row per generated image.

The audit runner writes these rows (biasmap.audit.store) and the metrics, FID and report
read them; this module is the contract between the two sides.

Parts written before the attribution maps were stored lack the trailing ADDED_FIELDS; readers
accept them (`is_legacy_schema`) and see those columns as null (`upgrade`), so an old run still
reports, and only re-thresholding, which needs the maps, refuses it.
"""

from __future__ import annotations

import pyarrow as pa

# A row's identity: resuming skips keys already in the store, and no key is stored twice.
KEY_COLUMNS = ("profession", "axis", "seed", "method", "lambda_", "config_hash")

SCHEMA = pa.schema(
    [
        # key
        pa.field("profession", pa.string(), nullable=False),
        pa.field("axis", pa.string(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("lambda_", pa.float64(), nullable=False),  # 0 for unguided methods
        pa.field("config_hash", pa.string(), nullable=False),
        # what was generated
        pa.field("model", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("attribution_prompt", pa.string()),
        pa.field("steps", pa.int64()),
        pa.field("guidance_scale", pa.float64()),
        pa.field("q", pa.float64()),
        # attribution metrics of the image, from its own run's maps
        pa.field("iou", pa.float64()),
        pa.field("biou_blocks", pa.list_(pa.string())),  # block names, in the UNet's order
        pa.field("biou_values", pa.list_(pa.float64())),  # BIoU of each block, same order
        pa.field("biou_mean", pa.float64()),
        # the SoftIoU energy trajectory over the steps (NaN where no energy was computed)
        pa.field("softiou_first", pa.float64()),
        pa.field("softiou_last", pa.float64()),
        pa.field("softiou_mean", pa.float64()),
        # zero-shot CLIP classification along the row's axis
        pa.field("clip_classes", pa.list_(pa.string())),  # the axis's class names, config order
        pa.field("clip_probs", pa.list_(pa.float64())),  # softmax over those classes
        pa.field("clip_label", pa.string()),  # argmax class
        # provenance
        pa.field("image_path", pa.string()),  # PNG path relative to the run folder
        pa.field("seconds", pa.float64()),  # wall time of the image's batch / batch size
        pa.field("batch_size", pa.int64()),
        pa.field("worker", pa.string()),
        pa.field("versions", pa.string()),  # JSON: biasmap, torch, diffusers, transformers
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
        # the image's attribution maps, so that IoU and BIoU can be recomputed at another
        # quantile without regenerating (biasmap.audit.stored_maps): float16 bytes of an array
        # [1 + len(biou_blocks), len(maps_concepts), S_h, S_w], C order, little-endian, the
        # aggregate first and then the blocks in biou_blocks' order. iou and biou_values were
        # computed from exactly these float16 values.
        pa.field("maps_concepts", pa.list_(pa.string())),  # demographic word(s), profession last
        pa.field("maps_shape", pa.list_(pa.int64())),  # [1 + blocks, concepts, S_h, S_w]
        pa.field("maps", pa.binary()),
        pa.field("masks_inclusive", pa.bool_()),  # masks are map >= quantile (False: >)
        # IoU of each demographic concept's own mask with the profession's, on the aggregate,
        # in maps_concepts' order. `iou` is the profession against the intersection (AND) of
        # the demographic masks: with one concept, the same number as concept_ious[0].
        pa.field("concept_ious", pa.list_(pa.float64())),
    ]
)

# Columns added after the first released schema, in order; a part may lack a trailing run of them.
ADDED_FIELDS = ("maps_concepts", "maps_shape", "maps", "masks_inclusive", "concept_ious")
# The bulky column, left out of reads that only need keys and metrics.
MAPS_COLUMN = "maps"


def is_legacy_schema(schema: pa.Schema) -> bool:
    """Whether `schema` is SCHEMA without some trailing added fields (a part written by an
    older biasmap), so that `upgrade` can complete it."""
    names = schema.names
    base = len(SCHEMA) - len(ADDED_FIELDS)
    return base <= len(names) < len(SCHEMA) and schema.equals(
        pa.schema(list(SCHEMA)[: len(names)]), check_metadata=False
    )


def upgrade(table: pa.Table) -> pa.Table:
    """`table` with SCHEMA's missing columns inserted at their places as nulls (a legacy part,
    or a read that left the maps out); a table already in SCHEMA is returned as it is."""
    for index, field in enumerate(SCHEMA):
        if field.name not in table.column_names:
            table = table.add_column(index, field, pa.nulls(table.num_rows, field.type))
    return table
