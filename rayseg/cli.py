"""`rayseg <command> [--config X.yaml] [flags]`: one flag per field of the command's config class.

Each command maps to a Command: its config class, the function that runs it and its help line.
The run functions import their stage only when called (`rayseg subset` never imports torch); each
takes the resolved config and returns a JSON-able summary. A RaysegError becomes one line on
stderr and exit status 2; any other exception one line and exit 1, with the traceback only
under --debug. SIGINT / SIGTERM (rayseg.signals.stop_on_signals) end the command with one line
saying how far it got and exit 130 / 143; a Ray this command started is stopped either way.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import signal
import sys
import traceback
import typing
from collections.abc import Callable
from typing import Any, NamedTuple

from rayseg import __version__, rayconnect, signals
from rayseg import config as C
from rayseg.errors import RaysegError
from rayseg.progress import Progress
from rayseg.rayoutput import VERBOSE_ENV


def _synth(cfg: C.SynthConfig) -> Any:
    from rayseg.synth import run_synth

    return run_synth(cfg)


def _subset(cfg: C.SubsetConfig) -> Any:
    from rayseg.subset import run_subset

    return run_subset(cfg)


def _masks(cfg: C.MasksConfig) -> Any:
    from rayseg.masks import run_masks

    return run_masks(cfg)


def _train(cfg: C.TrainConfig) -> Any:
    from rayseg.train import run_train

    return run_train(cfg)


def _evaluate(cfg: C.EvaluateConfig) -> Any:
    from rayseg.evaluate import run_evaluate

    return run_evaluate(cfg)


def _predict(cfg: C.PredictConfig) -> Any:
    from rayseg.predict import run_predict

    return run_predict(cfg)


def _pipeline(cfg: C.PipelineConfig) -> Any:
    from rayseg.pipeline import run_pipeline

    return run_pipeline(cfg)


def _demo(cfg: C.PipelineConfig) -> Any:
    from rayseg.pipeline import run_demo

    return run_demo(cfg)


class Command(NamedTuple):
    config: type
    run: Callable[[Any], Any]
    help: str
    verbose: str  # what --verbose adds for this command
    description: str = ""  # `rayseg <command> --help`'s text after the help line


DESCRIPTION = (
    "COCO instances -> semantic masks -> a trained segmentation model -> scores and overlays, "
    "on one machine or a Ray cluster. Every command takes --config FILE.yaml with the same "
    "settings as its flags (flags win); `rayseg COMMAND --help` lists them."
)
RAY_LOGS = "show Ray's own warnings and log lines on the terminal (default: in Ray's log files)"
NO_RAY = "no effect: {name} runs without Ray and prints all it has to say either way"
PIPELINE_HELP = (
    "The config file needs a 'masks' section (annotations, images_dir, unless a 'synth' or "
    "'subset' section makes them) and a 'train' section; 'synth', 'subset', 'evaluate', "
    "'predict' and 'ray' are optional, and each section takes the settings of its command. "
    "Examples: jobs/configs/demo.yaml (synthetic data, local), jobs/configs/coco8k.yaml (COCO "
    "on a cluster). Only --out is a flag; every stage's paths derive from it."
)

COMMANDS: dict[str, Command] = {
    "synth": Command(
        C.SynthConfig, _synth, "make a synthetic COCO dataset", NO_RAY.format(name="synth")
    ),
    "subset": Command(
        C.SubsetConfig,
        _subset,
        "select a deterministic image subset",
        NO_RAY.format(name="subset"),
    ),
    "masks": Command(C.MasksConfig, _masks, "render semantic masks with Ray", RAY_LOGS),
    "train": Command(
        C.TrainConfig,
        _train,
        "train a model with Ray Train",
        RAY_LOGS + " (Ray Train's and its workers' included)",
    ),
    "evaluate": Command(
        C.EvaluateConfig,
        _evaluate,
        "score a model",
        "print every class's IoU, not only the best and worst; and " + RAY_LOGS,
    ),
    "predict": Command(C.PredictConfig, _predict, "batch inference with Ray Data", RAY_LOGS),
    "pipeline": Command(
        C.PipelineConfig,
        _pipeline,
        "run the whole chain from one config file",
        RAY_LOGS + ", for every stage that uses Ray",
        PIPELINE_HELP,
    ),
    "demo": Command(
        C.PipelineConfig,
        _demo,
        "synthetic end-to-end demo",
        RAY_LOGS + ", for every stage that uses Ray",
        "jobs/configs/demo.yaml's stages; a --config file replaces the sections it names.",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: `--num-cpu` is an error, not a silent `--num-cpus`.
    parser = argparse.ArgumentParser(prog="rayseg", description=DESCRIPTION, allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"rayseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        about = f"{command.help}. {command.description}".strip()
        p = sub.add_parser(name, help=command.help, description=about, allow_abbrev=False)
        p.add_argument("--config", help="YAML file with the same settings (flags override it)")
        p.add_argument("--debug", action="store_true", help="show tracebacks")
        p.add_argument("--verbose", action="store_true", help=command.verbose)
        add_config_flags(p, command.config)
    return parser


def model_names() -> list[str]:
    """--model's choices; rayseg.models imports torch, so only `--help` asks for them."""
    from rayseg.models import MODEL_BUILDERS

    return list(MODEL_BUILDERS)


class _Help(str):
    """A help text that appends lazily computed choices when argparse formats it."""

    def __new__(cls, text: str, choices: Callable[[], list[str]]) -> _Help:
        help = super().__new__(cls, text)
        help.choices = choices
        return help

    def __mod__(self, params: Any) -> str:
        return f"{str.__mod__(self, params)} (one of: {', '.join(self.choices())})"


# Fields whose allowed values live outside rayseg.config (a module too heavy for every command).
LAZY_CHOICES: dict[str, Callable[[], list[str]]] = {"model": model_names}


def flag_help(f: dataclasses.Field) -> str | None:
    """The field's help text with its default, e.g. `images per Ray task (default: 200)`."""
    text = f.metadata.get("help")
    if text is None:
        return None
    if f.metadata.get("required") or "default" in text:
        pass
    elif f.default is not dataclasses.MISSING:
        text += f" (default: {'none' if f.default is None else f.default})".replace("%", "%%")
    elif f.default_factory is not dataclasses.MISSING:
        text += f" (default: {f.default_factory()})".replace("%", "%%")
    if f.name in LAZY_CHOICES:
        return _Help(text, LAZY_CHOICES[f.name])
    return text


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per dataclass field; defaults stay None so the file's values are not masked."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("flag", True) is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": flag_help(f)}
        if hints[f.name] is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        parser.add_argument(flag, **kw)


# Commands whose rerun skips the work already done (finished shards, checkpointed epochs).
RESUMABLE = ("masks", "train", "pipeline", "demo")


def run_command(name: str, cfg: Any) -> Any:
    return COMMANDS[name].run(cfg)


def interrupted_line(command: str) -> str:
    """`rayseg train: interrupted after 3 of 5 steps (epoch 2/3); rerun ...`."""
    progress = Progress.latest
    where = ""
    if progress is not None:
        where = f" after {progress.count()}"
        if progress.label != command:
            where += f" ({progress.label})"
    again = "to resume" if command in RESUMABLE else "to start over"
    return f"rayseg {command}: interrupted{where}; rerun the same command {again}"


def unknown_flags_message(extra: list[str], parser: argparse.ArgumentParser) -> str:
    """`unrecognized argument --num-image; did you mean --num-images?`, as config keys say."""
    flags = [f for f in parser._option_string_actions if f.startswith("--")]
    unknown = [a for a in extra if a.startswith("-")] or extra
    first = unknown[0].split("=", 1)[0]
    close = difflib.get_close_matches(first, flags, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else f"; see `{parser.prog} --help`"
    return f"unrecognized argument{'s' if len(unknown) > 1 else ''} {' '.join(unknown)}{hint}"


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line; an unknown flag is reported by its command's parser (naming it)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[
            args.command
        ]
        sub.error(unknown_flags_message(extra, sub))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # Read by rayseg.rayoutput on the driver and, inherited, in local Ray workers.
    os.environ[VERBOSE_ENV] = "1" if args.verbose else "0"
    cls = COMMANDS[args.command].config
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)
        if f.metadata.get("flag", True) is not False
    }
    Progress.latest = None
    with signals.stop_on_signals():
        try:
            return run(args, cls, overrides)
        # errors.Interrupted, or the KeyboardInterrupt Ray's C++ calls raise in its place
        except KeyboardInterrupt:
            rayconnect.stop_ray()
            if args.debug:
                traceback.print_exc()
            sys.stdout.flush()
            if Progress.latest is not None:
                Progress.latest.close()  # end the bar's line before ours
            print(interrupted_line(args.command), file=sys.stderr, flush=True)
            return 128 + (signals.stop_signal() or signal.SIGINT)
        finally:
            rayconnect.stop_ray()


def run(args: argparse.Namespace, cls: type, overrides: dict[str, Any]) -> int:
    """The command itself; errors as one line and a status (Interrupted goes up to main)."""
    try:
        cfg = C.load_config(cls, args.config, overrides)
        run_command(args.command, cfg)
    except RaysegError as e:
        if args.debug:
            raise
        print(f"rayseg {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one line for users, the traceback with --debug
        if args.debug:
            raise
        print(
            f"rayseg {args.command}: error: {type(e).__name__}: {e} "
            "(rerun with --debug for details)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
