"""SIGINT and SIGTERM end a real `rayseg` run cleanly, and training resumes past a bad checkpoint.

Each run is the installed `rayseg` script in a session of its own, with this module's private
RAY_TMPDIR and a tag in its environment that every Ray process it starts inherits, so a process
that left the group is still found. SIGINT goes to the whole group, as a terminal's Ctrl-C does;
SIGTERM to the leader alone, as `kill PID` (or a job scheduler) does. A clean stop is: exit
128 + signal, the "interrupted" line last, no traceback, and nothing of the run still alive.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import _processes_with_env, group_members
from mask_data import write_masks
from tiny_coco import write_big_coco

from rayseg import cli, signals
from rayseg.errors import Interrupted
from rayseg.progress import Progress

TAG = "RAYSEG_TEST_RUN"
BIN = Path(sys.executable).with_name("rayseg")
RAYSEG = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "rayseg"]
NUM_IMAGES = 96


class Run:
    """One `rayseg` process: its log, and what is left of it once it has exited."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log, self.tag = log, uuid.uuid4().hex
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [*RAYSEG, *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, TAG: self.tag},
            )

    def alive(self) -> list[int]:
        """Live processes of the run: its group, and any that carry its tag."""
        found = set(group_members(self.proc.pid)) | set(_processes_with_env(TAG, self.tag))
        return sorted(found - {os.getpid()})

    def wait_for(self, ready: Callable[[], bool], *, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            assert self.proc.poll() is None, f"exited first:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"timed out:\n{self.text()[-3000:]}"
            time.sleep(0.05)

    def finish(self, *, timeout: float = 240) -> tuple[int, list[str], list[str]]:
        """(exit status, output lines, command lines of processes alive 10 s after it exited:
        Ray's own take a second or two, longer on a busy machine)."""
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [command_line(pid) for pid in self.alive()]
        for pid in self.alive():  # nothing of a failed test outlives it
            os.kill(pid, signal.SIGKILL)
        return rc, [ln for ln in self.text().splitlines() if ln.strip()], left

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return f"pid {pid} (gone)"


def assert_stopped_cleanly(
    result: tuple[int, list[str], list[str]], *, status: int, line: str
) -> None:
    rc, lines, left = result
    text = "\n".join(lines)
    assert rc == status, text[-3000:]
    assert lines and re.fullmatch(line, lines[-1]), text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert left == [], f"still running after rayseg exited: {left}"


@pytest.fixture(scope="module")
def coco(tmp_path_factory, ray_tmpdir) -> Path:
    return write_big_coco(tmp_path_factory.mktemp("coco") / "instances.json", NUM_IMAGES)


def masks_args(coco: Path, out: Path) -> list[str]:
    return ["masks", "--annotations", str(coco), "--out", str(out), "--shard-size", "8"]


MASKS_LINE = (
    rf"rayseg masks: interrupted( after \d+ of {NUM_IMAGES} images)?; "
    "rerun the same command to resume"
)


def test_sigterm_mid_run_stops_masks_with_one_line(coco, tmp_path):
    out = tmp_path / "out"
    run = Run([*masks_args(coco, out), "--num-cpus", "2"], tmp_path / "masks.log")
    run.wait_for(lambda: any((out / "_shards").glob("shard-*.json")))
    os.kill(run.proc.pid, signal.SIGTERM)
    assert_stopped_cleanly(run.finish(), status=143, line=MASKS_LINE)
    assert not (out / "manifest.json").exists()


def test_ctrl_c_during_ray_start_up_leaves_nothing_running(coco, tmp_path):
    run = Run([*masks_args(coco, tmp_path / "out"), "--num-cpus", "2"], tmp_path / "masks.log")
    # The raylet has started its agents: ray.init is under way.
    run.wait_for(lambda: any("RuntimeEnvAgent" in command_line(p) for p in run.alive()))
    os.killpg(run.proc.pid, signal.SIGINT)
    assert_stopped_cleanly(run.finish(), status=130, line=MASKS_LINE)


# ---- training ----------------------------------------------------------------------------


def train_args(data: Path, out: Path) -> list[str]:
    return [
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--epochs",
        "3",
        "--batch-size",
        "4",
        "--crop-size",
        "48",
        "--num-workers",
        "1",
        "--num-cpus",
        "2",
        "--max-failures",
        "0",
    ]


@pytest.fixture(scope="module")
def interrupted_training(tmp_path_factory, ray_tmpdir):
    """`rayseg train --epochs 3` stopped by Ctrl-C once epoch 2's checkpoint appears."""
    root = tmp_path_factory.mktemp("train")
    data, out = write_masks(root / "masks", 24), root / "run"
    run = Run(train_args(data, out), root / "train.log")
    run.wait_for(lambda: (out / "epoch_0002" / "checkpoint.pt").exists())
    os.killpg(run.proc.pid, signal.SIGINT)
    return data, out, run.finish()


@pytest.mark.slow
def test_ctrl_c_mid_training_stops_with_one_line(interrupted_training):
    _, out, result = interrupted_training
    line = (
        r"rayseg train: interrupted after \d+ of 5 steps \(epoch [123]/3\); "
        "rerun the same command to resume"
    )
    assert_stopped_cleanly(result, status=130, line=line)
    assert not (out / "model.pt").exists()


@pytest.mark.slow
def test_resume_skips_a_truncated_newest_checkpoint(interrupted_training, tmp_path):
    data, out, _ = interrupted_training
    names = sorted(p.parent.name for p in out.glob("epoch_*/checkpoint.pt"))
    newest, previous = names[-1], names[-2]
    cut = out / newest / "checkpoint.pt"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])

    rc, lines, left = Run(train_args(data, out), tmp_path / "resume.log").finish()
    text = "\n".join(lines)
    assert rc == 0, text[-3000:]
    (skip,) = [ln for ln in lines if ln.startswith("skipping checkpoint")] or [text[-3000:]]
    why = r"\(checkpoint\.pt does not load: .+\)"
    assert re.fullmatch(rf"skipping checkpoint {newest} {why}; resuming from {previous}", skip)
    done = int(previous.rpartition("_")[2])
    assert f"resuming from {out / previous}: {done} of 3 epochs done" in lines
    assert "Traceback" not in text, text[-3000:]  # no retries, nothing at shutdown
    assert left == [], f"still running after rayseg exited: {left}"
    epochs = [json.loads(ln)["epoch"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]
    assert json.loads((out / "summary.json").read_text())["epochs"] == 3


# ---- in-process: the pieces ----------------------------------------------------------------


def test_a_signal_raises_interrupted_and_the_old_handler_comes_back():
    before = signal.getsignal(signal.SIGTERM)
    with signals.stop_on_signals():
        with pytest.raises(Interrupted) as caught:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at the next bytecode
        assert caught.value.exit_code == 143 and signals.stop_signal() == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGINT)  # already stopping: ignored, not raised again
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_signal_inside_ray_init_waits_until_it_returns():
    import ray._private.utils as ray_utils

    ran_on = []
    with signals.stop_on_signals():
        with pytest.raises(Interrupted) as caught:
            with signals.signals_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                # What ray.init does first: its own SIGTERM handler, sys.exit(15).
                ray_utils.set_sigterm_handler(lambda signum, frame: sys.exit(signum))
                os.kill(os.getpid(), signal.SIGTERM)
                ran_on.append("the rest of ray.init")
        assert caught.value.signum == signal.SIGINT and ran_on == ["the rest of ray.init"]
        assert signal.getsignal(signal.SIGTERM) is signals._on_signal


_MONITOR_FIRST = """
import ray
from rayseg import raycompat, rayconnect
rayconnect.connect_ray(None, 1)
processes = ray._private.worker._global_node.all_processes
monitor = processes["monitor"][0].process
others = [i.process for kind, infos in processes.items() if kind != "monitor" for i in infos]
raycompat.end_autoscaler_monitor()
print(monitor.poll() is not None, bool(others) and all(p.poll() is None for p in others))
rayconnect.stop_ray()
print(all(p.poll() is not None for p in others))
"""


def test_stopping_our_ray_ends_its_autoscaler_monitor_first(ray_tmpdir):
    # Ray's shutdown would stop the GCS first and then wait a second on the monitor; this also
    # fails if Ray's private process table changes shape (end_autoscaler_monitor would no-op).
    done = subprocess.run(
        [sys.executable, "-c", _MONITOR_FIRST], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["True", "True", "True"], done.stdout + done.stderr[-3000:]


def test_interrupted_line_says_how_far_the_command_got():
    Progress.latest = None
    assert cli.interrupted_line("predict") == (
        "rayseg predict: interrupted; rerun the same command to start over"
    )
    progress = Progress(5, "epoch 2/3", unit="steps", interval=3600.0)
    progress.update(3)
    assert cli.interrupted_line("train") == (
        "rayseg train: interrupted after 3 of 5 steps (epoch 2/3); rerun the same command to resume"
    )
    Progress(40, "masks", interval=3600.0).update(16)
    assert cli.interrupted_line("masks") == (
        "rayseg masks: interrupted after 16 of 40 images; rerun the same command to resume"
    )
    Progress.latest = None
