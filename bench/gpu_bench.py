"""Training throughput of deeplabv3_resnet50 at 480x480 crops: fp32 vs bf16 + channels_last vs
bf16 + channels_last + torch.compile. Plain PyTorch + torchvision; no Ray, no rayseg.

Each mode runs in its own child process with a wall-clock limit, so a slow or failing
torch.compile is recorded and the other modes still report. One step is forward + loss (main +
0.5 * aux cross-entropy, 255 ignored) + backward + SGD; data is random and already on the device,
so the numbers are model compute only (no decoding or host-to-device copies).

    python bench/gpu_bench.py                  # CUDA, batch 16, 480x480, whole run < 4 minutes
    python bench/gpu_bench.py --cpu-smoke      # tiny run on CPU to check the script works
Writes $OUT/gpu_bench.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

MODES = ("fp32", "bf16_cl", "bf16_cl_compile")
NUM_CLASSES = 21


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--crop", type=int, default=480)
    p.add_argument("--warmup", type=int, default=5, help="untimed steps (compile happens here)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--mode-timeout", type=float, help="seconds for an eager mode (90; smoke 240)")
    p.add_argument(
        "--compile-timeout", type=float, help="seconds for compile mode (150; smoke 300)"
    )
    p.add_argument("--total-timeout", type=float, help="seconds for the whole run (225; smoke 780)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny CPU run: batch 2, 64x64, 2 steps")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    # The GPU defaults keep the whole run under 4 minutes; a loaded 2-core CPU machine can take
    # minutes even for the tiny smoke steps.
    limits = (240.0, 300.0, 780.0) if args.cpu_smoke else (90.0, 150.0, 225.0)
    for name, default in zip(
        ("mode_timeout", "compile_timeout", "total_timeout"), limits, strict=True
    ):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.cpu_smoke:
        args.batch_size, args.crop, args.warmup, args.steps = 2, 64, 1, 2
    return args


def run_mode(
    mode: str, *, batch_size: int, crop: int, warmup: int, steps: int, device: str
) -> dict:
    """One mode's timed training loop -> {"images_per_s", "step_ms", ...}."""
    import torch
    import torch.nn.functional as F
    from torchvision.models.segmentation import deeplabv3_resnet50

    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    bf16 = mode.startswith("bf16")
    memory_format = torch.channels_last if "_cl" in mode else torch.contiguous_format
    model = deeplabv3_resnet50(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES, aux_loss=True
    )
    model = model.to(device=device, memory_format=memory_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    step_model = torch.compile(model) if mode.endswith("compile") else model

    # (B, 3, H, W) images and (B, H, W) targets, a tenth of the pixels ignored.
    images = torch.randn(batch_size, 3, crop, crop, device=device)
    images = images.contiguous(memory_format=memory_format)
    targets = torch.randint(0, NUM_CLASSES, (batch_size, crop, crop), device=device)
    targets[torch.rand(targets.shape, device=device) < 0.1] = 255

    def step() -> None:
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            out = step_model(images)
            loss = F.cross_entropy(out["out"], targets, ignore_index=255)
            loss = loss + 0.5 * F.cross_entropy(out["aux"], targets, ignore_index=255)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    step()
    sync()
    first_step_s = time.perf_counter() - t0  # includes compilation in the compile mode
    for _ in range(max(warmup - 1, 0)):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    elapsed = time.perf_counter() - t0
    result = {
        "mode": mode,
        "images_per_s": batch_size * steps / elapsed,
        "step_ms": 1000 * elapsed / steps,
        "first_step_s": first_step_s,
    }
    if device == "cuda":
        result["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def run_child(args: argparse.Namespace) -> int:
    device = "cpu" if args.cpu_smoke else "cuda"
    result = run_mode(
        args.child,
        batch_size=args.batch_size,
        crop=args.crop,
        warmup=args.warmup,
        steps=args.steps,
        device=device,
    )
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def run_in_child(mode: str, argv: list[str], timeout: float) -> dict:
    """Run one mode in a fresh process; a crash or timeout becomes an `error` entry."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", mode]
    t0 = time.perf_counter()
    # Own session, so a timeout also ends the child's compile workers (its process group).
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"mode": mode, "error": f"timed out after {timeout:.0f} s"}
    finally:
        if proc.poll() is None:  # timed out, or this script is being stopped
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    wall_s = time.perf_counter() - t0
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            return {**json.loads(line[len("RESULT ") :]), "wall_s": wall_s}
    tail = (stderr or stdout).strip().splitlines()[-3:]
    return {"mode": mode, "error": f"exit {proc.returncode}: " + " | ".join(tail)}


def environment(cpu_smoke: bool) -> dict:
    import torch
    import torchvision

    env = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "device": "cpu",
        "device_name": "cpu",
    }
    if not cpu_smoke:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_bench: CUDA is not available (use --cpu-smoke to test on CPU)")
        env["device"] = "cuda"
        env["device_name"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
        # PyTorch's default: "fp32" convolutions may use TF32 tensor cores, matmuls do not.
        env["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        env["matmul_precision"] = torch.get_float32_matmul_precision()
    return env


def print_table(env: dict, args: argparse.Namespace, results: list[dict]) -> None:
    print(f"{env['device_name']}  torch {env['torch']}  torchvision {env['torchvision']}")
    print(
        f"deeplabv3_resnet50 (aux), {NUM_CLASSES} classes, batch {args.batch_size}, "
        f"{args.crop}x{args.crop}, {args.steps} timed steps after {args.warmup} warm-up"
    )
    base = next(
        (r["images_per_s"] for r in results if r.get("mode") == "fp32" and "error" not in r), None
    )
    print(
        f"{'mode':<18}{'images/s':>10}{'step ms':>10}{'vs fp32':>9}{'1st step s':>12}{'mem GiB':>9}"
    )
    for r in results:
        if "error" in r:
            print(f"{r['mode']:<18}  failed: {r['error']}")
            continue
        ratio = f"{r['images_per_s'] / base:.2f}x" if base else "-"
        mem = f"{r['max_memory_gib']:.1f}" if "max_memory_gib" in r else "-"
        print(
            f"{r['mode']:<18}{r['images_per_s']:>10.1f}{r['step_ms']:>10.1f}{ratio:>9}"
            f"{r['first_step_s']:>12.1f}{mem:>9}"
        )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    # SIGTERM (e.g. an outer time limit) unwinds like Ctrl-C, so the running child is ended.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    env = environment(args.cpu_smoke)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"gpu_bench: unknown mode(s) {unknown}; expected {', '.join(MODES)}")
    child_argv = [
        f"--batch-size={args.batch_size}",
        f"--crop={args.crop}",
        f"--warmup={args.warmup}",
        f"--steps={args.steps}",
    ] + (["--cpu-smoke"] if args.cpu_smoke else [])
    deadline = time.monotonic() + args.total_timeout
    results = []
    for mode in modes:
        cap = args.compile_timeout if mode.endswith("compile") else args.mode_timeout
        left = deadline - time.monotonic()
        if left < 10:
            results.append({"mode": mode, "error": "skipped: total time budget spent"})
            continue
        results.append(run_in_child(mode, child_argv, min(cap, left)))
        print(f"done {mode}: {json.dumps(results[-1])}", file=sys.stderr, flush=True)
    print_table(env, args, results)
    report = {
        "env": env,
        "settings": {k: getattr(args, k) for k in ("batch_size", "crop", "warmup", "steps")},
        "results": results,
    }
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "gpu_bench.json"), "w") as f:
            json.dump(report, f, indent=1)
    return 0 if any("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
