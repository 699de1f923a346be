"""The real `rayseg predict` command is quiet: only rayseg's own lines reach the terminal.

rayseg's lines start with the command's name (`predict: ...`, also the Progress lines); anything
else is Ray's (warnings, E-level lines of its processes, Ray Data's logs) and shows only with
--verbose. One local Ray per run, in this module's private RAY_TMPDIR.
"""

from __future__ import annotations

import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
from mask_data import write_masks
from tiny_models import PERSON_CAR, save_tiny_model

CLASS_MAP = PERSON_CAR


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("quiet")
    model = root / "model.pt"
    save_tiny_model(str(model))
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        cv2.imwrite(str(images / f"im{i}.png"), rng.integers(0, 256, (40, 48, 3), np.uint8))
    return str(model), str(images)


def foreign_lines(command: str, *args: str) -> tuple[list[str], list[str]]:
    """Run `rayseg <command> ...`; (rayseg's lines, every other non-empty output line)."""
    result = subprocess.run(
        [sys.executable, "-m", "rayseg", command, *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [ln for ln in (result.stdout + result.stderr).splitlines() if ln.strip()]
    ours = [ln for ln in lines if ln.startswith(f"{command}:")]
    return ours, [ln for ln in lines if not ln.startswith(f"{command}:")]


def test_predict_prints_only_its_own_lines(ray_tmpdir, inputs, tmp_path):
    model, images = inputs
    args = ["--checkpoint", model, "--images", images, "--num-cpus", "2"]
    ours, others = foreign_lines("predict", *args, "--out", str(tmp_path / "quiet"))
    assert others == []
    assert any(ln.startswith("predict: 3 of 3 images") for ln in ours), ours
    # The same run with --verbose shows Ray's lines: the count above can see them.
    _, loud = foreign_lines("predict", *args, "--out", str(tmp_path / "loud"), "--verbose")
    assert loud, "expected Ray's own lines with --verbose"


# Ray's own log formats: `2026-12-02 16:33:32,596	INFO streaming_executor.py:215 -- ...`,
# a worker's `(Scorer pid=123) ...`, `E1202 16:33:32.596 core_worker.cc:...`.
RAY_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s|\(\w+ pid=\d+|[EWI]\d{4} \d\d:)")


def test_evaluate_prints_no_ray_lines(ray_tmpdir, inputs, tmp_path):
    model, _ = inputs
    data = write_masks(tmp_path / "masks", 3)
    args = ["--checkpoint", model, "--data", str(data), "--num-cpus", "2"]
    ours, others = foreign_lines("evaluate", *args, "--out", str(tmp_path / "eval"))
    assert any(ln.startswith("evaluate: wrote") for ln in ours), ours
    # Its other lines are its IoU table; none is Ray's (Ray Data's count() used to log 4).
    assert [ln for ln in others if RAY_LINE.match(ln)] == [], others
    assert any(ln.startswith("mIoU") for ln in others), others
