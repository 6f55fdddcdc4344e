"""Every GPU measurement of issue 17 in one run, within a time budget (default 8 minutes; H200-sized):

    python benchmarks/gpu_all.py                                  # on the GPU machine, from the repository root
    python benchmarks/gpu_all.py --device cpu --dry --output-dir /tmp/gpu_dry   # tiny settings: a logic check
    python benchmarks/gpu_all.py --plan                           # print the commands, run nothing
    python benchmarks/gpu_all.py --merge CALL1 CALL2              # one folder from several calls' outputs

Steps run one after another, most important first, each a command of the repository (so any of
them can be rerun alone) in its own process with its own time limit; a step that fails or runs out
of time is recorded and the next one starts; a step that no longer fits in the budget is skipped
and recorded. Results go under ``--output-dir`` (default ``benchmarks/results/gpu``): one folder
per step (the command's own files), ``logs/STEP.log``, and ``manifest.json`` (machine, commands,
status and wall time of every step). ``benchmarks/gpu_table.py`` turns them into the README's
GPU table. Dry runs write to ``--output-dir`` too (pass a temporary folder): never commit them.

The first step, ``kernel_smoke``, runs the fused attention once against the PyTorch form; if it
fails, the later steps run without the ``triton`` attention backend (recorded in the manifest),
so that one broken kernel does not cost every row. A GPU machine without network needs timm (and
for the dense steps segmentation_models_pytorch and pycocotools) carried in as wheels, made here
with ``pip download timm==1.0.31 segmentation_models_pytorch==0.6.0 pycocotools==2.0.11 --no-deps
--only-binary :all: --python-version 3.12 -d .whl`` and installed there with ``pip install
--no-index --no-deps --target /tmp/site .whl/*.whl`` (then ``PYTHONPATH=/tmp/site``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWIN, CONVNEXT, VIT, MAMBAOUT = "swin_tiny_patch4_window7_224", "convnext_tiny", "vit_small_patch16_224", "mambaout_tiny"
MODELS = ["mlla_tiny", SWIN, CONVNEXT, VIT, MAMBAOUT]


@dataclass
class Step:
    """One measurement: a command, its time limit, extra environment variables, and what it writes
    under its folder that is not a result (globs, deleted after it ran: data, checkpoints)."""

    name: str
    argv: list[str]
    timeout_s: int
    env: dict[str, str] = field(default_factory=dict)
    scratch: tuple[str, ...] = ()


def _bench(out: Path, name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "mlla", "benchmark", "--output-dir", str(out / name), "--no-plot", *args]


def plan(device: str, dry: bool, out: Path) -> list[Step]:
    """The steps, most important first. ``dry``: tiny sizes and batches, one round, no inductor
    (the compiled engine step traces with aot_eager), the kernel only under Triton's interpreter (CPU)."""
    py = sys.executable
    attn = ["--attention-backends", "torch"] if dry else ["--attention-backends", "torch", "triton"]
    rounds = ["--rounds", "1", "--warmup", "1"] if dry else ["--rounds", "5", "--warmup", "2"]
    train_dtypes = ["fp32"] if dry else ["bf16"]
    size, train_batch = ("64", "2") if dry else ("224", "128")
    infer_batches = ["2"] if dry else ["1", "32", "256"]
    hires = ["64", "128"] if dry else ["1024", "2048"]
    interp = {"TRITON_INTERPRET": "1"} if dry else {}
    common = ["--device", device, *rounds]
    memory = ["--memory", "none"] if dry else []  # CPU probes start a process per row: the dry run keeps them to one step
    # Time limits fit one 10-minute call on an H200 (budget 480 s): the targets' steps first, then
    # the dense models and the other precisions; the compiled variants run only if time is left.
    smoke = ("import torch, mlla.ops as o; from mlla.ops.mlla_attn import mlla_attention_torch as ref; "
             f"d = torch.device({device!r}); g = (9, 7); qk = torch.randn(2, 63, 2, 3, 32, device=d); "
             "v = torch.randn(2, 63, 3, 32, device=d); c, s = o.rope_2d_head_tables(*g, 96, 3, device=d); "
             "qk.requires_grad_(); o.set_attention_backend('triton'); out = o.mlla_attention(qk, v, c, s, width=g[1]); "
             "out.sum().backward(); err = ((out - ref(qk, v, c, s)).abs().max() / out.abs().max()).item(); "
             "print('kernel relative error', err); assert err < 1e-3 and qk.grad.isfinite().all()")
    steps = [
        Step("kernel_smoke", [py, "-c", smoke], 60, interp),
        Step("kernel_tests", [py, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-x", "tests/test_ops_mlla_attention.py"],
             120, interp),
        Step("attention_kernel", [py, "benchmarks/attention_kernel.py", "--device", device, "--output-dir", str(out / "attention_kernel"),
                                  *(["--cases", "32:1", "--dtypes", "bf16", "--no-compile", "--rounds", "1", "--warmup", "1",
                                     "--min-round-s", "0", "--copy-mib", "8"] if dry else ["--rounds", "5", "--no-compile"])],
             100, interp),
        Step("train_224", _bench(out, "train_224", "--mode", "train", "--sizes", size, "--batch-sizes", train_batch,
                                 "--dtypes", *train_dtypes, "--models", *MODELS, *attn, *memory, *common), 100),
        Step("infer_224", _bench(out, "infer_224", "--mode", "infer", "--sizes", size, "--batch-sizes", *infer_batches,
                                 "--dtypes", "bf16", "--models", *MODELS, *attn, *memory, *common), 80),
        Step("backbone_hires", _bench(out, "backbone_hires", "--task", "features", "--mode", "infer", "--sizes", *hires,
                                      "--batch-sizes", "1", "--dtypes", "bf16", "--models", "mlla_tiny", SWIN,
                                      CONVNEXT, *attn, *common), 60),
        Step("gpu_profile", [py, "benchmarks/gpu_profile.py", "--device", device, "--output-dir", str(out / "gpu_profile"),
                             *(["--size", "64", "--batch-size", "2", "--calls", "1", "--warmup", "1", "--models", "mlla_tiny",
                                "--modes", "infer"] if dry else ["--models", "mlla_tiny", SWIN, "--modes", "train"])], 70),
        Step("attention_launch_cost", [py, "benchmarks/attention_launch_cost.py", str(out / "attention_launch_cost.json"),
                                       *([device] if dry else [])], 60, interp),
        Step("dense_mask_rcnn", [py, "benchmarks/dense.py", "--device", device, "--output-dir", str(out / "dense_mask_rcnn"),
                                 "--sizes", "128" if dry else "800x1333", "--rounds", "1" if dry else "5"], 90),
        Step("dense_upernet", [py, "benchmarks/dense_seg.py", "--device", device, "--output-dir", str(out / "dense_upernet"),
                               "--sizes", "64x256" if dry else "512x2048", "--rounds", "1" if dry else "5"], 50),
        Step("infer_224_precisions", _bench(out, "infer_224_precisions", "--mode", "infer", "--sizes", size, "--batch-sizes",
                                            infer_batches[-1], "--dtypes", *(["fp16"] if dry else ["fp16", "fp32", "tf32"]),
                                            "--models", *MODELS, *attn, *memory, *common), 70),
    ]
    # The training engine itself (`mlla train`, the demo preset), eager and then with --compile:
    # does a compiled run, with CUDA graphs on a GPU, train as the eager one does (metrics.jsonl:
    # losses, top-1, img/s per epoch)? Last: only if time is left.
    engine = [py, "-m", "mlla", "train", "--preset", "demo", "--device", device, "--epochs", "1" if dry else "3", "--no-progress"]
    compiled = ["--compile-backend", "aot_eager"] if dry else ["--compile-mode", "reduce-overhead"]
    scratch = ("run/demo_data", "run/*.pth")  # the generated images and the demo model's checkpoints
    steps += [
        Step("engine_demo_eager", [*engine, "--output", str(out / "engine_demo_eager" / "run")], 60, scratch=scratch),
        Step("engine_demo_compiled", [*engine, "--compile", *compiled, "--output", str(out / "engine_demo_compiled" / "run")],
             180, scratch=scratch),
    ]
    if dry:  # a loaded 2-core CPU is slow, and the dry run checks logic, not time
        for step in steps:
            step.timeout_s = 900
    if not dry:
        # Every model eager but replayed from one captured CUDA graph per call: what the GPU does
        # without the CPU's launch cost (CUDA only). Steps of their own, so that a model that cannot
        # be captured costs these rows only.
        steps[steps.index(next(s for s in steps if s.name == "gpu_profile")):0] = [
            Step("train_224_graphs", _bench(out, "train_224_graphs", "--mode", "train", "--sizes", size, "--batch-sizes",
                                            train_batch, "--dtypes", "bf16", "--backends", "cudagraph", "--models", *MODELS,
                                            *attn, "--memory", "none", *common), 90),
            Step("infer_224_graphs", _bench(out, "infer_224_graphs", "--mode", "infer", "--sizes", size, "--batch-sizes",
                                            *infer_batches, "--dtypes", "bf16", "--backends", "cudagraph", "--models", *MODELS,
                                            *attn, "--memory", "none", *common), 90),
        ]
        # Compiled variants after the rest: inductor's compile time is the least predictable part.
        steps[-2:-2] = [
            Step("infer_224_compiled", _bench(out, "infer_224_compiled", "--mode", "infer", "--sizes", size, "--batch-sizes",
                                              "256", "--dtypes", "bf16", "--backends", "compile", "--models", "mlla_tiny",
                                              CONVNEXT, *attn, "--memory", "none", *common), 150),
            Step("train_224_compiled", _bench(out, "train_224_compiled", "--mode", "train", "--sizes", size, "--batch-sizes",
                                              train_batch, "--dtypes", "bf16", "--backends", "compile", "--models", "mlla_tiny",
                                              SWIN, "--attention-backends", "triton", "--memory", "none", *common), 300),
        ]
    return steps


def _machine(device: str) -> dict:
    info = dict(python=platform.python_version(), platform=platform.platform(), device=device)
    probe = ("import torch, triton; print(torch.__version__, triton.__version__, "
             "torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA', sep='|')")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False, cwd=ROOT)
    if proc.returncode == 0:
        info["torch"], info["triton"], info["gpu"] = proc.stdout.strip().split("|")
    else:
        info["probe_error"] = proc.stderr[-500:]
    return info


def _write_manifest(path: Path, manifest: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path)


def run(steps: list[Step], out: Path, budget_s: float, device: str, dry: bool) -> dict:
    """Run ``steps`` in order within ``budget_s``; return (and keep writing) the manifest."""
    start = time.monotonic()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    manifest = dict(machine=_machine(device), dry=dry, budget_s=budget_s, started=time.strftime("%Y-%m-%d %H:%M:%S"), steps=[])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    without_kernel = False
    for step in steps:
        left = budget_s - (time.monotonic() - start)
        if without_kernel and "triton" in step.argv:  # the kernel failed its smoke test: measure the rest without it
            step.argv = [a for a in step.argv if a != "triton"]
        record = dict(name=step.name, command=" ".join(step.argv), env=step.env, timeout_s=step.timeout_s)
        if left < min(60, step.timeout_s):
            record.update(status="skipped: out of time", wall_s=0.0)
        else:
            limit = min(step.timeout_s, left)
            t0 = time.monotonic()
            with open(out / "logs" / f"{step.name}.log", "w") as log:
                # Its own process group: a step that runs out of time is stopped with the processes it started.
                proc = subprocess.Popen(step.argv, cwd=ROOT, env=dict(env, **step.env), stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
                try:
                    code = proc.wait(timeout=limit)
                    record["status"] = "ok" if code == 0 else f"failed (exit {code})"
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    record["status"] = f"timed out after {limit:.0f} s"
            record["wall_s"] = round(time.monotonic() - t0, 1)
            for pattern in step.scratch:
                for path in (out / step.name).glob(pattern):
                    if path.is_dir():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
        if step.name == "kernel_smoke" and record["status"] != "ok":
            without_kernel = True
            record["note"] = "the fused kernel failed: later steps ran without the 'triton' attention backend"
        manifest["steps"].append(record)
        _write_manifest(out / "manifest.json", manifest)
        print(f"{step.name:<20} {record['status']:<28} {record['wall_s']:7.1f} s", flush=True)
    manifest["wall_s"] = round(time.monotonic() - start, 1)
    _write_manifest(out / "manifest.json", manifest)
    return manifest


def merge(calls: list[Path], out: Path) -> dict:
    """One results folder from the output folders of several calls (a device lease may allow
    only short calls): each step's files, log and record come from the last call that ran it;
    logs it replaces are kept as ``logs/STEP.callN.log``. The manifest lists every call."""
    steps: dict[str, dict] = {}
    manifests = []
    (out / "logs").mkdir(parents=True, exist_ok=True)
    for number, folder in enumerate(calls, 1):
        manifest = json.loads((folder / "manifest.json").read_text())
        manifests.append(manifest)
        for record in manifest["steps"]:
            if record["status"].startswith("skipped"):
                steps.setdefault(record["name"], dict(record, call=number))
                continue
            name = record["name"]
            if name in steps and (out / "logs" / f"{name}.log").is_file():
                os.replace(out / "logs" / f"{name}.log", out / "logs" / f"{name}.call{steps[name]['call']}.log")
            shutil.rmtree(out / name, ignore_errors=True)
            if (folder / name).is_dir():
                shutil.copytree(folder / name, out / name)
            shutil.copy2(folder / "logs" / f"{name}.log", out / "logs" / f"{name}.log")
            steps[name] = dict(record, call=number)
    merged = dict(manifests[0], steps=list(steps.values()), calls=[{k: v for k, v in m.items() if k != "steps"} | dict(
        steps=[s["name"] for s in m["steps"] if not s["status"].startswith("skipped")]) for m in manifests])
    merged.pop("wall_s", None)
    _write_manifest(out / "manifest.json", merged)
    return merged


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu with --dry")
    p.add_argument("--dry", action="store_true", help="tiny settings, one round, no inductor: checks the steps run")
    p.add_argument("--plan", action="store_true", help="print the steps' commands and exit")
    p.add_argument("--budget-s", type=float, default=480.0, help="time for all steps together (default: %(default)s)")
    p.add_argument("--only", nargs="+", help="run only these steps (names as in --plan)")
    p.add_argument("--output-dir", help="default benchmarks/results/gpu; required with --dry (a temporary folder)")
    p.add_argument("--merge", nargs="+", metavar="DIR",
                   help="run nothing: merge these output folders of earlier calls into --output-dir (later calls win)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu" and not args.dry:
        raise SystemExit("--device cpu measures nothing of the GPU: add --dry (a logic check with tiny settings)")
    if args.dry and not args.output_dir and not args.plan:
        raise SystemExit("--dry: pass --output-dir (a temporary folder); dry results must not land in benchmarks/results/gpu")
    out = Path(args.output_dir or ROOT / "benchmarks" / "results" / "gpu").resolve()
    if args.merge:
        calls = [Path(d).resolve() for d in args.merge]
        if out in calls:
            raise SystemExit(f"--merge writes {out}, which is one of the folders it reads: pass another --output-dir, "
                             "then replace the old folder with it")
        merge(calls, out)
        return 0
    steps = plan(args.device, args.dry, out)
    if args.only:
        unknown = set(args.only) - {s.name for s in steps}
        if unknown:
            raise SystemExit(f"unknown steps {sorted(unknown)}; the steps are {[s.name for s in steps]}")
        steps = [s for s in steps if s.name in args.only]
    if args.plan:
        for s in steps:
            env = " ".join(f"{k}={v}" for k, v in s.env.items())
            print(f"# {s.name} (at most {s.timeout_s} s)\n{env + ' ' if env else ''}{' '.join(s.argv)}")
        return 0
    manifest = run(steps, out, args.budget_s, args.device, args.dry)
    return 0 if all(s["status"] == "ok" for s in manifest["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
