"""rayseg.workerlines without Ray: a worker's marked lines and progress, as the driver shows."""

from __future__ import annotations

import io
import json
import sys

from rayseg import workerlines


class NotATerminal(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_step_reporter_throttles_but_always_reports_the_last_step(monkeypatch):
    stdout = io.StringIO()
    monkeypatch.setattr(sys, "__stdout__", stdout)
    reporter = workerlines.StepReporter("epoch 1/2", 3, interval=3600.0)
    due = [reporter.due(done) for done in (1, 2, 3)]
    assert due == [True, True, True]  # nothing reported yet; the last step is always due
    reporter.report(1, loss="1.0")
    assert [reporter.due(done) for done in (2, 3)] == [False, True]
    (line,) = stdout.getvalue().splitlines()
    assert line.startswith(workerlines.WORKER_PROGRESS)
    message = json.loads(line[len(workerlines.WORKER_PROGRESS) :])
    assert message == {
        "label": "epoch 1/2",
        "total": 3,
        "unit": "steps",
        "done": 1,
        "postfix": {"loss": "1.0"},
    }


def progress_line(label: str, done: int, total: int) -> str:
    message = {"label": label, "total": total, "unit": "steps", "done": done, "postfix": {}}
    return workerlines.WORKER_PROGRESS + json.dumps(message)


def test_worker_lines_rayseg_shown_bare_ray_only_when_verbose(capsys):
    data = {
        "lines": [
            workerlines.WORKER_LINE + "epoch 1/2  loss 0.5",
            "[2026-01-01 E 1 1] core_worker.cc:2465: Actor ...",
            "RayDeprecationWarning: something",
        ],
        "pid": 7,
        "is_err": False,
    }
    printed = []
    for show_ray in (False, True):
        workerlines.forward_worker_lines(
            data,
            show_ray=show_ray,
            bars=workerlines.WorkerBars(),
            ray_print=lambda d, ignore_prefix: printed.append(d),
        )
    assert capsys.readouterr().out.splitlines() == ["epoch 1/2  loss 0.5"] * 2
    assert len(printed) == 1 and printed[0]["lines"] == data["lines"][1:]


def test_worker_bars_one_progress_per_label():
    out = NotATerminal()
    bars = workerlines.WorkerBars(stream=out)
    bars.show(json.loads(progress_line("epoch 1/2", 2, 4)[len(workerlines.WORKER_PROGRESS) :]))
    first = bars.progress
    assert first is not None and first.done == 2 and first.label == "epoch 1/2"
    bars.show(json.loads(progress_line("epoch 1/2", 3, 4)[len(workerlines.WORKER_PROGRESS) :]))
    assert bars.progress is first and first.done == 3
    bars.show(json.loads(progress_line("epoch 2/2", 1, 4)[len(workerlines.WORKER_PROGRESS) :]))
    assert bars.progress is not first and bars.progress.done == 1
    bars.show(json.loads(progress_line("epoch 2/2", 4, 4)[len(workerlines.WORKER_PROGRESS) :]))
    assert bars.progress is None  # the epoch's last step closes its bar
