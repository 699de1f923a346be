"""The command line as a user meets it: one clear line and a non-zero status for fatal input."""

import json
import subprocess
import sys

import pytest
from tiny_coco import tiny_coco, write_coco

from rayseg import cli
from rayseg.config import (
    EvaluateConfig,
    MasksConfig,
    PipelineConfig,
    PredictConfig,
    SubsetConfig,
    SynthConfig,
    TrainConfig,
)
from rayseg.errors import RaysegError


def rayseg(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "rayseg", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def assert_one_line_error(result, *needles):
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    "content, needle",
    [
        (None, "file not found"),
        (b"", "file is empty"),
        (b'{"images": [\n  {"id": 1,,}]}', "invalid JSON at line 2"),
        (b'{"foo": 1}', "not a COCO instances file"),
    ],
)
def test_subset_fatal_errors(tmp_path, content, needle):
    path = tmp_path / "in.json"
    if content is not None:
        path.write_bytes(content)
    result = rayseg("subset", "--annotations", str(path), "--out", str(tmp_path / "o.json"))
    assert_one_line_error(result, str(path), needle)


def test_unwritable_output(tmp_path):
    src = write_coco(tmp_path / "in.json", tiny_coco())
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = rayseg("masks", "--annotations", str(src), "--out", str(blocker / "out"))
    assert_one_line_error(result, "not writable")


def test_unknown_config_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("annotations: a.json\nout: b.json\nnum_image: 3\n")
    result = rayseg("subset", "--config", str(cfg))
    assert_one_line_error(result, "num_image", "did you mean 'num_images'")


def test_debug_shows_traceback(tmp_path):
    result = rayseg("subset", "--annotations", str(tmp_path / "x.json"), "--out", "o", "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_subset_command_is_byte_identical_across_runs(tmp_path):
    src = write_coco(tmp_path / "in.json", tiny_coco())
    outs = []
    for name in ("a.json", "b.json"):
        result = rayseg(
            "subset",
            "--annotations",
            str(src),
            "--out",
            str(tmp_path / name),
            "--num-images",
            "3",
            "--seed",
            "4",
        )
        assert result.returncode == 0, result.stderr
        outs.append((tmp_path / name).read_bytes())
    assert outs[0] == outs[1]
    assert len(json.loads(outs[0])["images"]) == 3
    assert (tmp_path / "a.json.config.yaml").exists()


def test_subset_reports_missing_image_files(tmp_path):
    src = write_coco(tmp_path / "in.json", tiny_coco())
    images = tmp_path / "images"
    images.mkdir()
    (images / "000000000002.jpg").write_bytes(b"x")
    result = rayseg(
        "subset",
        "--annotations",
        str(src),
        "--out",
        str(tmp_path / "s.json"),
        "--images-dir",
        str(images),
    )
    assert result.returncode == 0, result.stderr
    assert f"1 of 5 images have their file in {images}; the 4 without one are left out" in (
        result.stdout
    )
    assert [im["id"] for im in json.loads((tmp_path / "s.json").read_text())["images"]] == [2]


# ---- in-process: dispatch, flags and exit statuses ----

DISPATCH = [
    ("synth", "rayseg.synth.run_synth", ["--out", "o"], SynthConfig),
    ("subset", "rayseg.subset.run_subset", ["--annotations", "a", "--out", "o"], SubsetConfig),
    ("masks", "rayseg.masks.run_masks", ["--annotations", "a", "--out", "o"], MasksConfig),
    ("train", "rayseg.train.run_train", ["--data", "d", "--out", "o"], TrainConfig),
    (
        "evaluate",
        "rayseg.evaluate.run_evaluate",
        ["--checkpoint", "c", "--data", "d", "--out", "o"],
        EvaluateConfig,
    ),
    (
        "predict",
        "rayseg.predict.run_predict",
        ["--checkpoint", "c", "--images", "i", "--out", "o"],
        PredictConfig,
    ),
    ("pipeline", "rayseg.pipeline.run_pipeline", [], PipelineConfig),
    ("demo", "rayseg.pipeline.run_demo", ["--out", "o"], PipelineConfig),
]


@pytest.mark.parametrize("command, target, args, cls", DISPATCH)
def test_each_command_runs_its_stage(monkeypatch, command, target, args, cls):
    calls = []
    monkeypatch.setattr(target, calls.append)
    assert cli.main([command, *args]) == 0
    assert len(calls) == 1 and type(calls[0]) is cls


def test_every_command_is_dispatched():
    assert sorted(c for c, *_ in DISPATCH) == sorted(cli.COMMANDS)


def test_flags_come_from_the_config_fields():
    args = cli.build_parser().parse_args(
        ["train", "--data", "d", "--out", "o", "--no-amp", "--compile", "--address", "auto"]
    )
    assert (args.amp, args.compile, args.address) == (False, True, "auto")
    assert args.epochs is None and args.num_cpus is None, "unset flags leave the file's values"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["masks", "--overlap", "min"])


@pytest.mark.parametrize("command", ["masks", "train", "evaluate", "predict"])
def test_ray_commands_take_address_and_num_cpus(command):
    args = cli.build_parser().parse_args([command, "--address", "auto", "--num-cpus", "3"])
    assert (args.address, args.num_cpus) == ("auto", "3")


@pytest.mark.parametrize(
    "error, status, message",
    [
        (RaysegError("bad input"), 2, "rayseg synth: error: bad input"),
        (
            ValueError("boom"),
            1,
            "rayseg synth: error: ValueError: boom (rerun with --debug for details)",
        ),
        (
            KeyboardInterrupt(),
            130,
            "rayseg synth: interrupted; rerun the same command to start over",
        ),
    ],
)
def test_failures_are_one_line_and_a_status(monkeypatch, capsys, error, status, message):
    def fail(cfg):
        raise error

    monkeypatch.setattr("rayseg.synth.run_synth", fail)
    assert cli.main(["synth", "--out", "o"]) == status
    assert capsys.readouterr().err.splitlines() == [message]


def test_config_errors_exit_2_before_running(monkeypatch, capsys):
    monkeypatch.setattr("rayseg.train.run_train", pytest.fail)
    assert cli.main(["train", "--data", "d", "--out", "o", "--epochs", "0"]) == 2
    assert capsys.readouterr().err.strip() == (
        "rayseg train: error: config: 'epochs' is 0, expected epochs >= 1"
    )


def test_help_shows_defaults_and_model_names():
    result = rayseg("train", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # argparse wraps lines
    assert (
        "--epochs EPOCHS total epochs (rerun with more to resume and continue) (default: 10)"
        in (text)
    )
    assert "(default: lraspp_mobilenet_v3_large)" in text
    for name in ("fcn_resnet50", "deeplabv3_resnet101", "deeplabv3_mobilenet_v3_large"):
        assert name in text
    assert "{sgd,adamw}" in text and "--verbose" in text


@pytest.mark.parametrize("flag", ["--num-cpu", "--annot", "--over"])
def test_abbreviated_flags_are_rejected(tmp_path, flag):
    parser = cli.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["masks", "--annotations", "a.json", "--out", "o", flag, "2"])
    # The full spelling of the first one parses.
    args = parser.parse_args(["masks", "--annotations", "a.json", "--out", "o", "--num-cpus", "2"])
    assert args.num_cpus == "2"


def help_text(*argv) -> str:
    """`rayseg ... --help` as one line (argparse wraps), in-process."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        cli.build_parser().parse_args([*argv, "--help"])
    return " ".join(buf.getvalue().split())


def test_help_speaks_to_users():
    text = help_text()
    assert "dataclass" not in text and "generated" not in text
    assert "--config FILE.yaml" in text and "rayseg COMMAND --help" in text


def test_pipeline_help_names_its_sections_and_the_example_configs():
    text = help_text("pipeline")
    for section in ("'masks'", "'train'", "'synth'", "'subset'", "'evaluate'", "'predict'"):
        assert section in text
    for example in ("jobs/configs/demo.yaml", "jobs/configs/coco8k.yaml"):
        assert example in text


@pytest.mark.parametrize("command", ["subset", "synth"])
def test_verbose_says_commands_without_ray_have_nothing_more(command):
    text = help_text(command)
    assert f"--verbose no effect: {command} runs without Ray" in text
    assert "Ray's own warnings" not in text


def test_verbose_says_what_it_adds_for_evaluate():
    assert "--verbose print every class's IoU" in help_text("evaluate")
    assert "--verbose show Ray's own warnings" in help_text("masks")


def test_training_summary_says_one_epoch(tmp_path, capsys):
    from rayseg import storage
    from rayseg.train import print_outputs

    summary = {"skipped_rows": 0, "val_miou": 0.5, "epochs": 1, "model_file": "m"}
    print_outputs(summary, storage.locate(str(tmp_path)))
    assert capsys.readouterr().out.splitlines()[0] == "trained 1 epoch: val mIoU 0.5000"


def test_subset_files_line_is_plain():
    from rayseg.subset import files_line

    every = {"images": 160, "missing_files": 0}
    assert files_line(every, "imgs") == "subset: 160 of 160 images have their file in imgs"
    some = {"images": 160, "missing_files": 1}
    assert files_line(some, "imgs") == (
        "subset: 159 of 160 images have their file in imgs; the 1 without one is left out"
    )
