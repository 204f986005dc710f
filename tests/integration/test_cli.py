"""The click layer: help on every command, one-line errors, JSON output, exit codes."""

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from ray_inspect.cli import main

COMMANDS = ["synth", "prepare", "train", "calibrate", "scan", "report"]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help(cmd):
    res = CliRunner().invoke(main, [cmd, "--help"])
    assert res.exit_code == 0 and "Usage:" in res.output


def test_missing_source_is_one_line(trained_model, tmp_path):
    res = CliRunner().invoke(main, ["scan", trained_model, str(tmp_path / "nowhere"), str(tmp_path / "out")])
    assert res.exit_code == 2
    err = res.stderr.strip().splitlines()
    assert err[-1].startswith("ray-inspect: error:") and "nowhere" in err[-1]
    assert "Traceback" not in res.stderr


def test_one_nights_partition_with_bad_inputs_allowed_then_not(trained_model, dataset, tmp_path):
    """SOURCE and OUT with {date}: only that night's partition is scanned, into its own OUT; a corrupt
    file exits 0 under --allow-bad-inputs and 3 without it (the rerun resumes the good images)."""
    images = sorted(Path(dataset, "test").rglob("*.png"))[:4]
    for day, files in (("01", images[:2]), ("02", images[2:])):
        part = tmp_path / "src" / "2026" / "01" / day
        part.mkdir(parents=True)
        for i, f in enumerate(files):
            shutil.copy(f, part / f"{i}.png")
    (tmp_path / "src" / "2026" / "01" / "02" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    args = ["scan", trained_model, str(tmp_path / "src" / "{date:%Y/%m/%d}"),
            str(tmp_path / "out" / "{date}"), "--date", "2026-01-02", "--json"]
    res = CliRunner().invoke(main, [*args, "--allow-bad-inputs"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert (summary["images"], summary["scanned"], summary["failed_by_kind"]) == (3, 2, {"corrupt": 1})
    assert summary["source"] == str(tmp_path / "src" / "2026" / "01" / "02")
    assert "night of 2026-01-02" in res.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["2026-01-02"]
    assert "bad.png" in (tmp_path / "out" / "2026-01-02" / "errors.jsonl").read_text()
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 3 and json.loads(res.stdout)["skipped"] == 2


def test_not_a_model_is_one_line(tmp_path):
    res = CliRunner().invoke(main, ["calibrate", str(tmp_path), str(tmp_path), "--fpr", "0.01"])
    assert res.exit_code == 2 and "not a model directory" in res.stderr


def test_contrast_adaptation_without_feature_normalisation_is_one_line(trained_model, dataset):
    res = CliRunner().invoke(main, ["calibrate", trained_model, dataset, "--fpr", "0.01",
                                    "--normalise", "position", "--adapt-contrast", "0.5"])
    assert res.exit_code == 2 and "contrast adaptation works on feature normalisation" in res.stderr
    assert "Traceback" not in res.output + res.stderr


def test_fm_without_weights(patches, tmp_path):
    res = CliRunner().invoke(main, ["train", patches, str(tmp_path / "m"), "--loss", "fm", "--epochs", "1"])
    assert res.exit_code == 2 and "--alexnet-weights" in res.output + res.stderr


def test_synth_scan_report_json(trained_model, dataset, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["synth", str(tmp_path / "s"), "--texture", "twill", "--train", "1",
                               "--test", "4", "--good", "1", "--validation", "1", "--size", "128", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["datasets"][0]["counts"]["test/cut"] == 1
    model = tmp_path / "model"
    shutil.copytree(trained_model, model)
    res = runner.invoke(main, ["calibrate", str(model), dataset, "--fpr", "0.001", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["rule"] == "fpr"
    res = runner.invoke(main, ["scan", str(model), dataset, str(tmp_path / "out"), "--concurrency", "1",
                               "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert (summary["concurrency"], summary["compute_slots"], summary["depth"]) == (1, 1, 2)
    res = runner.invoke(main, ["report", str(tmp_path / "out"), "--json", "--worst", "1"])
    data = json.loads(res.stdout)
    assert res.exit_code == 0 and {"pixel_auroc", "au_pro", "image_auroc"} <= set(data)
    assert all(0 <= data[k] <= 1 for k in ("pixel_auroc", "au_pro", "image_auroc"))
    res = runner.invoke(main, ["report", str(tmp_path / "out")])
    assert "pixel AUROC" in res.stdout and "AU-PRO" in res.stdout


def test_training_failure_cause_is_the_first_failed_workers_exception():
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    from ray_inspect.cli import _training_failure

    zstd = RuntimeError("Zstd decompression error: invalid input data\n(chunk c/0/0/0/0)")
    failed = WorkerGroupError("two workers failed", {1: OSError("disk full"), 0: zstd})
    assert _training_failure(failed) == "RuntimeError: Zstd decompression error: invalid input data"
    controller = ControllerError(ValueError("bad scaling config"))
    assert _training_failure(controller) == "ValueError: bad scaling config"
    assert _training_failure(ValueError("not a training failure")) is None


def test_training_failure_is_one_line(ray_session, patches, tmp_path):
    broken = tmp_path / "broken.zarr"
    shutil.copytree(patches, broken)
    for chunk in (broken / "c").rglob("*"):
        if chunk.is_file():
            chunk.write_bytes(b"not a zstd frame")       # every chunk unreadable inside the workers
    res = CliRunner().invoke(main, ["train", str(broken), str(tmp_path / "m"), "--epochs", "1", "--storage",
                                    str(tmp_path / "runs"), "--max-failures", "0"])
    assert res.exit_code == 2
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("ray-inspect: error: training failed") and "Error" in last and len(last) < 600
    res = CliRunner().invoke(main, ["train", patches, str(tmp_path / "m"), "--loss", "fm",
                                    "--alexnet-weights", str(tmp_path / "missing.pth")])
    assert res.exit_code == 2 and "missing.pth" in res.stderr and "Traceback" not in res.stderr


RAY_INTERNALS = ("(ScanActor", "(RayTrainWorker", "(TrainController", "PlacementGroupCleaner", "worker.py:",
                 "TrainingReport(", "Checkpoint successfully created", "authentication_token_setup")


@pytest.mark.slow
def test_real_process_exit_3_with_bad_input_a_crashing_decoder_and_a_quiet_terminal(calibrated, dataset,
                                                                                    tmp_path):
    """Exit 3 from the real command: one unreadable image, one whose decoder kills the actor's
    process each time and one whose decoder never returns (tests/helpers/crashing_decoder, in Ray's
    workers only): recorded as ``worker_died`` and ``timeout`` (--image-timeout 3) after
    --max-attempts 2, while the images queued beside them are scanned."""
    import os
    import subprocess
    import sys

    from PIL import Image, PngImagePlugin

    from helpers.crashing_decoder.sitecustomize import HANG_MARKER, MARKER

    src = tmp_path / "src"
    shutil.copytree(f"{dataset}/test/good", src)
    for name, marker in (("crash.png", MARKER), ("hang.png", HANG_MARKER)):
        info = PngImagePlugin.PngInfo()
        info.add_text("comment", marker.decode())
        Image.open(sorted(src.glob("*.png"))[0]).save(src / name, pnginfo=info)
    (src / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    helper = os.path.join(os.path.dirname(__file__), "..", "helpers", "crashing_decoder")
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": os.pathsep.join([helper, *sys.path])}
    r = subprocess.run([sys.executable, "-m", "ray_inspect.cli", "scan", calibrated[0], str(src),
                        str(tmp_path / "out"), "--workers", "1", "--image-timeout", "3",
                        "--max-attempts", "2"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 3, r.stderr[-3000:]
    assert not [line for line in r.stderr.splitlines() if any(s in line for s in RAY_INTERNALS)], r.stderr
    skipped = [line for line in r.stderr.splitlines() if "bad.png" in line]
    assert len(skipped) == 1 and skipped[0].startswith("skipped ") and "Traceback" not in r.stderr
    assert "scan " in r.stderr and "images" in r.stderr                    # the progress line
    assert r.stdout.startswith("images") and "3 failed" in r.stdout        # the final table
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    kinds = sorted((e["key"], e["kind"]) for e in errors)
    assert kinds == [("bad.png", "corrupt"), ("crash.png", "worker_died"), ("hang.png", "timeout")]
    assert "died 2 times" in next(e["reason"] for e in errors if e["kind"] == "worker_died")
    assert "not scanned within 3 s" in next(e["reason"] for e in errors if e["kind"] == "timeout")
    summary = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert summary["scanned"] == len(list(src.glob("*.png"))) - 3 and summary["retried"] >= 3
    assert summary["failed_by_kind"] == {"corrupt": 1, "timeout": 1, "worker_died": 1}
