"""rayseg.progress: the lines a Progress prints where there is no terminal."""

from __future__ import annotations

import io

from rayseg import progress as P


class NotATerminal(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_progress_prints_periodic_lines_with_eta_and_postfix():
    out = NotATerminal()
    progress = P.Progress(10, "predict", interval=0.0, stream=out)
    progress.update(4, postfix={"loss": "0.5000"})
    progress.close()
    (line,) = out.getvalue().splitlines()
    assert line.startswith("predict: 4/10 images (")
    assert "ETA " in line and line.endswith(", loss 0.5000)")


def test_progress_rate_ignores_the_start_up_before_the_first_update(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(P.time, "monotonic", lambda: now[0])
    out = NotATerminal()
    progress = P.Progress(30, "predict", interval=0.0, stream=out)
    now[0] = 100.0  # start-up: Ray, model loading
    progress.update(1)
    now[0] = 110.0
    progress.update(10)
    first, second = out.getvalue().splitlines()
    assert "ETA ?" in first  # one update: no rate yet
    # 10 images in the 10 s since the first update: 1/s, 19 left (not 11 images in 110 s)
    assert second == "predict: 11/30 images (1.0/s, ETA 19s)"


def test_progress_waits_for_its_interval():
    out = NotATerminal()
    progress = P.Progress(10, "evaluate", interval=3600.0, stream=out)
    progress.update(5)
    assert out.getvalue() == "" and progress.done == 5
