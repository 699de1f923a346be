"""`rayseg <command> [--config X.yaml] [flags]`: flags are generated from the config dataclasses.

Each command maps to (config class, "module:function"); the function takes the resolved config
and returns a JSON-able summary. A RaysegError becomes one line on stderr and exit status 2;
any other exception one line and exit 1, with the traceback only under --debug.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import typing
from typing import Any

from rayseg import config as C
from rayseg.errors import RaysegError

COMMANDS: dict[str, tuple[type, str, str]] = {
    "synth": (C.SynthConfig, "rayseg.synth:run_synth", "make a synthetic COCO dataset"),
    "subset": (C.SubsetConfig, "rayseg.coco:run_subset", "select a deterministic image subset"),
    "masks": (C.MasksConfig, "rayseg.shard:run_masks", "render semantic masks with Ray"),
    "train": (C.TrainConfig, "rayseg.train:run_train", "train a model with Ray Train"),
    "evaluate": (C.EvaluateConfig, "rayseg.evaluate:run_evaluate", "score a model"),
    "predict": (C.PredictConfig, "rayseg.predict:run_predict", "batch inference with Ray Data"),
    "pipeline": (C.PipelineConfig, "rayseg.pipeline:run_pipeline", "run the whole chain"),
    "demo": (C.PipelineConfig, "rayseg.pipeline:run_demo", "synthetic end-to-end demo"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayseg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (cls, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", help="YAML file with the same settings (flags override it)")
        p.add_argument("--debug", action="store_true", help="show tracebacks")
        add_config_flags(p, cls)
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
    module_name, func_name = COMMANDS[name][1].split(":")
    return getattr(importlib.import_module(module_name), func_name)(cfg)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cls = COMMANDS[args.command][0]
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
