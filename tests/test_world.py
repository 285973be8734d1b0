"""The planted-bias world: its declaration, renderer, detector, trainer and the shipped model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from biasmap.world import KEY_FINDING_PAIRS, SPEC, caption, planted_rd
from biasmap.world.detect import detect
from biasmap.world.render import cue_masks, region_masks, render, render_batch, sample_labels
from biasmap.world.spec import (
    AXES,
    HAIR_COLOURS,
    ITEMS,
    PROFESSIONS,
    SKIN_COLOURS,
    generator_caption,
)


def _every_combination():
    triples = [(p, g, r) for p in PROFESSIONS for g in AXES["gender"] for r in AXES["race"]]
    return [list(column) for column in zip(*triples, strict=True)]


# --------------------------------------------------------------------------- declaration


def test_spec_is_complete_data():
    assert set(SPEC) == set(PROFESSIONS) and len(SPEC) >= 6
    for profession, entry in SPEC.items():
        assert set(entry["entanglement"]) == set(AXES)
        assert all(0.0 <= v <= 1.0 for v in entry["entanglement"].values())
        for axis, classes in AXES.items():
            distribution = entry["distribution"][axis]
            assert list(distribution) == list(classes), profession
            assert math.isclose(sum(distribution.values()), 1.0, abs_tol=1e-9), profession
    with pytest.raises(TypeError):
        SPEC["nurse"]["entanglement"]["gender"] = 0.0  # read-only


def test_declared_entanglement_is_the_items_overlap_with_the_region():
    """The number in SPEC is what the renderer draws: the share of the item's box inside the
    axis's region."""
    masks = region_masks()
    for profession in PROFESSIONS:
        item = masks[f"item:{profession}"]
        for axis, region in (("gender", "hair"), ("race", "face")):
            overlap = (item & masks[region]).sum() / item.sum()
            assert SPEC[profession]["entanglement"][axis] == pytest.approx(overlap, abs=0.01), (
                profession,
                axis,
            )


def test_key_finding_2_pairs_are_planted():
    for axis, (entangled, skewed) in KEY_FINDING_PAIRS.items():
        assert planted_rd(entangled, axis) <= 0.2 < 0.7 <= planted_rd(skewed, axis)
        assert SPEC[entangled]["entanglement"][axis] >= 0.9
        assert SPEC[skewed]["entanglement"][axis] == 0.0


def test_captions_follow_the_paper_template():
    assert caption("nurse", {}) == "A photo of the face of a nurse"
    assert (
        caption("nurse", {"gender": "female", "race": "Asian"})
        == "A photo of the face of a nurse and female gender and Asian race"
    )
    assert caption(None, {"race": "black"}) == "a photo of the face of a black person"
    # The generator's captions code classes by ordinals every axis shares, so only the axis
    # word tells which cue a class is about.
    assert generator_caption("nurse") == "A photo of the face of a nurse"
    assert (
        generator_caption("nurse", "gender", "female")
        == "A photo of the face of a nurse and second gender"
    )
    assert generator_caption("pilot", "race", "black").endswith("and second race")


def test_sampled_labels_follow_the_declared_distribution():
    rng = np.random.default_rng(0)
    professions, genders, races = sample_labels(40000, rng)
    for profession in ("teacher", "firefighter", "musician"):
        rows = [i for i, p in enumerate(professions) if p == profession]
        male = sum(genders[i] == "male" for i in rows) / len(rows)
        black = sum(races[i] == "black" for i in rows) / len(rows)
        assert male == pytest.approx(SPEC[profession]["distribution"]["gender"]["male"], abs=0.03)
        assert black == pytest.approx(SPEC[profession]["distribution"]["race"]["black"], abs=0.03)


# --------------------------------------------------------------------------- renderer + detector


def test_rendered_cues_sit_in_their_masks():
    """Every pixel of a cue's colour lies in that cue's ground-truth mask, and the mask's
    visible part shows the colour."""
    for profession in PROFESSIONS:
        image, masks = render(profession, "female", "black", seed=1)
        pixels = image.astype(float)
        item = np.linalg.norm(pixels - ITEMS[profession]["colour"], axis=-1) < 30
        hair = np.linalg.norm(pixels - HAIR_COLOURS["female"], axis=-1) < 30
        skin = np.linalg.norm(pixels - SKIN_COLOURS["black"], axis=-1) < 30
        eyes = region_masks()["eyes"]  # the teacher's black book shares the eyes' colour
        assert item.any() and not (item & ~masks["item"] & ~eyes).any(), profession
        assert not (hair & ~masks["gender"]).any() and not (skin & ~masks["race"]).any()
        # See-through items: the region under an item still shows its cue on the bare rows.
        assert hair[masks["gender"]].mean() >= 0.5 and skin[masks["race"]].mean() >= 0.5


def test_detector_reads_back_every_rendered_combination():
    professions, genders, races = _every_combination()
    images = render_batch(professions, genders, races, np.random.default_rng(3))
    for image, p, g, r in zip(images, professions, genders, races, strict=True):
        found = detect(image)
        assert (found.profession, found.gender, found.race) == (p, g, r)
        rows, cols = np.nonzero(cue_masks(p)["item"])
        assert found.item_box == (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1)
        for axis in AXES:
            # The see-through item hides a row of the region's edge now and then.
            assert found.overlap[axis] == pytest.approx(SPEC[p]["entanglement"][axis], abs=0.15), (
                p,
                axis,
            )


def test_detector_finds_no_item_in_a_blank_portrait_and_rejects_other_sizes():
    image, _ = render("teacher", "male", "white", seed=0)
    blank = image.copy()
    blank[cue_masks("teacher")["item"]] = (125, 125, 135)  # paint the book over in shirt grey
    assert detect(blank).profession is None
    with pytest.raises(ValueError, match="32x32"):
        detect(np.zeros((64, 64, 3), np.uint8))


def test_renderer_rejects_unknown_labels():
    with pytest.raises(ValueError, match="unknown profession"):
        render_batch(["astronaut"], ["male"], ["white"], np.random.default_rng(0))


# --------------------------------------------------------------------------- trainer


def _weights(folder):
    from safetensors.torch import load_file

    return {
        f"{path.parent.name}/{key}": value
        for path in sorted(folder.glob("**/*.safetensors"))
        for key, value in load_file(path).items()
    }


def test_trainer_runs_end_to_end_and_resumes_a_killed_run_exactly(tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    from biasmap.world import train

    assert train.main(["--out", str(tmp_path / "a"), "--budget", "smoke", "--threads", "1"]) == 0
    export = tmp_path / "a" / "export"
    record = json.loads((export / "training.json").read_text())
    assert record["seed"] == 0 and record["versions"]["torch"] == torch.__version__
    assert (tmp_path / "a" / "logs" / "unet.csv").read_text().count("\n") == 1 + 4

    pipe = StableDiffusionPipeline.from_pretrained(export / "pipeline", torch_dtype=torch.float32)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    image = pipe(
        "A photo of the face of a nurse",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (32, 32)

    # A run killed in its third UNet step, restarted with the same command, ends with the
    # same weights as the uninterrupted one.
    real = train.sample_batch
    calls = {"unet": 0}

    def dying(n, rng):
        if n == train.BUDGETS["smoke"].unet_batch:
            calls["unet"] += 1
            if calls["unet"] == 3:
                raise KeyboardInterrupt
        return real(n, rng)

    monkeypatch.setattr(train, "sample_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        train.main(["--out", str(tmp_path / "b"), "--budget", "smoke", "--threads", "1"])
    monkeypatch.setattr(train, "sample_batch", real)
    assert train.main(["--out", str(tmp_path / "b"), "--budget", "smoke", "--threads", "1"]) == 0
    first, second = _weights(export), _weights(tmp_path / "b" / "export")
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0, msg=key)


# --------------------------------------------------------------------------- shipped model


def test_shipped_model_is_small_and_loads_by_name():
    from biasmap.models import PLANTED_FOLDER, load_pipeline

    size = sum(f.stat().st_size for f in PLANTED_FOLDER.glob("**/*") if f.is_file())
    assert size <= 20 * 2**20, f"shipped planted model is {size / 2**20:.1f} MiB"
    pipe = load_pipeline("planted")
    assert pipe.unet.dtype == torch.float32
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    training = json.loads((PLANTED_FOLDER / "training.json").read_text())
    assert training["command"].startswith("python -m biasmap.world.train")


def test_shipped_clip_labels_the_worlds_classes():
    """Zero-shot with the audit's class prompts on fresh rendered images."""
    from PIL import Image

    from biasmap.audit.clip import ClipClassifier
    from biasmap.world.spec import CLASS_TEMPLATE

    classifier = ClipClassifier("planted")
    professions, genders, races = _every_combination()
    images = render_batch(professions, genders, races, np.random.default_rng(5))
    pil = [Image.fromarray(image) for image in images]
    for axis, truth in (("gender", genders), ("race", races)):
        prompts = [CLASS_TEMPLATE.format(cls=c) for c in AXES[axis]]
        predicted = classifier.classify(pil, prompts).argmax(1)
        accuracy = np.mean([AXES[axis][i] == t for i, t in zip(predicted, truth, strict=True)])
        assert accuracy >= 0.9, (axis, accuracy)


def test_shipped_model_reproduces_its_recorded_validation_figures():
    """The fingerprint bench/bench_planted.py --fingerprint recorded with the weights:
    mIoU within 0.05 and peak-in-cue rates within one seed of four."""
    from biasmap.models import PLANTED_FOLDER, load_pipeline
    from biasmap.world.validation import localization

    recorded = json.loads((PLANTED_FOLDER / "validation_fingerprint.json").read_text())
    professions = ["firefighter", "doctor", "teacher"]
    pipe = load_pipeline("planted")
    measured = localization(pipe, professions, list(AXES), recorded["seeds"], recorded["steps"])
    for axis in AXES:
        for profession in professions:
            now, then = measured[axis][profession], recorded["figures"][axis][profession]
            assert now["miou"] == pytest.approx(then["miou"], abs=0.05), (axis, profession)
            for key in ("profession_peak_in_item", "axis_peak_in_region"):
                assert now[key] == pytest.approx(then[key], abs=0.25), (axis, profession, key)


def test_audit_report_of_the_planted_model_has_a_ground_truth_section(tmp_path):
    from biasmap.audit.config import AuditConfig
    from biasmap.audit.runner import run_audit
    from biasmap.report import write_report

    config = AuditConfig(
        model="planted",
        clip_model="planted",
        professions=["firefighter", "teacher", "doctor"],
        seeds=[0, 1],
        methods=["sd"],
        steps=4,
        output=str(tmp_path / "run"),
        batch_size=2,
    )
    run_audit(config, progress=False)
    html = write_report(tmp_path / "run").read_text()
    assert "Ground truth (planted model)" in html
    summary = (tmp_path / "run" / "report" / "tables" / "ground-truth-summary.csv").read_text()
    assert summary.splitlines()[0].startswith("axis,professions,")
    assert len(summary.splitlines()) == 1 + 2  # header + both axes


def test_map_contrast_is_one_for_a_flat_map_and_inverse_area_for_a_map_inside_its_cue():
    from biasmap.world.validation import contrast, mass_inside

    truth = torch.zeros(4, 4, dtype=torch.bool)
    truth[:2, :1] = True  # 2 of 16 cells
    flat = torch.ones(3, 4, 4)
    inside = truth.float().expand(3, 4, 4) * torch.tensor([1.0, 2.0, 5.0])[:, None, None]
    half = torch.where(truth, 3.0, 0.2).expand(1, 4, 4)  # 6 inside, 14 * 0.2 = 2.8 outside
    assert contrast(flat, truth) == pytest.approx(1.0)
    assert contrast(inside, truth) == pytest.approx(8.0)
    assert mass_inside(half, truth) == pytest.approx(6.0 / 8.8)
