"""Nothing outside its own (issue 21): reads stay in --images-dir, writes stay in OUT and never
follow a link rayseg did not make, nothing runs from a loaded file, rayseg removes only its own.

Each test is a case that failed on the code before issue 21.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from rayseg import checkpoint, models, storage
from rayseg.cli import main
from rayseg.errors import RaysegError


class Payload:
    """A pickle that, if unpickled with code allowed, creates the folder `path`."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def payload_file(path: Path, ran: Path, **extra) -> Path:
    torch.save({"format": checkpoint.EXPORT_FORMAT, "state_dict": Payload(ran), **extra}, path)
    return path


# ---- no code runs from a loaded file -----------------------------------------------------------


@pytest.fixture
def no_weights_only_env(monkeypatch):
    """Some clusters set this; torch then unpickles anything where a call leaves it implicit."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")


def test_model_file_payload_is_refused_despite_the_env_override(tmp_path, no_weights_only_env):
    ran = tmp_path / "ran"
    evil = payload_file(tmp_path / "evil.pt", ran)
    with pytest.raises(RaysegError) as e:
        checkpoint.read_record(storage.locate(str(evil)))
    assert not ran.exists()
    message = str(e.value)
    assert message.startswith(f"{evil}: refused") and "\n" not in message
    assert "weights_only" not in message and "posix.mkdir" in message


def test_weights_payload_is_refused_despite_the_env_override(tmp_path, no_weights_only_env):
    ran = tmp_path / "ran"
    evil = payload_file(tmp_path / "evil.pt", ran)
    with pytest.raises(RaysegError, match="evil.pt: refused"):
        models._read_state_dict(str(evil))
    assert not ran.exists()


def test_predict_with_a_payload_checkpoint_is_one_line_exit_2(
    tmp_path, no_weights_only_env, capsys
):
    ran = tmp_path / "ran"
    evil = payload_file(tmp_path / "evil.pt", ran)
    argv = ["predict", "--checkpoint", str(evil), "--images", str(tmp_path), "--out", "o"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert not ran.exists()
    assert err.count("\n") == 1 and "refused" in err and "weights_only" not in err
