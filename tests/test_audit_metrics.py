"""Aggregation of a results store: mIoU, mBIoU, RD and the paper's tables, against values
computed by hand on the fixture store of tests/audit_fixtures.py."""

from __future__ import annotations

import csv
import datetime as dt
import random
from collections import defaultdict

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from audit_fixtures import BLOCKS, CLASSES, fixture_rows, make_row, write_store

from biasmap.audit import metrics
from biasmap.audit.schema import SCHEMA


@pytest.fixture
def store(tmp_path):
    write_store(tmp_path, fixture_rows(), parts=3)
    return metrics.read_store(tmp_path)


def _group(groups, axis, method, profession, lambda_=0.0):
    (found,) = [
        g
        for g in groups
        if (g.axis, g.method, g.profession, g.lambda_) == (axis, method, profession, lambda_)
    ]
    return found


def test_profession_metrics_equal_hand_computation(store):
    groups = metrics.profession_metrics(store.table)
    nurse = _group(groups, "gender", "sd", "nurse")
    # iou 0.4, 0.3, 0.5, 0.2; per-image BIoU means 0.4, 0.3, 0.5, 0.2.
    assert nurse.n_images == 4
    assert nurse.miou == pytest.approx(0.35)
    assert nurse.mbiou == pytest.approx(0.35)
    # Blocks averaged over the 4 images, in the rows' UNet order.
    assert list(nurse.block_biou) == BLOCKS
    assert [nurse.block_biou[b] for b in BLOCKS] == pytest.approx([0.45, 0.25, 0.2, 0.5])
    # Labels female x3, male x1: p = (1/4, 3/4).
    assert nurse.class_frequencies == pytest.approx({"male": 0.25, "female": 0.75})
    assert nurse.rd == pytest.approx(0.5)

    chef = _group(groups, "gender", "sd", "chef")
    assert chef.miou == pytest.approx(0.25)
    assert chef.mbiou == pytest.approx((0.15 + 0.2 + 0.3 + 0.35) / 4)
    # One image has no CLIP label: frequencies are over the 3 labelled images.
    assert chef.class_frequencies == pytest.approx({"male": 2 / 3, "female": 1 / 3})
    assert chef.rd == pytest.approx(1 / 3)

    assert _group(groups, "gender", "fd", "nurse").rd == pytest.approx(0.0)  # F M F M
    assert _group(groups, "gender", "fd", "chef").rd == pytest.approx(0.5)  # M F F F
    assert _group(groups, "gender", "fd", "nurse").miou == pytest.approx(0.375)


def test_rd_counts_classes_that_no_image_received(store):
    groups = metrics.profession_metrics(store.table)
    nurse = _group(groups, "race", "sd", "nurse")  # white x3, asian x1 over 4 classes
    assert nurse.class_frequencies == pytest.approx(
        {"white": 0.75, "black": 0.0, "hispanic": 0.0, "asian": 0.25}
    )
    assert nurse.rd == pytest.approx(0.75)  # max 0.75 - min 0 (black, hispanic)
    assert _group(groups, "race", "sd", "chef").rd == pytest.approx(1.0)  # all black


def test_pooled_metrics_are_means_over_professions(store):
    pooled = metrics.pooled_metrics(metrics.profession_metrics(store.table))
    sd = _group(pooled, "gender", "sd", None)
    assert (sd.n_images, sd.n_professions) == (8, 2)
    assert sd.miou == pytest.approx((0.35 + 0.25) / 2)
    assert sd.mbiou == pytest.approx((0.35 + 0.25) / 2)
    assert sd.rd == pytest.approx((0.5 + 1 / 3) / 2)
    assert sd.block_biou["down-16"] == pytest.approx((0.45 + 0.35) / 2)
    fd = _group(pooled, "gender", "fd", None)
    assert fd.rd == pytest.approx(0.25)
    assert fd.miou == pytest.approx((0.375 + 0.2) / 2)
    assert _group(pooled, "race", "sd", None).rd == pytest.approx(0.875)


def test_risk_difference_is_max_minus_min():
    assert metrics.risk_difference([0.2, 0.8]) == pytest.approx(0.6)
    assert metrics.risk_difference([0.5, 0.1, 0.3, 0.1]) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="at least one class"):
        metrics.risk_difference([])


def test_aggregation_matches_a_plain_python_groupby(tmp_path):
    """Random store, 3 parts: every group's values equal a direct computation over the rows."""
    rng = random.Random(7)
    rows = []
    for axis in ("gender", "race"):
        for profession in ("doctor", "pilot", "waiter"):
            for method, lambda_ in (("sd", 0), ("biasmap", 50), ("biasmap", 150)):
                for seed in range(rng.randint(2, 6)):
                    biou = [rng.random() for _ in BLOCKS]
                    rows.append(
                        make_row(
                            profession,
                            axis,
                            seed,
                            method,
                            lambda_=lambda_,
                            iou=rng.random(),
                            biou=biou,
                            label=rng.choice(CLASSES[axis]),
                        )
                    )
    write_store(tmp_path, rows, parts=3)
    groups = metrics.profession_metrics(metrics.read_store(tmp_path).table)
    expected = defaultdict(list)
    for row in rows:
        expected[(row["axis"], row["method"], row["lambda_"], row["profession"])].append(row)
    assert len(groups) == len(expected)
    for group in groups:
        members = expected[(group.axis, group.method, group.lambda_, group.profession)]
        n = len(members)
        assert group.n_images == n
        assert group.miou == pytest.approx(sum(r["iou"] for r in members) / n)
        assert group.mbiou == pytest.approx(sum(r["biou_mean"] for r in members) / n)
        for index, block in enumerate(BLOCKS):
            mean = sum(r["biou_values"][index] for r in members) / n
            assert group.block_biou[block] == pytest.approx(mean)
        freqs = [sum(r["clip_label"] == c for r in members) / n for c in CLASSES[group.axis]]
        assert group.rd == pytest.approx(max(freqs) - min(freqs))


def test_read_store_keeps_the_newest_row_of_a_duplicated_key(tmp_path):
    rows = fixture_rows()
    write_store(tmp_path, rows, parts=2)
    newer = make_row(
        "nurse",
        "gender",
        3,
        "sd",
        iou=0.6,
        biou=[0.3, 0.1, 0.1, 0.3],
        label="male",
        created_at=dt.datetime(2025, 2, 1, tzinfo=dt.timezone.utc),
    )
    write_store(tmp_path, [newer], parts=1)
    store = metrics.read_store(tmp_path)
    assert store.num_rows == len(rows)
    assert store.duplicates_dropped == 1
    nurse = _group(metrics.profession_metrics(store.table), "gender", "sd", "nurse")
    assert nurse.miou == pytest.approx((0.4 + 0.3 + 0.5 + 0.6) / 4)


def test_read_store_reports_and_skips_unreadable_parts(tmp_path):
    write_store(tmp_path, fixture_rows(), parts=2)
    parts = tmp_path / "parts"
    (parts / "part-99999.parquet").write_bytes(b"PAR1 this is not parquet")
    (parts / ".part-00007.parquet.tmp.parquet").write_bytes(b"half written")  # hidden: ignored
    wrong = pa.table({"profession": ["nurse"], "iou": [0.1]})
    pq.write_table(wrong, parts / "part-99998.parquet")
    store = metrics.read_store(tmp_path)
    skipped = dict(store.skipped_parts)
    assert set(skipped) == {"part-99999.parquet", "part-99998.parquet"}
    assert "missing" in skipped["part-99998.parquet"]
    assert store.part_files == 4
    assert store.num_rows == len(fixture_rows())


def test_read_store_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="parts"):
        metrics.read_store(tmp_path)
    (tmp_path / "parts").mkdir()
    with pytest.raises(ValueError, match="no readable part files"):
        metrics.read_store(tmp_path)
    write_store(tmp_path, fixture_rows(), parts=1)
    with pytest.raises(ValueError, match="config_hash 'nope' is not in the store"):
        metrics.read_store(tmp_path, config_hash="nope")


def test_bad_rows_give_clear_errors(tmp_path):
    row = make_row("nurse", "gender", 0, "sd", iou=0.1, biou=[0.1] * 4, label="male")
    row["biou_values"] = [0.1, 0.2]
    write_store(tmp_path / "a", [row], parts=1)
    with pytest.raises(ValueError, match="biou_blocks and biou_values differ in length"):
        metrics.read_store(tmp_path / "a")
    row = make_row("nurse", "gender", 0, "sd", iou=0.1, biou=[0.1] * 4, label="nonbinary")
    write_store(tmp_path / "b", [row], parts=1)
    with pytest.raises(ValueError, match=r"\['nonbinary'\] that are not among"):
        metrics.profession_metrics(metrics.read_store(tmp_path / "b").table)


def test_several_config_hashes_count_each_slot_once(tmp_path):
    old = make_row("nurse", "gender", 0, "sd", iou=0.9, biou=[0.9] * 4, label="male")
    new = make_row(
        "nurse",
        "gender",
        0,
        "sd",
        iou=0.1,
        biou=[0.1] * 4,
        label="male",
        config_hash="beef02",
        created_at=dt.datetime(2025, 3, 1, tzinfo=dt.timezone.utc),
    )
    write_store(tmp_path, [old, new], parts=2)
    store = metrics.read_store(tmp_path)
    assert store.config_hashes == {"cafe01": 1, "beef02": 1}
    assert store.table.column("iou").to_pylist() == [0.1]
    only_old = metrics.read_store(tmp_path, config_hash="cafe01")
    assert only_old.table.column("iou").to_pylist() == [0.9]


def test_tables_lay_out_the_papers_tables(store):
    per_profession = metrics.profession_metrics(store.table)
    pooled = metrics.pooled_metrics(per_profession)
    fid = {("gender", "fd", 0.0, None): 12.5}
    summary = {t.id: t for t in metrics.summary_tables(pooled, fid)}
    gender = summary["table-summary-gender"]
    assert gender.columns == ["method", "professions", "images", "RD", "mIoU", "mBIoU", "FID"]
    assert [row[0] for row in gender.rows] == ["sd", "biasmap (λ=100)", "biasmap (λ=200)", "fd"]
    assert [cell.value for cell in gender.rows[0][3:6]] == pytest.approx([5 / 12, 0.3, 0.3])
    assert gender.rows[3][6] == 12.5 and gender.rows[0][6] is None
    # Without attached statistics the cells are the bare values.
    assert gender.formatted(gender.rows[0])[3:] == ["0.417", "0.300", "0.300", "–"]
    assert gender.note == metrics.FID_WITHOUT_INTERVAL

    (table,) = [t for t in metrics.profession_tables(per_profession) if t.id.endswith("gender")]
    assert [row[0] for row in table.rows] == ["chef", "nurse"]
    assert table.header_groups == [("", 1), ("mIoU", 4), ("mBIoU", 4), ("RD", 4)]
    assert table.csv_header()[1:3] == ["mIoU / sd", "mIoU / sd_ci_low"]
    assert table.csv_header()[-8:-6] == ["RD / fd", "RD / fd_ci_low"]
    nurse = table.rows[1]
    assert nurse[1].value == pytest.approx(0.35) and nurse[9].value == pytest.approx(0.5)

    swept = metrics.lambda_tables(per_profession, pooled)
    assert {t.id for t in swept} == {
        f"table-lambda-{m}-gender-biasmap" for m in ("miou", "mbiou", "rd", "fid")
    }
    miou = next(t for t in swept if t.id == "table-lambda-miou-gender-biasmap")
    assert miou.columns == ["profession", "λ=100", "λ=200"]
    # nurse sd iou 0.4, 0.3, 0.5, 0.2 shifted down by 0.1 / 0.15.
    assert miou.rows[1][0] == "nurse"
    assert [cell.value for cell in miou.rows[1][1:]] == pytest.approx([0.25, 0.2])
    assert miou.rows[2][0] == "all (mean)"


def test_no_lambda_table_without_a_sweep(tmp_path):
    rows = [r for r in fixture_rows() if r["lambda_"] in (0.0, 100.0)]
    write_store(tmp_path, rows)
    groups = metrics.profession_metrics(metrics.read_store(tmp_path).table)
    assert metrics.lambda_tables(groups, metrics.pooled_metrics(groups)) == []


def test_table_csv_round_trip(tmp_path, store):
    """The CSV contract: per metric column M, M_ci_low, M_ci_high and, on rows compared with sd,
    M_delta, M_delta_ci_low, M_delta_ci_high, M_p and M_p_bh (empty on the sd row)."""
    from biasmap.audit.stats import attach_statistics

    per_profession = metrics.profession_metrics(store.table)
    _, pooled = attach_statistics(
        store.table, per_profession, metrics.pooled_metrics(per_profession)
    )
    table = metrics.summary_tables(pooled)[0]
    suffixes = ["", "_ci_low", "_ci_high", "_delta", "_delta_ci_low", "_delta_ci_high", "_p"]
    expected_header = ["method", "professions", "images"]
    for metric in ("RD", "mIoU", "mBIoU"):
        expected_header += [metric + suffix for suffix in [*suffixes, "_p_bh"]]
    with (table.write_csv(tmp_path / "t.csv")).open() as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == [*expected_header, "FID"]
        written = {row["method"]: row for row in reader}
    sd, biasmap = written["sd"], written["biasmap (λ=100)"]
    assert (sd["images"], float(sd["RD"])) == ("8", pytest.approx(5 / 12))
    assert float(sd["mIoU_ci_low"]) < 0.3 < float(sd["mIoU_ci_high"])
    assert sd["mIoU_delta"] == sd["mIoU_p"] == sd["mIoU_p_bh"] == ""
    estimate = next(g for g in pooled if g.method == "biasmap" and g.lambda_ == 100).estimates
    for metric, name in (("miou", "mIoU"), ("mbiou", "mBIoU"), ("rd", "RD")):
        values = [biasmap[name + suffix] for suffix in [*suffixes, "_p_bh"]]
        assert [float(v) for v in values] == estimate[metric].csv_values()  # full precision
    assert float(biasmap["mIoU_delta"]) == pytest.approx(-0.1)


def test_schema_is_what_the_fixture_writes():
    # The fixture must keep writing the contract's schema, or the tests above prove nothing.
    row = make_row("nurse", "gender", 0, "sd", iou=0.1, biou=[0.1] * 4, label="male")
    assert pa.Table.from_pylist([row], schema=SCHEMA).schema == SCHEMA


# --------------------------------------------------------------------------- CLIP classifier


@pytest.fixture(scope="module")
def tiny_clip_classifier():
    from biasmap.audit.clip import ClipClassifier

    return ClipClassifier("tiny", batch_size=3)


def _random_images(count, seed=0, sizes=((64, 48), (37, 90), (32, 32))):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8))
        for i in range(count)
    ]


GENDER_PROMPTS = ["a photo of a male", "a photo of a female"]
RACE_PROMPTS = [f"a photo of a {c} person" for c in CLASSES["race"]]


def test_clip_classify_gives_probability_rows(tiny_clip_classifier):
    images = _random_images(7)
    probs = tiny_clip_classifier.classify(images, RACE_PROMPTS)
    assert probs.shape == (7, 4) and probs.dtype == torch.float32
    assert torch.allclose(probs.sum(dim=1), torch.ones(7), atol=1e-6)
    assert (probs > 0).all()
    # Not a constant: random-weight CLIP still tells random images apart.
    assert probs.std(dim=0).max() > 1e-4


def test_clip_classify_is_deterministic_and_batch_independent(tiny_clip_classifier):
    from biasmap.audit.clip import ClipClassifier

    images = _random_images(7)
    batched = tiny_clip_classifier.classify(images, GENDER_PROMPTS)  # batches of 3, 3, 1
    one_by_one = torch.cat([tiny_clip_classifier.classify([im], GENDER_PROMPTS) for im in images])
    torch.testing.assert_close(batched, one_by_one, atol=1e-6, rtol=0)
    again = ClipClassifier("tiny", batch_size=7).classify(images, GENDER_PROMPTS)
    torch.testing.assert_close(batched, again, atol=1e-6, rtol=0)
    other_weights = ClipClassifier("tiny", seed=1).classify(images, GENDER_PROMPTS)
    assert not torch.allclose(batched, other_weights)


def test_clip_classify_equals_transformers_clip_forward(tiny_clip_classifier):
    """Independent reference: transformers' own CLIP image processor (its PIL backend) and
    CLIPModel.forward's logits_per_image."""
    processor_module = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
    classifier = tiny_clip_classifier
    images = _random_images(5, seed=3)
    processor = processor_module.CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(classifier.preprocess(images), pixels, atol=1e-6, rtol=0)
    tokens = classifier.tokenizer(
        RACE_PROMPTS, padding="max_length", max_length=77, return_tensors="pt"
    )
    with torch.no_grad():
        logits = classifier.model(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            pixel_values=pixels,
        ).logits_per_image
    expected = logits.softmax(dim=-1)
    torch.testing.assert_close(
        classifier.classify(images, RACE_PROMPTS), expected, atol=1e-5, rtol=0
    )


def test_clip_text_embeddings_are_cached(tiny_clip_classifier):
    first = tiny_clip_classifier.text_embeddings(GENDER_PROMPTS)
    assert tiny_clip_classifier.text_embeddings(GENDER_PROMPTS) is first
    assert first.shape == (2, 16)
    torch.testing.assert_close(first.norm(dim=-1), torch.ones(2))


def test_clip_errors_name_what_is_wrong(tmp_path, tiny_clip_classifier):
    from biasmap.audit.clip import ClipClassifier
    from biasmap.models import ModelNotAvailableError

    with pytest.raises(ModelNotAvailableError, match="does not exist.*tiny"):
        ClipClassifier(str(tmp_path / "no-such-clip"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotAvailableError, match="Could not load the CLIP weights"):
        ClipClassifier(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="at least one prompt"):
        tiny_clip_classifier.classify(_random_images(1), [])
    with pytest.raises(TypeError, match="PIL images"):
        tiny_clip_classifier.classify([torch.zeros(3, 8, 8)], GENDER_PROMPTS)


def test_clip_local_folder_round_trip(tmp_path, tiny_clip_classifier):
    """A folder written by save_pretrained loads through the real from_pretrained path."""
    from biasmap.audit.clip import ClipClassifier

    tiny_clip_classifier.model.save_pretrained(tmp_path / "clip")
    tiny_clip_classifier.tokenizer.save_pretrained(tmp_path / "clip")
    loaded = ClipClassifier(str(tmp_path / "clip"))
    images = _random_images(3)
    torch.testing.assert_close(
        loaded.classify(images, GENDER_PROMPTS),
        tiny_clip_classifier.classify(images, GENDER_PROMPTS),
    )


# --------------------------------------------------------------------------- FID


def _reference_fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance in float64 through the symmetric form: tr sqrt(S1 S2) equals
    tr sqrt(S1^1/2 S2 S1^1/2), whose square root comes from eigh (torchmetrics uses eigvals
    of the non-symmetric product)."""
    real, fake = real.double(), fake.double()
    mu_r, mu_f = real.mean(0), fake.mean(0)
    cov_r = (real - mu_r).T @ (real - mu_r) / (len(real) - 1)
    cov_f = (fake - mu_f).T @ (fake - mu_f) / (len(fake) - 1)
    values, vectors = torch.linalg.eigh(cov_r)
    root_r = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
    middle = torch.linalg.eigvalsh(root_r @ cov_f @ root_r).clamp_min(0).sqrt().sum()
    return float((mu_r - mu_f).square().sum() + cov_r.trace() + cov_f.trace() - 2 * middle)


def _features_by_hand(run_dir, rows, net):
    import numpy as np
    from PIL import Image

    features = {}
    for row in rows:
        pixels = np.asarray(Image.open(run_dir / row["image_path"]).convert("RGB")) / 255.0
        image = torch.tensor(pixels, dtype=torch.float32).permute(2, 0, 1)[None]
        with torch.no_grad():
            features[(row["profession"], row["method"], row["seed"])] = net(image)[0].double()
    return features


@pytest.fixture
def image_run(tmp_path):
    from audit_fixtures import image_store_rows

    rows = image_store_rows(tmp_path)
    # nurse's sd image of seed 9 is absent: nurse's fd / biasmap seed 9 have no pair.
    rows = [r for r in rows if not (r["profession"], r["method"], r["seed"]) == ("nurse", "sd", 9)]
    write_store(tmp_path, rows, parts=2)
    return tmp_path, rows


def test_fid_equals_independent_float64_computation_on_paired_images(image_run):
    from audit_fixtures import tiny_feature_net

    from biasmap.audit.fid import fid_scores

    run_dir, rows = image_run
    net = tiny_feature_net()
    scores = fid_scores(run_dir, metrics.read_store(run_dir).table, feature=net, batch_size=4)
    assert scores.unavailable is None
    features = _features_by_hand(run_dir, rows, net)

    def expected(method, professions):
        real, fake = [], []
        for profession in professions:
            for seed in range(10):
                if (profession, "sd", seed) in features:  # paired on prompt and seed
                    real.append(features[(profession, "sd", seed)])
                    fake.append(features[(profession, method, seed)])
        return _reference_fid(torch.stack(real), torch.stack(fake)), len(real)

    for method, lambda_ in (("fd", 0.0), ("biasmap", 100.0)):
        for profession in ("nurse", "chef", None):
            value, pairs = expected(method, [profession] if profession else ["nurse", "chef"])
            key = ("gender", method, lambda_, profession)
            assert scores.pairs[key] == pairs
            assert scores.values[key] == pytest.approx(value, rel=1e-6, abs=1e-9)
    assert scores.pairs[("gender", "fd", 0.0, "nurse")] == 9  # seed 9 has no sd image
    assert ("gender", "sd", 0.0, None) not in scores.values  # the reference itself: no FID
    assert any("no sd image" in note for note in scores.notes)
    # The values differ between methods (the fixture shifts their pixels differently).
    assert scores.values[("gender", "fd", 0.0, None)] != pytest.approx(
        scores.values[("gender", "biasmap", 100.0, None)]
    )


def test_fid_unpaired_seed_would_change_the_value(image_run):
    """The pairing matters: including nurse's unpaired seed 9 gives another number."""
    from audit_fixtures import tiny_feature_net

    from biasmap.audit.fid import fid_scores

    run_dir, rows = image_run
    net = tiny_feature_net()
    features = _features_by_hand(run_dir, rows, net)
    scores = fid_scores(run_dir, metrics.read_store(run_dir).table, feature=net)
    real = torch.stack([features[("nurse", "sd", s)] for s in range(9)])
    all_fake = torch.stack([features[("nurse", "fd", s)] for s in range(10)])
    wrong = _reference_fid(real, all_fake)
    assert scores.values[("gender", "fd", 0.0, "nurse")] != pytest.approx(wrong, rel=1e-6)


def test_fid_is_unavailable_with_the_reason(image_run, tmp_path):
    from biasmap.audit.fid import fid_scores

    run_dir, rows = image_run
    table = metrics.read_store(run_dir).table
    none = fid_scores(run_dir, table)
    assert none.values == {} and "no FID Inception weights configured" in none.unavailable
    absent = fid_scores(run_dir, table, weights=tmp_path / "nope.pth")
    assert absent.values == {} and "nope.pth' not found" in absent.unavailable
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a state dict")
    unreadable = fid_scores(run_dir, table, weights=garbage)
    assert "could not read FID Inception weights" in unreadable.unavailable
    no_sd = table.filter(pa.compute.not_equal(table.column("method"), "sd"))
    assert "no 'sd' images" in fid_scores(run_dir, no_sd).unavailable


def test_fid_inception_has_the_reference_architecture():
    from biasmap.audit.fid import FidInceptionV3

    torch.manual_seed(0)
    net = FidInceptionV3().eval()
    # torchvision documents 27,161,264 parameters for Inception-v3 with its auxiliary head
    # (3,326,696) and 1000-way classifier (2,049,000); the feature network is the rest.
    assert sum(p.numel() for p in net.parameters()) == 27_161_264 - 3_326_696 - 2_049_000
    state = net.state_dict()
    assert state["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    assert state["Mixed_6e.branch7x7dbl_5.conv.weight"].shape == (192, 192, 1, 7)
    assert state["Conv2d_1a_3x3.bn.running_var"].shape == (32,)
    # One forward (any input size is resized to 299): 2048 non-negative pooled ReLU features.
    with torch.no_grad():
        features = net(torch.rand(1, 3, 40, 56))
    assert features.shape == (1, 2048) and (features >= 0).all() and features.max() > 0


def test_fid_inception_loads_reference_style_weight_files(tmp_path):
    from safetensors.torch import save_file

    from biasmap.audit.fid import FidInceptionV3, FidUnavailableError, load_fid_inception

    torch.manual_seed(0)
    source = FidInceptionV3()
    for module in source.modules():  # BatchNorm statistics are buffers: they must load too
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    state = dict(source.state_dict())
    # The reference file also holds the 1008-way classifier, which FID does not use.
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    torch.save(state, tmp_path / "pt_inception.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "inception.safetensors")
    expected = source.state_dict()
    for name in ("pt_inception.pth", "inception.safetensors"):
        loaded = load_fid_inception(tmp_path / name)
        assert not loaded.training
        got = loaded.state_dict()
        assert set(got) == set(expected)
        for key, value in expected.items():
            assert torch.equal(got[key], value), (name, key)
    del state["Mixed_5b.branch1x1.conv.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(FidUnavailableError, match=r"1 missing keys \['Mixed_5b.branch1x1"):
        load_fid_inception(tmp_path / "partial.pth")
    state["Mixed_5b.branch1x1.conv.weight"] = torch.zeros(64, 192, 3, 3)  # wrong shape
    torch.save(state, tmp_path / "misshapen.pth")
    with pytest.raises(FidUnavailableError, match="does not fit"):
        load_fid_inception(tmp_path / "misshapen.pth")
