"""The audit engine: config validation, the Parquet results store, resume after SIGKILL, corrupt
part recovery, and the Ray executor against the local one (tiny pipeline, CPU, few steps)."""

from __future__ import annotations

import csv
import datetime
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from audit_fixtures import small_config, write_yaml  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from biasmap.audit.config import ConfigError, load_config, parse_seeds  # noqa: E402
from biasmap.audit.runner import (  # noqa: E402
    RunFolderMismatchError,
    pending_batches,
    run_audit,
    work_batches,
)
from biasmap.audit.schema import KEY_COLUMNS, SCHEMA  # noqa: E402
from biasmap.audit.store import CorruptPartWarning, ResultsStore  # noqa: E402
from biasmap.cli import app  # noqa: E402
from biasmap.mitigation.methods import METHODS  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
METRIC_COLUMNS = (
    "iou",
    "biou_blocks",
    "biou_values",
    "biou_mean",
    "softiou_first",
    "softiou_last",
    "softiou_mean",
    "prompt",
    "attribution_prompt",
    "image_path",
    # the stored attribution maps (float16 bytes), which resume must keep with their rows
    "maps",
    "maps_shape",
    "maps_concepts",
    "masks_inclusive",
)


def pixel_probs(image: Image.Image, classes: int) -> torch.Tensor:
    """The fake classifier's rule, on one image: a softmax over class j of the mean of colour
    channel j % 3, scaled by j + 1. Recomputed in the tests from the saved PNG."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0)
    means = pixels.mean(dim=(0, 1))
    logits = torch.stack([means[j % 3] * (j + 1) * 10 for j in range(classes)])
    return torch.softmax(logits, dim=0)


class PixelClassifier:
    """A stand-in for CLIP with the classify(images, class_prompts) interface."""

    def classify(self, images, class_prompts):
        return torch.stack([pixel_probs(image, len(class_prompts)) for image in images])


def pixel_classifier(config, device):
    return PixelClassifier()


class CrashOnceFactory:
    """Builds PixelClassifiers whose first classification anywhere kills its own process
    (SIGKILL, as an out-of-memory kill would): the marker file records that it happened."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __call__(self, config, device):
        marker = self.marker

        class CrashOnce(PixelClassifier):
            def classify(self, images, class_prompts):
                try:
                    marker.open("x").close()  # only the first caller creates it
                except FileExistsError:
                    return super().classify(images, class_prompts)
                os.kill(os.getpid(), signal.SIGKILL)

        return CrashOnce()


def rows_by_key(table: pa.Table) -> dict[tuple, dict]:
    return {tuple(row[name] for name in KEY_COLUMNS): row for row in table.to_pylist()}


def raw_keys(store: ResultsStore) -> list[tuple]:
    """Every key in every committed part file, duplicates included (no deduplication)."""
    keys = []
    for path in store.part_files():
        table = pq.read_table(path, columns=list(KEY_COLUMNS))
        keys += list(zip(*(table.column(name).to_pylist() for name in KEY_COLUMNS), strict=True))
    return keys


def assert_same_metrics(actual: pa.Table, expected: pa.Table) -> None:
    """Same keys, and the same metric columns bit for bit (same batches, same thread count)."""
    got, want = rows_by_key(actual), rows_by_key(expected)
    assert sorted(got) == sorted(want)
    for key, row in want.items():
        for column in METRIC_COLUMNS:
            assert got[key][column] == row[column], (key, column, got[key][column], row[column])


# --------------------------------------------------------------------------- config


def test_config_defaults_follow_the_paper():
    config = load_config(None)
    assert len(config.professions) == 20 and config.professions[0] == "architect"
    assert config.axes["gender"].classes == ["male", "female"]
    assert config.axes["race"].classes == ["white", "black", "Hispanic", "Asian"]
    assert config.seeds == list(range(100))


def test_overrides_are_typed_dotted_and_applied_before_validation(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", small_config(tmp_path / "run"))
    config = load_config(
        path, ["steps=7", "methods=[sd,fd]", "axes.gender.concept=sex", "seeds=3-5", "guidance=3"]
    )
    assert config.steps == 7 and config.methods == ["sd", "fd"] and config.seeds == [3, 4, 5]
    assert config.axes["gender"].concept == "sex" and config.axes["gender"].classes == [
        "male",
        "female",
    ]
    assert config.guidance == 3.0


def test_config_hash_covers_what_changes_a_row_only(tmp_path):
    base = load_config(None, [f"output={tmp_path}"])
    same = [
        "output=elsewhere",
        "batch_size=16",
        "executor=ray",
        "workers=3",
        "threads=1",
        "seeds=0-4",  # the grid is in the key, not in the hash
        "professions=[nurse]",
        "methods=[fd]",
    ]
    different = ["steps=10", "q=0.5", "preset=official", "axes.gender.concept=sex", "dtype=fp16"]
    for override in same:
        assert load_config(None, [override]).config_hash == base.config_hash, override
    for override in different:
        assert load_config(None, [override]).config_hash != base.config_hash, override


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("stpes=5", ["stpes", "unknown field", "steps"]),
        ("axes.gender.concpet=x", ["axes.gender.concpet", "unknown field", "concept"]),
        ("methods=[sd,fairdiff]", ["methods", "fairdiff", *METHODS]),
        ("seeds=9-3", ["seeds", "9-3", "empty"]),
        ("seeds=zero-9", ["seeds", "0-99"]),
        ("model=/no/such/sd15", ["model", "/no/such/sd15", "does not exist"]),
        ("dtype=fp64", ["dtype", "fp32", "fp16", "bf16"]),
        ("axes.colour={concept: c, classes: [a, b]}", ["axes", "colour", "gender", "race"]),
        ("prompts.generation=a photo", ["prompts", "{profession}"]),
    ],
)
def test_bad_config_names_the_field_and_what_is_allowed(override, expected):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    for text in expected:
        assert text in str(error.value), (text, str(error.value))


@pytest.mark.parametrize("name", ["demo.yaml", "sd15-gpu.yaml", "sd15-ray.yaml"])
def test_shipped_configs_are_valid(name, tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")  # what makes a folder a pipeline
    (tmp_path / "inception.pth").write_bytes(b"")
    local_paths = [
        f"model={folder}",
        f"clip_model={folder}",
        f"fid_weights={tmp_path}/inception.pth",
    ]
    config = load_config(REPO_ROOT / "configs" / name, [] if name == "demo.yaml" else local_paths)
    if name == "demo.yaml":  # the README's main job: 5 x 2 x 8 x {sd, biasmap} on the planted model
        assert (len(config.professions), len(config.axes), len(config.seeds)) == (5, 2, 8)
        assert config.methods == ["sd", "biasmap"] and config.model == "planted"
        assert config.clip_model == "planted"
        assert sum(len(batch) for batch in work_batches(config)) == 160


def test_seed_forms():
    assert parse_seeds("0-3,10") == [0, 1, 2, 3, 10]
    assert parse_seeds([5, 1]) == [5, 1]
    assert parse_seeds(7) == [7]
    for bad in ("1,1", "-3", [1.5], True):
        with pytest.raises(ValueError):
            parse_seeds(bad)


def test_cli_reports_a_bad_config_and_exits_2(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", small_config(tmp_path / "run", methods=["sd", "bogus"]))
    result = CliRunner().invoke(app, ["audit", "--config", str(path)])
    assert result.exit_code == 2
    assert "bogus" in result.output and "fd+biasmap" in result.output
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- store


def _row(seed: int, second: int = 0, iou: float = 0.5) -> dict:
    row = dict.fromkeys(SCHEMA.names)
    row.update(
        profession="doctor",
        axis="gender",
        seed=seed,
        method="sd",
        lambda_=0.0,
        config_hash="h",
        iou=iou,
        biou_blocks=["down-16"],
        biou_values=[iou],
        created_at=datetime.datetime(2025, 1, 1, 0, 0, second, tzinfo=datetime.timezone.utc),
    )
    return row


def test_store_reads_each_key_once_keeping_the_earliest_copy(tmp_path):
    store = ResultsStore(tmp_path)
    store.write([_row(1, second=5, iou=0.9), _row(2)])
    store.write([_row(0), _row(1, second=1, iou=0.1)])  # an earlier copy of seed 1
    table = store.read_table()
    assert table.column("seed").to_pylist() == [0, 1, 2]
    assert table.column("iou").to_pylist() == [0.5, 0.1, 0.5]
    assert table.schema.equals(SCHEMA)
    check = store.check()
    assert (check.parts, check.rows, check.keys, check.duplicate_rows) == (2, 4, 3, 1)
    assert not list(tmp_path.glob("parts/.tmp-*"))


def test_store_refuses_rows_that_break_the_schema(tmp_path):
    store = ResultsStore(tmp_path)
    with pytest.raises(ValueError, match="missing"):
        store.write([{k: v for k, v in _row(0).items() if k != "iou"}])
    with pytest.raises(ValueError, match="repeat a key"):
        store.write([_row(0), _row(0)])
    bad = _row(0)
    bad["biou_values"] = [0.1, 0.2]
    with pytest.raises(ValueError, match="biou_blocks and biou_values"):
        store.write([bad])
    assert store.part_files() == []


def test_store_flags_a_readable_part_with_another_schema(tmp_path):
    store = ResultsStore(tmp_path)
    store.write([_row(0)])
    store.parts_dir.joinpath("part-foreign.parquet").write_bytes(b"")
    pq.write_table(pa.table({"seed": [1]}), store.parts_dir / "part-foreign.parquet")
    with pytest.warns(CorruptPartWarning, match=r"part-foreign\.parquet.*schema differs"):
        check = store.check(repair=True)
    assert [p.path.name for p in check.corrupt] == ["part-foreign.parquet"]
    assert (store.corrupt_dir / "part-foreign.parquet").exists()
    assert store.keys() == {("doctor", "gender", 0, "sd", 0.0, "h")}


# --------------------------------------------------------------------------- runner


def test_batches_group_seeds_with_identical_settings(tmp_path):
    config = load_config(
        write_yaml(tmp_path / "c.yaml", small_config(tmp_path, seeds="0-4", batch_size=4)),
        ["methods=[sd,fd,fd+biasmap]", "lambdas=[50,100]"],
    )
    batches = work_batches(config)
    described = [(b[0].method, b[0].lambda_, [item.seed for item in b]) for b in batches]
    assert described == [
        ("sd", 0.0, [0, 1, 2, 3]),
        ("sd", 0.0, [4]),
        # Fair Diffusion's edit order alternates with the seed: even and odd seeds apart.
        ("fd", 0.0, [0, 2, 4]),
        ("fd", 0.0, [1, 3]),
        ("fd+biasmap", 50.0, [0, 2, 4]),
        ("fd+biasmap", 50.0, [1, 3]),
        ("fd+biasmap", 100.0, [0, 2, 4]),
        ("fd+biasmap", 100.0, [1, 3]),
    ]
    done = {batches[0][1].key(config.config_hash)}
    pending, todo, skipped = pending_batches(config, done)
    assert (todo, skipped) == (sum(len(b) for b in batches) - 1, 1)
    assert [item.seed for item in pending[0]] == [0, 2, 3]


def test_run_writes_rows_images_and_classifier_columns(tmp_path):
    config = load_config(
        write_yaml(tmp_path / "c.yaml", small_config(tmp_path / "run", seeds="0-2")),
        ["clip_model=tiny"],
    )
    summary = run_audit(config, classifier_factory=pixel_classifier, progress=False)
    assert (summary.generated, summary.skipped, summary.total) == (6, 0, 6)
    table = ResultsStore(summary.run_dir).read_table()
    assert table.num_rows == 6
    for row in table.to_pylist():
        assert row["config_hash"] == config.config_hash
        assert row["lambda_"] == (100.0 if row["method"] == "biasmap" else 0.0)
        image = Image.open(summary.run_dir / row["image_path"])
        expected = pixel_probs(image, 2)
        assert row["clip_classes"] == ["male", "female"]
        np.testing.assert_allclose(row["clip_probs"], expected.tolist(), rtol=1e-12)
        assert row["clip_label"] == ["male", "female"][int(expected.argmax())]
        assert 0.0 <= row["iou"] <= 1.0
        assert row["biou_blocks"] == ["down-16", "down-8", "down-4", "up-4", "up-8", "up-16"]
        assert row["biou_mean"] == pytest.approx(np.mean(row["biou_values"]))
        assert row["batch_size"] in (1, 2) and row["seconds"] > 0
    # sd is unguided: its first SoftIoU is measured on the same first step as biasmap's.
    rows = rows_by_key(table)
    for seed in range(3):
        sd = rows[("doctor", "gender", seed, "sd", 0.0, config.config_hash)]
        guided = rows[("doctor", "gender", seed, "biasmap", 100.0, config.config_hash)]
        assert sd["softiou_first"] == pytest.approx(guided["softiou_first"], rel=1e-5)
    # A second run finds everything done.
    again = run_audit(config, classifier_factory=pixel_classifier, progress=False)
    assert (again.generated, again.skipped) == (0, 6)
    assert len(raw_keys(ResultsStore(summary.run_dir))) == 6


# Per audited family: the methods run (each base, with and without guidance, and a block
# list), the default and the targeted block lists, the diffusers pipeline's guidance scale
# for the sd rows (7.5: the paper preset's CFG; Flux: FluxPipeline's default 3.5, its
# distilled guidance embedding) and the family the report names.
AUDITED_FAMILIES = {
    "tiny-sdxl": (
        ["sd", "biasmap", "fd", "hard", "negative+biasmap", "biasmap@down-8+up-8"],
        ["down-8", "down-4", "up-4", "up-8"],
        ["down-8", "up-8"],
        7.5,
        "SDXL UNet",
    ),
    "tiny-sd3": (
        ["sd", "biasmap", "fd", "hard", "negative+biasmap", "biasmap@joint-0+joint-2"],
        ["joint-0", "joint-1", "joint-2"],
        ["joint-0", "joint-2"],
        7.5,
        "SD3 (MM-DiT)",
    ),
    # Flux has no true CFG: fd and negative are refused (see the test below).
    "tiny-flux": (
        ["sd", "biasmap", "hard+biasmap", "biasmap@joint-1+single-1"],
        ["joint-0", "joint-1", "single-0", "single-1"],
        ["joint-1", "single-1"],
        3.5,
        "Flux.1 (MM-DiT)",
    ),
}


@pytest.mark.parametrize("model", list(AUDITED_FAMILIES))
def test_an_audit_runs_every_method_of_the_family_and_its_report_names_it(model, tmp_path):
    from biasmap.models import load_pipeline
    from biasmap.report import write_report

    methods, default_blocks, targeted_blocks, guidance, family = AUDITED_FAMILIES[model]
    fields = dict(model=model, professions=["doctor", "nurse"], seeds="0-1")
    config = load_config(
        write_yaml(tmp_path / "c.yaml", small_config(tmp_path / "run", **fields, methods=methods)),
        [],
    )
    summary = run_audit(config, classifier_factory=pixel_classifier, progress=False)
    assert (summary.generated, summary.total) == (2 * 2 * len(methods),) * 2
    rows = rows_by_key(ResultsStore(summary.run_dir).read_table())
    assert len(rows) == 2 * 2 * len(methods)

    def row(method, seed, lambda_=0.0):
        return rows[("doctor", "gender", seed, method, lambda_, config.config_hash)]

    for stored in rows.values():
        assert stored["model"] == model and 0.0 <= stored["iou"] <= 1.0
        assert stored["guidance_scale"] == guidance
        targeted = stored["method"].startswith("biasmap@")
        assert stored["biou_blocks"] == (targeted_blocks if targeted else default_blocks)
    hard = next(method for method in methods if method.startswith("hard"))
    lambda_hard = 100.0 if "+biasmap" in hard else 0.0
    assert row(hard, 0, lambda_hard)["prompt"] == "A photo of the face of a diverse doctor"
    # The sd rows are the diffusers pipeline's own images (PNG-exact), batched as the audit
    # batches seeds, on as many threads as the audit used: CPU convolutions split their
    # reductions by thread, so another thread count moves pixels by one level.
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        reference = load_pipeline(model)(
            row("sd", 0)["prompt"],
            num_images_per_prompt=2,
            num_inference_steps=2,
            guidance_scale=guidance,
            generator=[torch.Generator().manual_seed(seed) for seed in (0, 1)],
        ).images
    finally:
        torch.set_num_threads(threads)
    for seed, image in enumerate(reference):
        stored = Image.open(summary.run_dir / row("sd", seed)["image_path"])
        assert np.array_equal(np.asarray(stored), np.asarray(image))
        # The first step's energy is measured before any guidance is added.
        guided = row("biasmap", seed, 100.0)
        assert guided["softiou_first"] == pytest.approx(row("sd", seed)["softiou_first"], rel=1e-5)
    html = write_report(summary.run_dir).read_text()
    assert f"model {model} ({family})" in html


@pytest.mark.parametrize("method", ["fd", "fd+biasmap", "negative", "negative+biasmap"])
def test_flux_audits_refuse_the_methods_that_need_true_cfg_before_loading(method, tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(None, ["model=tiny-flux", f"methods=[sd, '{method}']"])
    message = str(error.value)
    assert len(message.splitlines()) == 2  # the header and one line for the config
    for text in (repr(method), "Flux.1 (MM-DiT)", "'hard+biasmap'", "biasmap@<block>"):
        assert text in message, (text, message)
    assert "'fd'" not in message.partition("accepts")[2]  # the accepted list is what runs
    # SD3 runs true CFG: the same methods are accepted there.
    assert load_config(None, ["model=tiny-sd3", f"methods=[sd, '{method}']"]).methods[1] == method


@pytest.mark.parametrize(
    ("model", "method", "blocks"),
    [
        ("tiny-sd3", "biasmap@joint-3", "['joint-0', 'joint-1', 'joint-2']"),
        ("tiny-sd3", "biasmap@down-64+up-64", "['joint-0', 'joint-1', 'joint-2']"),
        ("tiny-flux", "biasmap@single-2", "['joint-0', 'joint-1', 'single-0', 'single-1']"),
    ],
)
def test_dit_block_methods_are_checked_against_the_model_blocks(model, method, blocks):
    with pytest.raises(ConfigError, match=r"lacks; its MM-DiT blocks are " + re.escape(blocks)):
        load_config(None, [f"model={model}", f"methods=['{method}']"])
    # The block names do not depend on the image size.
    config = load_config(None, [f"model={model}", "methods=['biasmap@joint-1']", "image_size=128"])
    assert config.methods == ["biasmap@joint-1"]


def test_a_run_folder_of_another_experiment_is_refused(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", small_config(tmp_path / "run", seeds=[0]))
    run_audit(load_config(path, ["methods=[sd]"]), progress=False)
    # Only hashed fields are listed: batch_size changes no row.
    with pytest.raises(RunFolderMismatchError, match=r"fields that differ: \['steps'\]"):
        run_audit(load_config(path, ["methods=[sd]", "steps=3", "batch_size=1"]), progress=False)
    # The command line: overrides after the options, the same refusal as a clean exit 2.
    command = ["audit", "--config", str(path), "methods=[sd]", "steps=3", "--no-progress"]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 2 and "config hash" in result.output
    command = ["audit", "--config", str(path), "methods=[sd, biasmap]", "--no-progress"]
    result = CliRunner().invoke(app, command)  # same hash, one more method: extends the run
    assert result.exit_code == 0, result.output
    assert "1 image(s) generated, 1 already present, 2 in the grid" in result.output


def test_corrupt_parts_are_reported_moved_aside_and_recomputed(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", small_config(tmp_path / "run", seeds="0-3"))
    config = load_config(path)
    run_audit(config, classifier_factory=pixel_classifier, progress=False)
    store = ResultsStore(config.output)
    original = store.read_table()
    parts = store.part_files()
    assert len(parts) == 4  # 2 methods x 2 batches of 2 seeds
    truncated, garbage = parts[0], parts[2]
    lost = {key for p in (truncated, garbage) for key in raw_keys_of(p)}
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    garbage.write_bytes(random.Random(0).randbytes(garbage.stat().st_size))
    assert len(_quiet_keys(store)) == 4  # the other two parts' keys

    with pytest.warns(CorruptPartWarning) as caught:
        summary = run_audit(config, classifier_factory=pixel_classifier, progress=False)
    messages = " ".join(str(w.message) for w in caught)
    assert truncated.name in messages and garbage.name in messages
    assert summary.generated == len(lost) == 4
    assert {p.path.name for p in summary.check.corrupt} == {truncated.name, garbage.name}
    assert sorted(p.name for p in store.corrupt_dir.iterdir()) == sorted(
        [truncated.name, garbage.name]
    )
    assert not truncated.exists() and not garbage.exists()
    assert_same_metrics(store.read_table(), original)
    assert sorted(raw_keys(store)) == sorted(set(raw_keys(store)))


def raw_keys_of(path: Path) -> list[tuple]:
    table = pq.read_table(path, columns=list(KEY_COLUMNS))
    return list(zip(*(table.column(name).to_pylist() for name in KEY_COLUMNS), strict=True))


def _quiet_keys(store: ResultsStore) -> set[tuple]:
    with pytest.warns(CorruptPartWarning):
        return store.keys()


# ----------------------------------------------------------------- resume after a kill


def _audit_command(config_path: Path) -> list[str]:
    return [sys.executable, "-m", "biasmap", "audit", "--config", str(config_path), "--no-progress"]


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def test_resume_after_sigkill_at_random_moments_gives_every_key_once(tmp_path):
    grid = dict(professions=["doctor", "nurse"], seeds="0-5", methods=["sd", "biasmap"])
    killed_path = write_yaml(tmp_path / "killed.yaml", small_config(tmp_path / "killed", **grid))
    config = load_config(killed_path)
    total = sum(len(batch) for batch in work_batches(config))
    store = ResultsStore(config.output)
    rng = random.Random(6)
    for attempt in range(3):
        before = len(store.part_files())
        process = subprocess.Popen(
            _audit_command(killed_path),
            env=_environment(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 120
        while len(store.part_files()) <= before:  # wait for progress
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "no progress within 120 s"
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4))  # then kill at a random moment of the work
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        process.stderr.close()
        assert process.returncode == -signal.SIGKILL
        done = len(raw_keys(store))
        assert done < total, f"kill {attempt} came after the run had finished"
    # The final, uninterrupted resume runs in this process (same code path, no start-up cost).
    finished = CliRunner().invoke(app, ["audit", "--config", str(killed_path), "--no-progress"])
    assert finished.exit_code == 0, finished.output
    assert f"run folder: {config.output}" in finished.output

    keys = raw_keys(store)
    assert len(keys) == len(set(keys)) == total  # every key exactly once, in the raw parts too
    # and every key's maps once: they live in the key's row, so no part lacks or repeats them
    assert store.read_table().column("maps").null_count == 0

    reference_config = load_config(killed_path, [f"output={tmp_path / 'reference'}"])
    run_audit(reference_config, classifier_factory=None, progress=False)
    reference = ResultsStore(reference_config.output).read_table()
    assert_same_metrics(store.read_table(), reference)
    for row in reference.to_pylist():  # and the same PNGs
        a = (tmp_path / "killed" / row["image_path"]).read_bytes()
        b = (tmp_path / "reference" / row["image_path"]).read_bytes()
        assert a == b, row["image_path"]


# -------------------------------------------------------------------------------- ray


def test_ray_executor_gives_the_rows_of_the_local_one_despite_a_worker_kill(tmp_path):
    ray = pytest.importorskip("ray")
    from ray import cloudpickle

    grid = dict(seeds="0-3", methods=["sd", "fd+biasmap"], clip_model="tiny")
    path = write_yaml(tmp_path / "c.yaml", small_config(tmp_path / "local", **grid))
    local = load_config(path)
    run_audit(local, classifier_factory=pixel_classifier, progress=False)

    distributed = load_config(path, [f"output={tmp_path / 'ray'}", "executor=ray", "workers=2"])
    # The fake classifier lives in this test module, which Ray workers cannot import.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=4, include_dashboard=False)
    marker = tmp_path / "crashed"
    try:
        # One worker process dies in the middle of its first batch: Ray restarts it and reruns
        # that batch, and the store still gets every key once.
        summary = run_audit(
            distributed, classifier_factory=CrashOnceFactory(marker), progress=False
        )
    finally:
        ray.shutdown()
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert marker.exists() and summary.generated == 8
    assert sorted(raw_keys(ResultsStore(distributed.output))) == sorted(
        rows_by_key(ResultsStore(local.output).read_table())
    )
    ray_table = ResultsStore(distributed.output).read_table()
    local_table = ResultsStore(local.output).read_table()
    assert_same_metrics(ray_table, local_table)
    ray_rows, local_rows = rows_by_key(ray_table), rows_by_key(local_table)
    for key, row in local_rows.items():
        assert ray_rows[key]["clip_probs"] == row["clip_probs"]
        assert ray_rows[key]["worker"] in ("ray-0", "ray-1")


# ------------------------------------------------------------------------------ bench


def test_bench_audit_quick_writes_its_tables(tmp_path):
    if str(REPO_ROOT) not in sys.path:  # bench/ is a folder of scripts, not a package
        sys.path.insert(0, str(REPO_ROOT))
    from bench import bench_audit

    threads = torch.get_num_threads()
    try:
        bench_audit.main(["--quick", "--cases", "tiny-batch", "--results-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    rows = list(csv.DictReader((tmp_path / "bench_audit_quick.csv").open()))
    assert [row["provider"] for row in rows] == ["batch 1", "batch 4"]
    assert all(float(row["p50"]) > 0 and row["unit"] == "img/s" for row in rows)
    markdown = next(tmp_path.glob("bench_audit_tiny-batch_*_quick.md")).read_text()
    assert "batch 4" in markdown and "target 2x" in markdown


def test_bench_audit_gpu_batch_case_runs_its_cpu_smoke_path(tmp_path):
    """The GPU throughput case, --quick: the same code on the tiny model on CPU."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from bench import bench_audit

    threads = torch.get_num_threads()
    try:
        bench_audit.main(
            ["--quick", "--cases", "gpu-batch", "--batches", "1,2", "--results-dir", str(tmp_path)]
        )
    finally:
        torch.set_num_threads(threads)
    rows = list(csv.DictReader((tmp_path / "bench_audit_quick.csv").open()))
    providers = [row["provider"] for row in rows]
    assert "plain:eager:b1" in providers and "guided:eager:b2:peak" in providers
    assert all(float(row["p50"]) > 0 for row in rows)
    markdown = next(tmp_path.glob("bench_audit_gpu-batch_*_quick.md")).read_text()
    assert "guided:eager" in markdown
