"""`rayseg <command> [--config X.yaml] [flags]`: flags are generated from the config dataclasses.

Each command maps to a Command: its config class, the function that runs it and its help line.
The run functions import their stage only when called (`rayseg subset` never imports torch); each
takes the resolved config and returns a JSON-able summary. A RaysegError becomes one line on
stderr and exit status 2; any other exception one line and exit 1, with the traceback only
under --debug.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Callable
from typing import Any, NamedTuple

from rayseg import config as C
from rayseg.errors import RaysegError


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


COMMANDS: dict[str, Command] = {
    "synth": Command(C.SynthConfig, _synth, "make a synthetic COCO dataset"),
    "subset": Command(C.SubsetConfig, _subset, "select a deterministic image subset"),
    "masks": Command(C.MasksConfig, _masks, "render semantic masks with Ray"),
    "train": Command(C.TrainConfig, _train, "train a model with Ray Train"),
    "evaluate": Command(C.EvaluateConfig, _evaluate, "score a model"),
    "predict": Command(C.PredictConfig, _predict, "batch inference with Ray Data"),
    "pipeline": Command(C.PipelineConfig, _pipeline, "run the whole chain"),
    "demo": Command(C.PipelineConfig, _demo, "synthetic end-to-end demo"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayseg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        p.add_argument("--config", help="YAML file with the same settings (flags override it)")
        p.add_argument("--debug", action="store_true", help="show tracebacks")
        add_config_flags(p, command.config)
    return parser


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per dataclass field; defaults stay None so the file's values are not masked."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("flag", True) is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": f.metadata.get("help")}
        if hints[f.name] is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        parser.add_argument(flag, **kw)


def run_command(name: str, cfg: Any) -> Any:
    return COMMANDS[name].run(cfg)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cls = COMMANDS[args.command].config
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)
        if f.metadata.get("flag", True) is not False
    }
    try:
        cfg = C.load_config(cls, args.config, overrides)
        run_command(args.command, cfg)
    except RaysegError as e:
        if args.debug:
            raise
        print(f"rayseg {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"rayseg {args.command}: interrupted; rerun the same command to resume", file=sys.stderr
        )
        return 130
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
