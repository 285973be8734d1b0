"""The audit runner: a config's grid becomes batches of images, results go to the store.

    summary = run_audit(load_config("configs/demo.yaml"))

1. The grid (professions x axes x methods x lambdas x seeds) becomes work items, one per image;
   each item's key is (profession, axis, seed, method, lambda_, config_hash). Unguided methods
   run once, with lambda_ 0, whatever the lambda list.
2. Items are cut into batches the same way on every run: consecutive seeds of one (profession,
   axis, method, lambda) whose generation settings are identical (Fair Diffusion alternates its
   edit order with the seed's parity, so its even and odd seeds go to different batches), at
   most batch_size each. A batch is committed as one part file, so after a kill a batch is
   either wholly in the store or wholly missing, and the resumed run regenerates exactly the
   batches it lost, with the same batch composition (bit-identical images and metrics on the
   same hardware).
3. Batches whose keys are all in the store are skipped; an executor (biasmap.audit.executors:
   local or ray) runs the rest through `BatchGenerator`s (one pipeline each), and the driver's
   `ResultSink` saves the PNGs (temporary name, then rename) and then the batch's part file.
   Only the driver writes, and it hands each key to the store once, so a retried or killed
   worker can never duplicate a row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import string
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import torch

from . import stored_maps
from .config import HASHED_FIELDS, AuditConfig
from .lock import RunLock
from .schema import KEY_COLUMNS
from .store import PARTS, TEMP_PREFIX, TEMP_SUFFIX, ResultsStore, StoreCheck

IMAGES = "images"
RUN_FILE = "run.json"


class Classifier(Protocol):
    """Zero-shot image classification: [B, C] class probabilities (rows sum to 1)."""

    def classify(self, images: list, class_prompts: list[str]) -> torch.Tensor: ...


# Builds one classifier per worker, on that worker's device (None: no CLIP columns). It must be
# picklable (a module-level function or class) for the ray executor.
ClassifierFactory = Callable[[AuditConfig, str], Classifier | None]


class RunFolderMismatchError(ValueError):
    """The output folder holds results of a different experiment (another config hash)."""


@dataclass(frozen=True, order=True)
class WorkItem:
    """One image to generate: the key's fields other than config_hash."""

    profession: str
    axis: str
    method: str
    lambda_: float
    seed: int

    def key(self, config_hash: str) -> tuple:
        """The store key, in KEY_COLUMNS order."""
        values = {**dataclasses.asdict(self), "config_hash": config_hash}
        return tuple(values[name] for name in KEY_COLUMNS)


@dataclass
class ImageResult:
    """A generated image's store row and its PNG bytes (written by the driver)."""

    row: dict[str, Any]
    png: bytes


def method_plan(config: AuditConfig, item: WorkItem):
    """The MethodPlan of an item with the config's prompt templates and concept word applied.

    biasmap.mitigation.methods.plan gives the method's structure (guidance, blocks, negative
    prompt, Fair Diffusion edits for the seed); the prompts and the demographic concept come
    from the config. An intersectional axis traces all its words in one attribution prompt
    ("... and gender and race"): concepts (gender, race, profession).
    """
    from ..mitigation.methods import plan

    base = plan(item.method, item.profession, item.axis, item.seed)
    templates = config.prompts
    hard = base.method.partition("+")[0] == "hard"
    prompt = (templates.hard if hard else templates.generation).format(profession=item.profession)
    words = config.axes[item.axis].concepts  # several for an intersectional axis
    return dataclasses.replace(
        base,
        prompt=prompt,
        attribution_prompt=templates.attribution.format(prompt=prompt, concept=" and ".join(words)),
        concepts=(*words, item.profession),
    )


def is_guided(method: str) -> bool:
    """Whether a method adds BiasMap's energy guidance (so its lambda matters)."""
    from ..mitigation.methods import plan

    return plan(method, "person", "gender", 0).guided


def work_batches(config: AuditConfig) -> list[list[WorkItem]]:
    """Every batch of the config's grid, in a fixed order (see the module docstring)."""
    batches: list[list[WorkItem]] = []
    for profession in config.professions:
        for axis in config.axes:
            for method in config.methods:
                lambdas = config.lambdas if is_guided(method) else [0.0]
                for lambda_ in lambdas:
                    groups: dict[Any, list[WorkItem]] = {}
                    for seed in config.seeds:
                        item = WorkItem(profession, axis, method, float(lambda_), seed)
                        settings = dataclasses.replace(method_plan(config, item), method="")
                        groups.setdefault(settings, []).append(item)
                    for items in groups.values():
                        for start in range(0, len(items), config.batch_size):
                            batches.append(items[start : start + config.batch_size])
    return batches


def pending_batches(config: AuditConfig, done: set[tuple]) -> tuple[list[list[WorkItem]], int, int]:
    """(batches still to run, their image count, images already done) given the store's keys.

    A batch partly in the store (e.g. batch_size changed between runs) runs its missing items.
    """
    config_hash = config.config_hash
    pending, todo, skipped = [], 0, 0
    for batch in work_batches(config):
        missing = [item for item in batch if item.key(config_hash) not in done]
        skipped += len(batch) - len(missing)
        if missing:
            pending.append(missing)
            todo += len(missing)
    return pending, todo, skipped


# Characters a path component keeps as they are; every other one is escaped, so that a grid
# value cannot leave the run folder (separators, "..") and two values never share a file.
_PLAIN = frozenset(string.ascii_letters + string.digits + "-_+@.")
_ESCAPE = "~"
# Longer components are cut and given a digest of the whole (file systems allow 255 bytes).
_MAX_COMPONENT = 120


def path_component(value: str) -> str:
    """`value` as one safe, readable file name, one-to-one with `value`.

    Ordinary names (letters, digits, "-_+@.") stay as they are; any other character, "~" and a
    leading "." become "~" and the hex of their UTF-8 bytes ("a/b" -> "a~2fb", ".." -> "~2e.").
    Since "~" only ever starts an escape, distinct values give distinct names; very long
    results end in a SHA-256 digest of the value instead.
    """
    escaped = "".join(
        char if char in _PLAIN and not (index == 0 and char == ".") else _escape(char)
        for index, char in enumerate(value)
    )
    if not escaped:
        return _ESCAPE  # the empty string ("~" alone is no escape of anything else)
    if len(escaped) > _MAX_COMPONENT:
        digest = hashlib.sha256(value.encode()).hexdigest()[:16]
        escaped = f"{escaped[: _MAX_COMPONENT - 18]}{_ESCAPE}{_ESCAPE}{digest}"
    return escaped


def _escape(char: str) -> str:
    return "".join(f"{_ESCAPE}{byte:02x}" for byte in char.encode())


def lambda_text(value: float) -> str:
    """A lambda as text: "100" or "0.5" where 6 digits give it back exactly, else the shortest
    repr that does (1e-07 vs 1.00000001e-07), so two lambdas never share a folder."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def image_path(item: WorkItem) -> str:
    """The PNG's path relative to the run folder, inside images/ whatever the item's strings
    hold. Readers use the path stored in each row (older runs named lambdas with :g)."""
    parts = (item.profession, item.axis, item.method, f"lambda-{lambda_text(item.lambda_)}")
    folder = "/".join([IMAGES, *(path_component(part) for part in parts)])
    return f"{folder}/seed-{item.seed}.png"


def _versions_json() -> str:
    import diffusers
    import transformers

    import biasmap

    return json.dumps(
        {
            "biasmap": biasmap.__version__,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
        },
        sort_keys=True,
    )


def default_classifier(config: AuditConfig, device: str) -> Classifier | None:
    """biasmap.audit.clip.ClipClassifier for config.clip_model (None when clip_model is None)."""
    if config.clip_model is None:
        return None
    from .clip import ClipClassifier

    return ClipClassifier(config.clip_model, device, config.dtype)


class BatchGenerator:
    """One pipeline (and classifier) that turns batches of work items into store rows.

    Each executor worker owns one. threads: torch intra-op threads for this process (None
    leaves torch's default).
    """

    def __init__(
        self,
        config: AuditConfig | dict,
        classifier_factory: ClassifierFactory | None = default_classifier,
        worker: str = "local",
        threads: int | None = None,
    ):
        from ..models import load_pipeline

        if threads is not None:
            torch.set_num_threads(threads)
        self.config = config if isinstance(config, AuditConfig) else AuditConfig(**config)
        self.device = self.config.resolved_device()
        self.worker = worker
        self.pipe = load_pipeline(self.config.model, self.config.dtype, self.device)
        self.classifier = (
            classifier_factory(self.config, self.device) if classifier_factory else None
        )
        self.versions = _versions_json()

    def ready(self) -> str:
        """This worker's name, once its pipeline is loaded (lets Ray callers wait for it)."""
        return self.worker

    def run(self, batch: Sequence[WorkItem]) -> list[ImageResult]:
        """Generate one batch (items share their generation settings); rows + PNG bytes."""
        from ..mitigation import guided_generate

        config = self.config
        started = time.perf_counter()
        settings = method_plan(config, batch[0])
        output = guided_generate(
            self.pipe,
            settings.prompt,
            settings.attribution_prompt,
            settings.concepts,
            lambda_=batch[0].lambda_ if settings.guided else 0.0,
            q=config.q,
            blocks=settings.blocks,
            guidance_scale=config.guidance,
            num_inference_steps=config.steps,
            generator=[torch.Generator(device="cpu").manual_seed(item.seed) for item in batch],
            negative_prompt=settings.negative_prompt,
            editing_prompt=settings.editing_prompt,
            preset=config.preset,
            map_size=config.map_size,
            num_images_per_prompt=len(batch),
            height=config.image_size,
            width=config.image_size,
            compile=config.compile,
        )
        # The metrics are measured on the float16 maps the row stores, so that re-thresholding
        # them later (biasmap report --q) reproduces a fresh run exactly.
        attribution = output.maps
        blocks = attribution.block_names
        packed = stored_maps.pack(attribution.aggregate, [attribution.blocks[b] for b in blocks])
        inclusive = bool(output.settings.inclusive_masks)
        measured = stored_maps.threshold_metrics(packed, config.q, inclusive)
        iou = measured.iou.tolist()
        biou_values = measured.biou.tolist()
        biou_mean = measured.biou_mean.tolist()
        concept_ious = measured.concept_iou.tolist()
        energies = output.energies.double()  # [steps, B]
        axis = config.axes[batch[0].axis]
        classes = axis.class_names()  # the product of the classes on an intersectional axis
        probs = None
        if self.classifier is not None:
            probs = self.classifier.classify(list(output.images), axis.prompts_for_clip())
            probs = probs.detach().double().cpu()
            if tuple(probs.shape) != (len(batch), len(classes)):
                raise ValueError(
                    f"the classifier returned probabilities of shape {tuple(probs.shape)}, "
                    f"expected [{len(batch)}, {len(classes)}] (images x classes)"
                )
        seconds = (time.perf_counter() - started) / len(batch)
        created = datetime.now(timezone.utc)
        config_hash = config.config_hash
        results = []
        for index, item in enumerate(batch):
            buffer = io.BytesIO()
            output.images[index].save(buffer, format="PNG")
            trajectory = energies[:, index]
            row = {
                **dict(zip(KEY_COLUMNS, item.key(config_hash), strict=True)),
                "model": config.model,
                "prompt": settings.prompt,
                "attribution_prompt": settings.attribution_prompt,
                "steps": config.steps,
                "guidance_scale": float(output.settings.guidance_scale),
                "q": config.q,
                "iou": float(iou[index]),
                "biou_blocks": blocks,
                "biou_values": [float(value) for value in biou_values[index]],
                "biou_mean": float(biou_mean[index]),
                "softiou_first": float(trajectory[0]),
                "softiou_last": float(trajectory[-1]),
                "softiou_mean": float(trajectory.mean()),
                "clip_classes": list(classes) if probs is not None else None,
                "clip_probs": probs[index].tolist() if probs is not None else None,
                "clip_label": (classes[int(probs[index].argmax())] if probs is not None else None),
                "image_path": image_path(item),
                "seconds": seconds,
                "batch_size": len(batch),
                "worker": self.worker,
                "versions": self.versions,
                "created_at": created,
                "maps_concepts": list(attribution.concepts),
                "maps_shape": list(packed.shape[1:]) if config.store_maps else None,
                "maps": stored_maps.encode(packed[index]) if config.store_maps else None,
                "masks_inclusive": inclusive if config.store_maps else None,
                "concept_ious": [float(value) for value in concept_ious[index]],
            }
            results.append(ImageResult(row, buffer.getvalue()))
        return results


class ResultSink:
    """The driver's writer: PNGs first (temporary name, then rename), then the batch's part.

    The part file is the commit: a batch whose part is not written is missing on resume,
    whatever PNGs it left (they are overwritten). Keys this sink already wrote are dropped,
    so one runner never writes a key twice.
    """

    def __init__(self, run_dir: Path, store: ResultsStore, done: set[tuple]):
        self.run_dir = run_dir
        self.store = store
        self.written: set[tuple] = set(done)
        self.images = 0

    def commit(self, results: Iterable[ImageResult]) -> int:
        """Write a batch's images and rows; returns the number of new rows."""
        fresh, fresh_keys = [], []
        for result in results:
            key = tuple(result.row[name] for name in KEY_COLUMNS)
            if key in self.written:
                continue
            self._save_png(self.run_dir / result.row["image_path"], result.png)
            fresh.append(result.row)
            fresh_keys.append(key)
        self.store.write(fresh)
        self.written.update(fresh_keys)
        self.images += len(fresh)
        return len(fresh)

    @staticmethod
    def _save_png(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex}-{path.name}{TEMP_SUFFIX}")
        temporary.write_bytes(data)
        os.replace(temporary, path)


@dataclass
class AuditSummary:
    """What a run did: run_dir; images generated now, already present (skipped) and in the
    grid; the store check made before starting; seconds of wall time."""

    run_dir: Path
    generated: int
    skipped: int
    total: int
    check: StoreCheck
    seconds: float
    # Keys whose stored image was missing or unreadable (regenerated), leftover temporary
    # files of killed writers (removed), and the record of a dead run's lock taken over.
    lost_images: int = 0
    temporaries_removed: int = 0
    stale_lock: dict | None = None

    @property
    def images_per_second(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else math.nan


def prepare_run_dir(config: AuditConfig) -> Path:
    """Create the run folder and record the config; refuse a folder of another experiment."""
    run_dir = Path(config.output)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = run_dir / RUN_FILE
    config_hash = config.config_hash
    # A folder whose earlier start failed before committing any result holds nothing to
    # protect, so a corrected config may take it over.
    if record.exists() and ResultsStore(run_dir).part_files():
        previous = json.loads(record.read_text())
        if previous.get("config_hash") != config_hash:
            before = previous.get("config", {})
            now = config.model_dump(mode="json")
            changed = [name for name in HASHED_FIELDS if before.get(name) != now.get(name)]
            raise RunFolderMismatchError(
                f"{run_dir} holds the results of config hash {previous.get('config_hash')}, "
                f"and this config has hash {config_hash} (fields that differ: {changed}); "
                "write to another output folder (override output=...), or restore those fields"
            )
    text = json.dumps(
        {"config_hash": config_hash, "config": config.model_dump(mode="json")}, indent=2
    )
    temporary = record.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex}-{RUN_FILE}{TEMP_SUFFIX}")
    temporary.write_text(text)
    os.replace(temporary, record)
    return run_dir


def run_audit(
    config: AuditConfig,
    *,
    classifier_factory: ClassifierFactory | None = default_classifier,
    progress: bool = True,
) -> AuditSummary:
    """Run (or resume) an audit with the config's executor; returns what was done.

    classifier_factory: builds each worker's CLIP classifier (default: biasmap.audit.clip);
    None leaves the CLIP columns empty.
    """
    from . import executors

    started = time.perf_counter()
    # One writer per folder: a second audit on it stops here (RunLockedError), before it
    # could generate a key the first one is generating.
    with RunLock(config.output) as lock:
        run_dir = prepare_run_dir(config)
        store = ResultsStore(run_dir)
        check = store.check(repair=True)  # one read of the parts: the repair and the keys
        # Under the lock every temporary file is a dead writer's.
        removed = remove_temporaries(run_dir)
        lost = unusable_images(run_dir, check.image_paths)
        if lost:
            store.drop_keys(lost)
        done = set(check.present) - lost
        batches, todo, skipped = pending_batches(config, done)
        sink = ResultSink(run_dir, store, done)
        if batches:
            run = executors.run_ray if config.executor == "ray" else executors.run_local
            run(config, batches, sink, classifier_factory=classifier_factory, progress=progress)
    return AuditSummary(
        run_dir=run_dir,
        generated=sink.images,
        skipped=skipped,
        total=skipped + todo,
        check=check,
        seconds=time.perf_counter() - started,
        lost_images=len(lost),
        temporaries_removed=removed,
        stale_lock=lock.stale,
    )


def remove_temporaries(run_dir: Path) -> int:
    """Delete the temporary files of killed writers in parts/, images/ and the run folder;
    returns how many. Only the lock holder may call it: another writer's files would go too."""
    candidates = [
        *run_dir.glob(f"{TEMP_PREFIX}*"),
        *(run_dir / PARTS).glob(f"{TEMP_PREFIX}*"),
        *(run_dir / IMAGES).rglob(f"{TEMP_PREFIX}*"),
    ]
    removed = 0
    for path in candidates:
        if path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def unusable_images(run_dir: Path, image_paths: dict[tuple, str | None]) -> set[tuple]:
    """The keys whose stored image is missing or cannot be decoded (resume regenerates them)."""
    from PIL import Image

    lost = set()
    for key, relative in image_paths.items():
        try:
            with Image.open(run_dir / (relative or "")) as image:
                image.verify()
        except (OSError, SyntaxError, ValueError):  # PIL reports a broken PNG as SyntaxError
            lost.add(key)
    return lost
