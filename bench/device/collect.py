"""Gather one device run's figures into OUT/gpu_train_<gpu>.json: plain step vs rayseg train.

Reads OUT/plain.json (bench/gpu_bench.py), each run dir's metrics.jsonl (images/s and data wait of
the last epoch; the first epoch includes compile and pipeline start-up, so it is reported apart),
the evaluate metrics, and steps.jsonl (rc and seconds of every step in run.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

# rayseg's run dir per mode -> the plain-step mode it is compared with (same precision settings).
RUNS = {"bf16_cl": "run_bf16", "bf16_cl_compile": "run_compile"}


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_epochs(run: Path) -> list[dict]:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


def rayseg_figures(epochs: list[dict]) -> dict | None:
    if not epochs:
        return None
    last = epochs[-1]
    return {
        "images_per_s": last["images_per_s"],
        "data_wait": last["data_wait_fraction"],
        "epochs": len(epochs),
        "first_epoch": {
            "images_per_s": epochs[0]["images_per_s"],
            "data_wait": epochs[0]["data_wait_fraction"],
        },
        "val_miou": last["val_miou"],
    }


def collect(data: Path, out: Path, steps_file: Path) -> dict:
    plain = read_json(out / "plain.json") or {}
    plain_modes = {r["mode"]: r for r in plain.get("results", []) if "error" not in r}
    modes = {}
    for mode, run_name in RUNS.items():
        ours = rayseg_figures(read_epochs(data / run_name))
        base = plain_modes.get(mode)
        entry = {
            "plain": base
            and {
                "images_per_s": base["images_per_s"],
                "max_memory_gib": base.get("max_memory_gib"),
            },
            "rayseg": ours,
        }
        if base and ours:
            entry["ratio"] = ours["images_per_s"] / base["images_per_s"]
        modes[mode] = entry
    steps = []
    if steps_file.exists():
        steps = [json.loads(x) for x in steps_file.read_text().splitlines() if x.strip()]
    env = dict(plain.get("env", {}))
    try:
        import ray

        env["ray"] = ray.__version__
    except ImportError:
        env["ray"] = None
    env["python"] = platform.python_version()
    return {
        "env": env,
        "settings": plain.get("settings"),
        "modes": modes,
        "evaluate": read_json(data / "eval" / "metrics.json"),
        "steps": steps,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=Path, required=True)
    args = p.parse_args()
    report = collect(args.data, args.out, args.steps)
    gpu = str(report["env"].get("device_name") or "cpu").lower().replace("nvidia ", "")
    name = f"gpu_train_{gpu.replace(' ', '_')}.json"
    (args.out / name).write_text(json.dumps(report, indent=1))
    print(json.dumps(report["modes"], indent=1))
    print(f"wrote {os.path.join(args.out, name)}")


if __name__ == "__main__":
    main()
