"""The GPU check kit's dry run on a CPU: every part runs (tests/test_gpu.py collected, the step benchmarks of both
U-Net families and the plain-loop baseline, the profile, the latent 256 recipe precomputed and trained through
`accelerate launch`), and the report is written. On a GPU the same command measures for real."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_writes_its_report(tmp_path):
    res = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "run", "--dry-run", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] and report["test_gpu"]["returncode"] in (0, 5)  # skipped without CUDA (5: none ran)
    steps = report["steps"]
    assert not [r for r in steps if "error" in r], steps
    drivers = {(r["case"], r["driver"]) for r in steps}
    assert len(drivers) == 3  # the own U-Net; SD's through this project and through the plain loop
    assert all(r["images_per_s"] > 0 and r["gflops_per_image"] > 0 for r in steps)
    assert report["recipe"]["steps"] == 5 and report["recipe"]["images_per_s"] > 0
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| case | driver |" in md and "latent256.yaml" in md
    assert (tmp_path / "profile_sd256.txt").read_text().count("\n") > 5


def test_gpu_check_help_and_pack_size_guard():
    res = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0 and "pack" in res.stdout and "run" in res.stdout
