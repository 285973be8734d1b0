"""Bad input, run folders, concurrency and recovery (issue 13).

Refusals run the real entry point, `biasmap.cli.main`, in this process (a subprocess per case
would cost seconds each); one subprocess checks a refusal end to end, and the concurrency test
starts two real `biasmap audit` processes on one folder.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

pytest.importorskip("diffusers")

from audit_fixtures import small_config as audit_small_config  # noqa: E402
from audit_fixtures import write_yaml  # noqa: E402

from biasmap.audit.config import ConfigError, load_config  # noqa: E402
from biasmap.audit.lock import LOCK_FILE, RunLock, RunLockedError  # noqa: E402
from biasmap.audit.runner import (  # noqa: E402
    WorkItem,
    image_path,
    prepare_run_dir,
    run_audit,
)
from biasmap.audit.schema import KEY_COLUMNS  # noqa: E402
from biasmap.audit.store import ResultsStore  # noqa: E402
from biasmap.cli import main  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPT = "A photo of the face of a firefighter"
ATTRIBUTION = PROMPT + " and gender"


def small_config(output: Path, **fields) -> dict:
    """A grid of seconds on one CPU thread: tiny model, 2 steps, no CLIP, sd only."""
    defaults = {"seeds": "0-1", "methods": ["sd"], "batch_size": 1}
    return audit_small_config(output, **{**defaults, **fields})


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `biasmap ARGS` run through the entry point."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def assert_refused(result: tuple[int, str, str], *expected: str) -> str:
    """Exit 2, one line on stderr starting 'error:' that holds `expected`, no traceback."""
    code, out, err = result
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), lines[0]
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert "Traceback" not in out + err
    return lines[0]


# --------------------------------------------------------------------- generate and maps


@pytest.mark.parametrize(
    "options,expected",
    [
        (["--method", "bogus"], ["--method", "unknown method", "fd+biasmap"]),
        (["--axis", "age"], ["--axis", "'age'", "gender", "race"]),
        (["--preset", "fast"], ["--preset", "paper, official"]),
        (["--dtype", "fp64"], ["--dtype", "fp32, fp16, bf16"]),
        (["--q", "1"], ["--q", "strictly between 0 and 1"]),
        (["--q", "0"], ["--q", "strictly between 0 and 1"]),
        (["--seeds", "3-1"], ["--seeds", "'3-1' is empty"]),
        (["--seeds", "0,0"], ["--seeds", "repeat [0]"]),
        (["--seeds", ""], ["--seeds", "cannot read ''"]),
        (["--steps", "0"], ["'--steps'", "greater than or equal to 1"]),
        (["--model", "./no-such-folder"], ["--model", "does not exist"]),
        (["--method", "biasmap@down-64+up-64"], ["--method", "lacks", "down-16"]),
        (["--model", "tiny-flux", "--method", "fd"], ["--method", "Flux.1 (MM-DiT)", "hard"]),
        (["--model", "tiny-sd3", "--method", "biasmap@up-8"], ["--method", "joint-2"]),
        (["--device", "gpu0"], ["--device", "'cuda:<index>'"]),
    ],
)
def test_generate_refuses_bad_input_before_loading(options, expected, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["generate", "--profession", "doctor", "--steps", "1", "--out", out, *options]
    assert_refused(run_cli(args, capsys), *expected)
    assert not out.exists()


def test_a_folder_that_is_no_pipeline_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["generate", "--profession", "doctor", "--model", tmp_path, "--out", out]
    assert_refused(run_cli(args, capsys), "--model", "model_index.json")
    assert not out.exists()


MAPS = ["maps", "--prompt", PROMPT, "--attribution", ATTRIBUTION, "--steps", "1"]


@pytest.mark.parametrize(
    "options,expected",
    [
        (["--concepts", "gender", "--height", "64"], ["--height", "--width together"]),
        (["--concepts", "gender,firefighter", "--q", "1.0"], ["--q", "strictly between"]),
        (["--concepts", "gender,firefighter", "--cfg-half", "both"], ["--cfg-half", "cond"]),
        (["--concepts", "gender,firefighter", "--softmax-over", "x"], ["--softmax-over"]),
        (["--concepts", "gender,firefighter", "--dtype", "fp64"], ["--dtype", "bf16"]),
        (["--concepts", "gender"], ["--concepts", "exactly two"]),
        (["--concepts", "gender,firefighter", "--model", "./nope"], ["--model", "not exist"]),
    ],
)
def test_maps_refuses_bad_input_before_loading(options, expected, tmp_path, capsys):
    out = tmp_path / "out"
    args = [*MAPS, *options, "--out", out]
    if "--height" in options:
        args[args.index("--concepts") + 1] = "gender,firefighter"
    assert_refused(run_cli(args, capsys), *expected)
    assert not out.exists()


def test_maps_names_the_prompt_tokens_of_an_absent_or_cut_off_concept(tmp_path, capsys):
    out = tmp_path / "out"
    absent = [*MAPS, "--concepts", "race,firefighter", "--out", out]
    line = assert_refused(run_cli(absent, capsys), "--concepts", "'race'", "Its tokens are")
    assert "'gender'" in line and "'firefighter'" in line
    long_prompt = PROMPT + " and a" * 40 + " gender"
    cut = ["maps", "--prompt", PROMPT, "--attribution", long_prompt, "--steps", "1"]
    cut += ["--concepts", "gender,firefighter", "--out", out]
    assert_refused(run_cli(cut, capsys), "--concepts", "truncated")
    assert not out.exists()


def test_a_refusal_in_a_real_process_is_one_line(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "biasmap", "generate", "--profession", "doctor"]
    command += ["--model", str(tmp_path / "missing"), "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env=_environment())
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: --model: model folder")
    assert not out.exists()


# --------------------------------------------------------------------- audit configs


@pytest.mark.parametrize(
    "override,expected",
    [
        ("seeds=3-1", "'3-1' is empty"),
        ("seeds='0,0'", "repeat [0]"),
        ("seeds=''", "cannot read ''"),
        ("methods=[bogus]", "fd+biasmap"),
        ("methods=['biasmap@down-64+up-64']", "down-16"),
        ("q=1.0", "q: "),
        ("dtype=fp64", "fp16"),
        ("preset=fast", "official"),
    ],
)
def test_audit_refuses_what_generate_refuses(override, expected, tmp_path, capsys):
    run = tmp_path / "run"
    path = write_yaml(tmp_path / "c.yaml", small_config(run))
    code, out, err = run_cli(["audit", "--config", path, override, "--no-progress"], capsys)
    assert code == 2 and expected in err and "Traceback" not in out + err
    assert err.startswith("error: invalid audit config")
    assert not run.exists()


def test_yaml_syntax_error_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("model: tiny\nsteps: 2\nmethods: [sd, biasmap\nq: 0.7\n")
    with pytest.raises(ConfigError, match=r"bad.yaml, line \d+: YAML syntax error"):
        load_config(path)
    line = assert_refused(run_cli(["audit", "--config", path], capsys), "bad.yaml, line")
    assert "YAML syntax error" in line


def test_empty_config_is_an_error_not_the_default_grid(tmp_path, capsys, monkeypatch):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing yet\n")
    monkeypatch.chdir(tmp_path)  # the default output would be runs/audit here
    assert_refused(run_cli(["audit", "--config", path], capsys), "empty.yaml", "empty")
    assert not (tmp_path / "runs").exists()


def test_block_methods_follow_the_model(tmp_path):
    config = load_config(None, [f"output={tmp_path}", "methods=['biasmap@down-16+up-16']"])
    assert config.methods == ["biasmap@down-16+up-16"]
    with pytest.raises(ConfigError, match="lacks; its cross-attention blocks"):
        load_config(None, ["methods=['biasmap@down-16']", "image_size=64"])  # latent 8: down-8


def test_a_failed_first_start_can_be_rerun_with_a_corrected_config(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", small_config(tmp_path / "run"))
    prepare_run_dir(load_config(path))  # a start that died before committing a batch
    corrected = load_config(path, ["steps=3"])
    prepare_run_dir(corrected)  # no results to protect: no refusal
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["config_hash"] == corrected.config_hash


# --------------------------------------------------------------------- run folders


def test_image_paths_stay_inside_and_never_collide():
    professions = ["doctor", "a/b", "a~2fb", "..", "../../etc", ".hidden", "médecin", "a b", ""]
    lambdas = [100.0, 1e-7, 1.00000001e-7, 0.1, math.nextafter(0.1, 1.0)]
    paths = {}
    for profession in professions:
        for lam in lambdas:
            item = WorkItem(profession, "gender", "biasmap", lam, 0)
            path = image_path(item)
            parts = Path(path).parts
            assert parts[0] == "images" and len(parts) == 6, path
            assert not any(part in ("", ".", "..") or part.startswith(".") for part in parts)
            paths.setdefault(path, set()).add((profession, lam))
    assert all(len(keys) == 1 for keys in paths.values())
    assert len(paths) == len(professions) * len(set(lambdas))
    readable = WorkItem("doctor", "gender", "fd+biasmap", 100.0, 3)
    assert image_path(readable) == "images/doctor/gender/fd+biasmap/lambda-100/seed-3.png"
    long_name = image_path(WorkItem("x" * 400, "gender", "sd", 0.0, 0))
    assert max(len(part) for part in Path(long_name).parts) <= 120


# --------------------------------------------------------------------- lock


def test_lock_names_its_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
    with RunLock(tmp_path) as first:
        assert first.stale is None
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()} on host"):
            RunLock(tmp_path).acquire()
    # A holder killed with its lock: the record stays, the kernel lock is gone.
    dead = {"pid": 999999999, "host": socket.gethostname(), "started": time.time()}
    (tmp_path / LOCK_FILE).write_text(json.dumps(dead))
    with RunLock(tmp_path) as taker:
        assert taker.stale == dead
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released: emptied, not deleted


def _environment() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def raw_keys(store: ResultsStore) -> list[tuple]:
    keys = []
    for path in store.part_files():
        table = pq.read_table(path, columns=list(KEY_COLUMNS))
        keys += zip(*(table.column(name).to_pylist() for name in KEY_COLUMNS), strict=True)
    return keys


def test_two_audits_on_one_folder_never_duplicate_a_key(tmp_path, capsys):
    run = tmp_path / "run"
    path = write_yaml(tmp_path / "c.yaml", small_config(run, seeds="0-7"))
    command = [sys.executable, "-m", "biasmap", "audit", "--config", str(path), "--no-progress"]
    # Before the first batch: report says so and succeeds.
    first = subprocess.Popen(command, env=_environment(), stdout=subprocess.PIPE, text=True)
    store = ResultsStore(run)
    deadline = time.monotonic() + 120
    while not (run / LOCK_FILE).is_file() or not (run / LOCK_FILE).read_text():
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    if not store.part_files():
        code, out, _ = run_cli(["report", run], capsys)
        assert code == 0 and "no results" in out
    second = subprocess.run(command, env=_environment(), capture_output=True, text=True)
    first_was_running = first.poll() is None
    first_out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, first_out
    if first_was_running:  # the second started and ended while the first held the folder
        assert second.returncode == 2, second.stdout + second.stderr
        assert second.stderr.startswith(f"error: {run} is in use by another audit (pid ")
        assert f"pid {first.pid} on host {socket.gethostname()}" in second.stderr
    else:  # the first finished first: the second found everything done
        assert second.returncode == 0 and "0 image(s) generated" in second.stdout
    keys = raw_keys(store)
    assert len(keys) == len(set(keys)) == 8


# --------------------------------------------------------------------- nothing lost


def test_resume_regenerates_lost_images_and_cleans_killed_writers_files(
    tmp_path, capsys, monkeypatch
):
    path = write_yaml(tmp_path / "c.yaml", small_config(tmp_path / "run", seeds="0-2"))
    config = load_config(path)
    written = []
    real_write_table = pq.write_table
    monkeypatch.setattr(
        pq,
        "write_table",
        lambda table, where, **kw: (
            written.append(str(where)),
            real_write_table(table, where, **kw),
        ),
    )
    run_audit(config, classifier_factory=None, progress=False)
    # A part's temporary name must not match a `parts/*.parquet` glob.
    assert written and not any(name.endswith(".parquet") for name in written)
    store = ResultsStore(config.output)
    rows = store.read_table().to_pylist()
    run = Path(config.output)
    (run / rows[0]["image_path"]).unlink()  # missing
    (run / rows[1]["image_path"]).write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # unreadable

    def key(row: dict) -> tuple:
        return tuple(row[name] for name in KEY_COLUMNS)

    # One part per image (batch_size 1): corrupt the third image's part.
    corrupt = next(part for part in store.part_files() if raw_keys_of(part) == [key(rows[2])])
    corrupt.write_bytes(b"PAR1 not parquet")
    # What killed writers leave behind.
    (run / "parts" / ".tmp-part-dead.parquet.partial").write_bytes(b"half a part")
    stale_png = run / Path(rows[0]["image_path"]).parent / ".tmp-dead-seed-0.png.partial"
    stale_png.write_bytes(b"half a png")

    code, out, err = run_cli(["audit", "--config", path, "--no-progress"], capsys)
    assert code == 0, err
    assert err.count("corrupt part") == 1  # reported once, not by a warning and a summary
    assert err.count("temporary file") == 1 and "removed 2 temporary file(s)" in err
    assert "2 stored image(s) were missing or unreadable; regenerated" in err
    assert "3 image(s) generated, 0 already present" in out
    keys = raw_keys(store)
    assert len(keys) == len(set(keys)) == 3
    for row in store.read_table().to_pylist():
        with Image.open(run / row["image_path"]) as image:
            image.verify()
    assert not stale_png.exists() and not list((run / "parts").glob(".tmp-*"))


def raw_keys_of(path: Path) -> list[tuple]:
    table = pq.read_table(path, columns=list(KEY_COLUMNS))
    return list(zip(*(table.column(name).to_pylist() for name in KEY_COLUMNS), strict=True))
