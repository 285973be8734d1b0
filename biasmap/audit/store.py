"""The audit results store: a folder of immutable Parquet part files, one row per image.

    store = ResultsStore("runs/demo")
    store.write(rows)          # one new part file, appearing atomically
    store.keys()               # keys present (resume skips them)
    store.read_table()         # every row once, sorted by key (pyarrow.Table, biasmap.audit.SCHEMA)
    store.check(repair=True)   # find unreadable or invalid parts, move them to parts/corrupt/;
                               # .present: the keys of the valid ones

Layout: <root>/parts/part-<uuid>.parquet. A part is written under a temporary name in the same
folder (.tmp-part-<uuid>.parquet.partial, which neither readers nor a `parts/*.parquet` glob
match), flushed to disk with fsync and then renamed, so a reader sees either the whole part or
none of it, and a killed writer leaves only a temporary file behind. Parts are never modified
afterwards; `drop_keys` replaces a part by a copy without some keys, moving the original to
parts/replaced/.

A part that pyarrow cannot read (truncated, garbage bytes), whose schema differs from SCHEMA, or
whose rows break the row rules is reported with a warning naming the file and skipped, so its keys
count as missing and are recomputed; `check(repair=True)` (which the runner calls before it starts)
moves such files to parts/corrupt/, never deleting anything.

Each row carries its image's attribution maps (the `maps` column, float16, a few KB to about
110 KB per image), inside the part itself: they are committed by the same rename as the row, so
no crash can leave a row without its maps or maps without their row, and `drop_keys` and the
corrupt-part handling carry them along. Reads that need only keys and metrics (`keys`, `check`,
`scan()`) skip that column (Parquet is columnar) and see it as null. Parts written before the
maps were stored are read as rows without maps.

Two parts may hold the same key (two runners on one folder raced for it). Reads keep exactly one
row per key: the earliest `created_at`, ties broken by part file name, then by row order.
"""

from __future__ import annotations

import math
import os
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .schema import KEY_COLUMNS, MAPS_COLUMN, SCHEMA, is_legacy_schema, upgrade

PARTS = "parts"
CORRUPT = "corrupt"
REPLACED = "replaced"
PART_PREFIX = "part-"
TEMP_PREFIX = ".tmp-"
# Ends temporary names, so that no glob for finished files (*.parquet, *.png) matches them.
TEMP_SUFFIX = ".partial"

Key = tuple  # (profession, axis, seed, method, lambda_, config_hash), in KEY_COLUMNS order


class CorruptPartWarning(UserWarning):
    """A part file could not be used; its rows are treated as missing."""


class InvalidRowsError(ValueError):
    """Rows that do not fit the store's schema and row rules."""


@dataclass(frozen=True)
class PartProblem:
    """A part file that cannot be used, and why."""

    path: Path
    reason: str


@dataclass
class StoreCheck:
    """What `ResultsStore.check` found.

    parts: readable, valid part files; rows: their rows (duplicates included); present: their
    distinct keys (keys: how many); image_paths: each present key's stored image path;
    duplicate_rows: rows hidden by deduplication; corrupt: unusable parts (and where they were
    moved when repairing); temporary: leftover temporary files of killed writers.
    """

    parts: int = 0
    rows: int = 0
    present: frozenset[Key] = frozenset()
    image_paths: dict[Key, str | None] = field(default_factory=dict)
    duplicate_rows: int = 0
    corrupt: list[PartProblem] = field(default_factory=list)
    moved: list[Path] = field(default_factory=list)
    temporary: list[Path] = field(default_factory=list)

    @property
    def keys(self) -> int:
        return len(self.present)

    @property
    def ok(self) -> bool:
        return not self.corrupt

    def summary(self) -> str:
        """Counts and the corrupt parts, one per line. Leftover temporary files are not in it:
        the runner removes them and reports how many, once."""
        text = (
            f"{self.parts} part file(s), {self.rows} row(s), {self.keys} distinct key(s), "
            f"{self.duplicate_rows} duplicate row(s) hidden"
        )
        for problem in self.corrupt:
            text += f"\ncorrupt part {problem.path}: {problem.reason}"
        for path in self.moved:
            text += f"\n  moved to {path}"
        return text


def validate_rows(table: pa.Table) -> None:
    """Raise InvalidRowsError unless `table` has SCHEMA (field names, order and types) and every
    row obeys the row rules: keys present, lambda_ finite and >= 0, seed >= 0, list columns of
    matching lengths (biou_blocks/values, clip_classes/probs)."""
    if not table.schema.equals(SCHEMA, check_metadata=False):
        expected = {f.name: str(f.type) for f in SCHEMA}
        found = {f.name: str(f.type) for f in table.schema}
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        changed = sorted(
            name for name in set(expected) & set(found) if expected[name] != found[name]
        )
        raise InvalidRowsError(
            f"schema differs from biasmap.audit.schema.SCHEMA: missing {missing}, unexpected "
            f"{extra}, different types {changed}"
            + ("" if missing or extra or changed else " (field order or nullability)")
        )
    for name in KEY_COLUMNS:
        nulls = table.column(name).null_count
        if nulls:
            raise InvalidRowsError(f"key column {name!r} has {nulls} null value(s)")
    for lam in table.column("lambda_").to_pylist():
        if not (math.isfinite(lam) and lam >= 0):
            raise InvalidRowsError(f"lambda_ must be finite and >= 0, found {lam}")
    if any(seed < 0 for seed in table.column("seed").to_pylist()):
        raise InvalidRowsError("seed must be >= 0")
    for names, values in (("biou_blocks", "biou_values"), ("clip_classes", "clip_probs")):
        for first, second in zip(
            table.column(names).to_pylist(), table.column(values).to_pylist(), strict=True
        ):
            if (first is None) != (second is None) or (first and len(first) != len(second)):
                raise InvalidRowsError(f"{names} and {values} differ in length in a row")
    _validate_maps(table)


def _validate_maps(table: pa.Table) -> None:
    """Stored maps agree with their shape, concepts and blocks, and concept_ious has one IoU
    per demographic concept (rows without maps pass)."""
    for concepts, pairwise in zip(
        table.column("maps_concepts").to_pylist(),
        table.column("concept_ious").to_pylist(),
        strict=True,
    ):
        if concepts is not None and pairwise is not None and len(pairwise) != len(concepts) - 1:
            raise InvalidRowsError(
                f"concept_ious has {len(pairwise)} value(s) for the {len(concepts) - 1} "
                f"demographic concept(s) of {concepts}"
            )
    if table.column(MAPS_COLUMN).null_count == table.num_rows:
        return
    columns = ("maps", "maps_shape", "maps_concepts", "biou_blocks")
    for data, shape, concepts, blocks in zip(
        *(table.column(name).to_pylist() for name in columns), strict=True
    ):
        if data is None:
            continue
        if shape is None or concepts is None or len(shape) != 4:
            raise InvalidRowsError("a row has maps without maps_shape [M, C, S_h, S_w] or concepts")
        if shape[0] != 1 + len(blocks or []) or shape[1] != len(concepts):
            raise InvalidRowsError(
                f"maps_shape {shape} does not match 1 + {len(blocks or [])} blocks and "
                f"{len(concepts)} concepts"
            )
        if len(data) != 2 * math.prod(shape):
            raise InvalidRowsError(
                f"maps hold {len(data)} bytes, float16 {shape} needs {2 * math.prod(shape)}"
            )


def table_from_rows(rows: Sequence[dict]) -> pa.Table:
    """Rows (dicts keyed by SCHEMA's field names) as a validated table; raises InvalidRowsError
    naming a missing or unknown field."""
    names = set(SCHEMA.names)
    for row in rows:
        unknown = sorted(set(row) - names)
        missing = sorted(names - set(row))
        if unknown or missing:
            raise InvalidRowsError(
                f"row fields differ from SCHEMA: missing {missing}, unknown {unknown}"
            )
    try:
        table = pa.Table.from_pylist(list(rows), schema=SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise InvalidRowsError(f"rows do not fit SCHEMA: {error}") from None
    validate_rows(table)
    return table


def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ResultsStore:
    """A results store rooted at a run folder (parts live in <root>/parts)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.parts_dir = self.root / PARTS
        self.corrupt_dir = self.parts_dir / CORRUPT

    # ------------------------------------------------------------------------- writing

    def write(self, rows: Sequence[dict]) -> Path | None:
        """Write rows as one new part file and return its path (None for no rows).

        The rows are validated first (InvalidRowsError). A key repeated within `rows` is an
        error: the caller is expected to hand each key to the store once.
        """
        if not rows:
            return None
        table = table_from_rows(rows)
        keys = _key_list(table)
        if len(set(keys)) != len(keys):
            raise InvalidRowsError("the rows repeat a key; each key is written once")
        return self._commit(table)

    def _commit(self, table: pa.Table) -> Path:
        """Write a validated table as a new part: temporary name, fsync, rename."""
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        name = f"{PART_PREFIX}{uuid.uuid4().hex}.parquet"
        temporary = self.parts_dir / f"{TEMP_PREFIX}{name}{TEMP_SUFFIX}"
        final = self.parts_dir / name
        pq.write_table(table, temporary)
        _fsync_path(temporary)  # the bytes are on disk before the name says the part exists
        os.replace(temporary, final)
        _fsync_path(self.parts_dir, directory=True)  # and so is the rename
        return final

    def drop_keys(self, keys: set[Key]) -> int:
        """Remove `keys` from the store so that they count as missing; returns the rows removed.

        Each part holding one of them is replaced: a new part with its other rows is committed
        first, then the original moves to parts/replaced/ (never deleted), so a reader in
        between sees the kept rows twice (deduplicated), never a key lost. Only the run's lock
        holder may call this (biasmap.audit.lock).
        """
        removed = 0
        parts, _ = self.scan(with_maps=True)  # the kept rows keep their maps
        for path, table in parts:
            part_keys = _key_list(table)
            drop = [key in keys for key in part_keys]
            if not any(drop):
                continue
            kept = table.filter(pa.array([not flag for flag in drop]))
            if kept.num_rows:
                self._commit(kept)
            self._move_to(path, self.parts_dir / REPLACED)
            removed += table.num_rows - kept.num_rows
        return removed

    # ------------------------------------------------------------------------- reading

    def part_files(self) -> list[Path]:
        """Committed part files, sorted by name (temporary and corrupt/ files excluded)."""
        if not self.parts_dir.is_dir():
            return []
        return sorted(self.parts_dir.glob(f"{PART_PREFIX}*.parquet"))

    def _read_part(self, path: Path, with_maps: bool) -> pa.Table:
        try:
            part = pq.ParquetFile(path)
            schema = part.schema_arrow
            columns = None
            if not with_maps:
                columns = [name for name in schema.names if name != MAPS_COLUMN]
            table = part.read(columns=columns)
        except (OSError, pa.ArrowException) as error:
            raise InvalidRowsError(
                f"unreadable Parquet ({type(error).__name__}: {error})"
            ) from None
        if is_legacy_schema(schema) or schema.equals(SCHEMA, check_metadata=False):
            # A part of an older biasmap (no maps), or a read that left the maps out: the
            # missing columns read as null. A foreign schema is left as it is, and fails below.
            table = upgrade(table)
        validate_rows(table)
        return table

    def scan(
        self, with_maps: bool = False
    ) -> tuple[list[tuple[Path, pa.Table]], list[PartProblem]]:
        """Every committed part as (path, table) when it is readable and valid, and the
        problems of those that are not (no warning, nothing moved). with_maps=False leaves
        the bulky maps column unread (null in the tables)."""
        good, problems = [], []
        for path in self.part_files():
            try:
                good.append((path, self._read_part(path, with_maps)))
            except FileNotFoundError:  # moved aside by a concurrent check meanwhile
                continue
            except InvalidRowsError as error:
                problems.append(PartProblem(path, str(error)))
        return good, problems

    def _warn(self, problems: Sequence[PartProblem], moved: dict[Path, Path]) -> None:
        for problem in problems:
            where = f"; moved to {moved[problem.path]}" if problem.path in moved else ""
            warnings.warn(
                f"corrupt results part {problem.path}: {problem.reason}. Its rows are treated "
                f"as missing and will be recomputed{where}",
                CorruptPartWarning,
                stacklevel=3,
            )

    def _deduplicated(self, parts: list[tuple[Path, pa.Table]]) -> tuple[pa.Table, int]:
        if not parts:
            return SCHEMA.empty_table(), 0
        table = pa.concat_tables([t for _, t in parts])
        # Order of precedence between copies of a key: earliest created_at, then part file
        # name, then row order within the part; the first of each key is kept.
        order = []
        for part_index, (path, part) in enumerate(parts):
            created = part.column("created_at").to_pylist()
            for row, stamp in enumerate(created):
                order.append((stamp is None, stamp or 0, path.name, part_index, row))
        offsets, total = [], 0
        for _, part in parts:
            offsets.append(total)
            total += part.num_rows
        keys = _key_list(table)
        ranked = sorted(range(total), key=lambda i: order[i])
        keep, seen = [], set()
        for index in ranked:
            if keys[index] not in seen:
                seen.add(keys[index])
                keep.append(index)
        unique = table.take(pa.array(sorted(keep), type=pa.int64()))
        unique = unique.sort_by([(name, "ascending") for name in KEY_COLUMNS])
        return unique, total - len(keep)

    def read_table(self, with_maps: bool = True) -> pa.Table:
        """All rows, one per key, sorted by key; corrupt parts are skipped with a warning.
        with_maps=False leaves the maps column null (a faster read)."""
        parts, problems = self.scan(with_maps)
        self._warn(problems, {})
        return self._deduplicated(parts)[0]

    def keys(self) -> set[Key]:
        """The keys present (tuples in KEY_COLUMNS order); corrupt parts are skipped with a
        warning, so their keys count as missing."""
        parts, problems = self.scan()
        self._warn(problems, {})
        keys: set[Key] = set()
        for _, table in parts:
            keys.update(_key_list(table))
        return keys

    def check(self, repair: bool = False) -> StoreCheck:
        """Read every part and report; with repair=True move unusable parts to parts/corrupt/.

        Each corrupt part is also reported with a CorruptPartWarning naming the file.
        """
        parts, problems = self.scan()
        moved: dict[Path, Path] = {}
        if repair:
            for problem in problems:
                target = self._move_aside(problem.path)
                if target is not None:
                    moved[problem.path] = target
        self._warn(problems, moved)
        table, duplicates = self._deduplicated(parts)
        temporary = (
            sorted(self.parts_dir.glob(f"{TEMP_PREFIX}*")) if self.parts_dir.is_dir() else []
        )
        keys = _key_list(table)
        return StoreCheck(
            parts=len(parts),
            rows=sum(t.num_rows for _, t in parts),
            present=frozenset(keys),
            image_paths=dict(zip(keys, table.column("image_path").to_pylist(), strict=True)),
            duplicate_rows=duplicates,
            corrupt=problems,
            moved=list(moved.values()),
            temporary=temporary,
        )

    def _move_aside(self, path: Path) -> Path | None:
        return self._move_to(path, self.corrupt_dir)

    @staticmethod
    def _move_to(path: Path, folder: Path) -> Path | None:
        """Move `path` into `folder` under a free name; None when it is already gone."""
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / path.name
        suffix = 1
        while target.exists():
            target = folder / f"{path.stem}.{suffix}{path.suffix}"
            suffix += 1
        try:
            os.replace(path, target)
        except FileNotFoundError:  # another process moved it first
            return None
        return target


def _key_list(table: pa.Table) -> list[Key]:
    columns = [table.column(name).to_pylist() for name in KEY_COLUMNS]
    return list(zip(*columns, strict=True))
