"""The prepared GPU run (benchmarks/gpu_all.py) and its README table (benchmarks/gpu_table.py),
checked on a CPU: the plan, the budget and failure handling, and the targets computed from result files."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from mlla.benchmark import write_results

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _module(name: str):
    sys.path.insert(0, str(BENCHMARKS))  # gpu_table imports readme_table
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_plan_measures_the_kernel_first_and_compiles_last(tmp_path):
    gpu_all = _module("gpu_all")
    steps = gpu_all.plan("cuda", False, tmp_path)
    names = [s.name for s in steps]
    assert names[:3] == ["kernel_smoke", "kernel_tests", "attention_kernel"]
    assert names[-4:] == ["infer_224_compiled", "train_224_compiled", "engine_demo_eager", "engine_demo_compiled"]
    engine = next(s for s in steps if s.name == "engine_demo_compiled").argv  # `mlla train` with CUDA graphs
    assert engine[engine.index("--compile-mode") + 1] == "reduce-overhead" and engine[engine.index("--device") + 1] == "cuda"
    for s in steps:
        if "benchmark" in s.argv and s.name != "train_224_compiled":  # compiled training: the kernel only
            assert s.argv[s.argv.index("--attention-backends") + 1:][:2] == ["torch", "triton"]
            assert s.argv[s.argv.index("--device") + 1] == "cuda" and str(tmp_path / s.name) in s.argv
    train = next(s for s in steps if s.name == "train_224").argv
    assert "128" in train and "bf16" in train and "mambaout_tiny" in train
    for name in ("train_224_graphs", "infer_224_graphs"):  # every model replayed from CUDA graphs, in its own step
        argv = next(s for s in steps if s.name == name).argv
        assert argv[argv.index("--backends") + 1] == "cudagraph" and "mambaout_tiny" in argv
    assert names.index("infer_224") < names.index("train_224_graphs") < names.index("gpu_profile") < names.index("dense_mask_rcnn")
    assert all(s.timeout_s <= 300 for s in steps)  # a step's own limit; the budget (480 s) cuts the tail
    dry = gpu_all.plan("cpu", True, tmp_path)
    assert all("triton" not in s.argv and "compile" not in s.argv for s in dry)  # no inductor on the CPU
    engine = next(s for s in dry if s.name == "engine_demo_compiled").argv
    assert engine[engine.index("--compile-backend") + 1] == "aot_eager" and "--compile-mode" not in engine
    assert all("cudagraph" not in s.argv for s in dry)  # CUDA graphs need CUDA
    assert {s.name for s in dry if s.env.get("TRITON_INTERPRET") == "1"} == {
        "kernel_smoke", "kernel_tests", "attention_kernel", "attention_launch_cost"}
    with pytest.raises(SystemExit, match="add --dry"):
        gpu_all.main(["--device", "cpu"])
    with pytest.raises(SystemExit, match="pass --output-dir"):
        gpu_all.main(["--device", "cpu", "--dry"])
    with pytest.raises(SystemExit, match="unknown steps"):
        gpu_all.main(["--plan", "--only", "nope"])
    with pytest.raises(SystemExit, match="one of the folders it reads"):
        gpu_all.main(["--merge", str(tmp_path / "a"), str(tmp_path / "b"), "--output-dir", str(tmp_path / "a")])


def test_attention_kernel_benchmark_writes_every_form_and_pass(tmp_path):
    """The kernel benchmark's logic under Triton's interpreter (conftest sets it without CUDA)."""
    pytest.importorskip("triton")
    import torch

    if torch.cuda.is_available():
        pytest.skip("checked on CPU; the GPU run is benchmarks/gpu_all.py")
    kernel = _module("attention_kernel")
    assert kernel.main(["--device", "cpu", "--cases", "32:1", "--dtypes", "bf16", "--no-compile", "--rounds", "1",
                        "--warmup", "1", "--min-round-s", "0", "--copy-mib", "1", "--output-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "attention_kernel.json").read_text())
    # Four stages (8x8 .. 1x1 tokens) x two passes x two forms, each timed once, the kernel's error recorded.
    assert len(rows) == 16 and {r["tokens"] for r in rows} == {64, 16, 4, 1}
    assert {(r["pass"], r["form"]) for r in rows} == {(p, f) for p in ("fwd", "fwd+bwd") for f in ("torch", "fused")}
    assert all(r["calls"] == 1 and r["ms"] > 0 for r in rows)
    assert all(r["max_rel_err_vs_torch"] < 2 ** -6 for r in rows if r["form"] == "fused")
    assert (tmp_path / "attention_kernel.csv").read_text().count("\n") == 17


def test_gpu_profile_sorts_kernels_into_kinds_and_accounts_for_their_time():
    import torch

    prof = _module("gpu_profile")
    assert prof.kind_of("_out_kernel") == "fused attention (ours)"
    assert prof.kind_of("triton_poi_fused_add_mul_0") == "triton (inductor)"
    assert prof.kind_of("void cudnn::ops::nhwcToNchwKernel<__nv_bfloat16>") == "convolution"
    assert prof.kind_of("void at::native::conv_depthwise2d_forward_kernel<3, float>") == "depthwise convolution"
    assert prof.kind_of("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n") == "matmul"
    assert prof.kind_of("void at::native::vectorized_elementwise_kernel<4, silu>") == "elementwise / reduction"
    assert prof.kind_of("Memcpy DtoD (Device -> Device)") == "copy / layout"
    row = prof.profile_case("test_mlla", "train", "torch", 32, 2, "fp32", torch.device("cpu"), warmup=1, calls=2)
    assert row["wall_ms"] > 0 and row["launches"] > 10 and 0 < row["busy_ms"]
    assert abs(sum(row["kinds_ms"].values()) - row["busy_ms"]) < 1e-6 and len(row["top_kernels_ms"]) <= 12
    assert not any(name.removeprefix("aten::") in prof.VIEWS for name in row["top_kernels_ms"])


def test_run_records_every_step_and_keeps_to_the_budget(tmp_path, monkeypatch):
    gpu_all = _module("gpu_all")
    monkeypatch.setattr(gpu_all, "_machine", lambda device: dict(device=device))
    py = sys.executable
    writes = ("import pathlib, sys; run = pathlib.Path(sys.argv[1]); (run / 'data').mkdir(parents=True); "
              "(run / 'data' / 'x.png').write_text('x'); (run / 'last.pth').write_text('x'); (run / 'metrics.csv').write_text('x')")
    steps = [
        gpu_all.Step("ok", [py, "-c", "print('hello')"], 30),
        gpu_all.Step("train", [py, "-c", writes, str(tmp_path / "train" / "run")], 30, scratch=("run/data", "run/*.pth")),
        gpu_all.Step("fails", [py, "-c", "raise SystemExit(3)"], 30),
        gpu_all.Step("slow", [py, "-c", "import time; time.sleep(30)"], 1),
    ]
    manifest = gpu_all.run(steps, tmp_path, budget_s=100, device="cpu", dry=True)
    status = {s["name"]: s["status"] for s in manifest["steps"]}
    assert status == {"ok": "ok", "train": "ok", "fails": "failed (exit 3)", "slow": "timed out after 1 s"}
    assert [p.name for p in (tmp_path / "train" / "run").iterdir()] == ["metrics.csv"]  # its scratch files are gone
    assert (tmp_path / "logs" / "ok.log").read_text().strip() == "hello"
    assert json.loads((tmp_path / "manifest.json").read_text())["steps"] == manifest["steps"]
    manifest = gpu_all.run(steps[:1], tmp_path, budget_s=10, device="cpu", dry=True)  # 10 s left < 30 s needed
    assert manifest["steps"][0]["status"] == "skipped: out of time"
    # A kernel that fails its smoke test costs its own rows only: later steps run without it.
    steps = [gpu_all.Step("kernel_smoke", [py, "-c", "raise SystemExit(1)"], 30),
             gpu_all.Step("bench", [py, "-c", "import sys; print(sys.argv[1:])", "--attention-backends", "torch", "triton"], 30)]
    manifest = gpu_all.run(steps, tmp_path, budget_s=100, device="cpu", dry=True)
    assert "failed" in manifest["steps"][0]["status"] and "without the 'triton'" in manifest["steps"][0]["note"]
    assert (tmp_path / "logs" / "bench.log").read_text().strip() == "['--attention-backends', 'torch']"


def _bench_row(model, img_per_s, peak=None, attention="torch", dtype="bf16", batch=128, height=224, mode="train", task="cls",
               backend="eager"):
    return dict(model=model, task=task, mode=mode, dtype=dtype, backend=backend, attention=attention, height=height,
                width=height, batch=batch, img_per_s=img_per_s, ms_per_batch=1e3 * batch / img_per_s, peak_mem_mib=peak,
                achieved_gflops=None, pct_of_peak=None)


def test_gpu_table_checks_every_target_from_the_files(tmp_path):
    table = _module("gpu_table")
    swin, convnext = "swin_tiny_patch4_window7_224", "convnext_tiny"
    manifest = dict(machine=dict(gpu="Test GPU", torch="2.x", triton="3.x"), started="today", dry=False,
                    steps=[dict(name="train_224", status="ok"), dict(name="dense_upernet", status="timed out after 150 s")])
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    write_results([_bench_row("mlla_tiny", 1000, 900), _bench_row("mlla_tiny", 1500, 800, attention="triton"),
                   _bench_row(swin, 1200, 1000)], tmp_path / "train_224", plot=False)
    write_results([_bench_row("mlla_tiny", 90, 500, attention="triton", batch=1, height=h, mode="infer", task="features")
                   for h in (1024,)] + [_bench_row("mlla_tiny", 20, 2000, attention="triton", batch=1, height=2048, mode="infer",
                                                   task="features"),
                                        _bench_row(convnext, 10, 1500, batch=1, height=2048, mode="infer", task="features")],
                  tmp_path / "backbone_hires", plot=False)
    text = table.render(table.load(tmp_path))
    assert "Test GPU" in text and "dense_upernet (timed out after 150 s)" in text
    rows = {t: (ratio, met) for t, _, ratio, met in table.targets(table.load(tmp_path))}
    assert rows["MLLA-T train step (bf16, batch 128, 224) >= 1.3x our PyTorch path"] == (1.5, True)
    assert rows["MLLA-T train step ahead of Swin-T"] == (1.25, True)
    assert rows["MLLA-T peak training memory (batch 128) <= Swin-T's"] == (0.8, True)
    assert rows["2048^2 backbone (bf16, batch 1) ahead of ConvNeXt-T"] == (2.0, True)
    assert rows["2048^2 backbone peak memory below ConvNeXt-T's"][1] is False  # 2000 MiB vs 1500: a miss, kept with its ratio
    assert rows["MLLA-T backbone time 2048^2 / 1024^2 <= 4.2"] == (4.5, False)
    assert rows["2048^2 backbone (bf16, batch 1) ahead of Swin-T"] == (None, None)  # not measured: said so
    assert "| 2048^2 backbone peak memory below ConvNeXt-T's | MLLA-T / ConvNeXt-T MiB | 1.33 | **no** |" in text
    assert "Targets MLLA-T misses: 2048^2 backbone peak memory below ConvNeXt-T's; MLLA-T backbone time" in text
    assert "replayed from a CUDA graph" not in text  # no graph step ran: no such comparison
    # The graph step's rows give the same comparisons, apart from the targets (which are eager).
    write_results([_bench_row("mlla_tiny", 2000, 900, attention="triton", backend="cudagraph"),
                   _bench_row(swin, 2500, 1000, backend="cudagraph")], tmp_path / "train_224_graphs", plot=False)
    graphed = {t: (ratio, met) for t, _, ratio, met in table.targets(table.load(tmp_path), "cudagraph")}
    assert graphed["MLLA-T train step ahead of Swin-T"] == (0.8, False)
    assert table.targets(table.load(tmp_path)) == table.targets(table.load(tmp_path), "eager")
    text = table.render(table.load(tmp_path))
    assert "| MLLA-T train step ahead of Swin-T | MLLA-T / Swin-T img/s | 0.80 | **no** |" in text
    assert "| MLLA-T train step ahead of Swin-T | MLLA-T / Swin-T img/s | 1.25 | yes |" in text
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{table.BEGIN}\nold\n{table.END}\nrest\n")
    assert table.main(["--results", str(tmp_path), "--readme", str(readme), "--check"]) == 1
    assert table.main(["--results", str(tmp_path), "--readme", str(readme)]) == 0
    assert table.main(["--results", str(tmp_path), "--readme", str(readme), "--check"]) == 0
    assert "old" not in readme.read_text() and readme.read_text().endswith(f"{table.END}\nrest\n")
    assert "Training through the engine" not in readme.read_text()  # no engine step ran
    (tmp_path / "engine_demo_compiled" / "run").mkdir(parents=True)
    (tmp_path / "engine_demo_compiled" / "run" / "metrics.csv").write_text(
        "epoch,train_loss,val_top1,epoch_time_s,train_img_per_s\n1,2.25,27.8,61.5,48.1\n2,1.62,60.0,5.4,549.2\n")
    manifest["steps"].append(dict(name="engine_demo_compiled", status="ok", command="python -m mlla train --compile"))
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    text = table.render(table.load(tmp_path))
    assert "| engine_demo_compiled | 2 | 1.6200 | 60.00 | 5.4 | 549 |" in text
    assert "- engine_demo_compiled: `python -m mlla train --compile`" in text
    (tmp_path / "manifest.json").write_text(json.dumps(dict(manifest, dry=True)))
    assert "**Dry run (tiny settings on a CPU): these are not GPU figures.**" in table.render(table.load(tmp_path))
    with pytest.raises(SystemExit, match="holds a dry run"):
        table.main(["--results", str(tmp_path), "--readme", str(readme)])


def test_benchmark_spec_attention_variants_and_precision_settings(monkeypatch):
    import torch

    from mlla.benchmark import BenchmarkSpec, make_step, precision

    spec = BenchmarkSpec(["mlla_tiny", "convnext_tiny"], attention_backends=("torch", "triton"), dtypes=("bf16",))
    assert [(v.model, v.attention) for v in spec.variants()] == [
        ("mlla_tiny", "torch"), ("mlla_tiny", "triton"), ("convnext_tiny", "torch")]
    assert spec.variants()[1].label == "mlla_tiny bf16 triton-attention"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="attention backend triton runs the fused kernel on CUDA"):
        spec.validate()
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        BenchmarkSpec(["mlla_tiny"], attention_backends=("flash",)).validate()
    with pytest.raises(ValueError, match="tf32 .* is a CUDA setting"):
        BenchmarkSpec(["mlla_tiny"], dtypes=("tf32",)).validate()
    # fp32 means strict float32 on CUDA whatever the global setting; tf32 turns TF32 on; both restore it.
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with precision("fp32", torch.device("cuda")):
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        with precision("tf32", torch.device("cuda")):
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    # A step runs under its attention backend, and leaves the process's setting as it was.
    import mlla.ops
    from mlla.ops.mlla_attn import backend

    seen = []
    model = torch.nn.Module()
    model.forward = lambda x: seen.append(mlla.ops.get_attention_backend()) or x.sum()
    monkeypatch.setattr(backend, "triton_available", lambda: False)
    make_step(model, torch.ones(1), "fp32", "infer", attention="auto")()
    assert seen == ["auto"] and mlla.ops.get_attention_backend() == "auto"
    make_step(model, torch.ones(1), "fp32", "infer", attention="torch")()
    assert seen == ["auto", "torch"] and mlla.ops.get_attention_backend() == "auto"


def test_readme_gpu_section_is_generated_from_the_committed_results():
    """README's GPU section equals what `benchmarks/gpu_table.py --readme README.md` writes from
    benchmarks/results/gpu (a measured run, not a dry one), and the op counts it quotes are today's."""
    table = _module("gpu_table")
    root = BENCHMARKS.parent
    data = table.load(root / "benchmarks" / "results" / "gpu")
    assert not data["manifest"]["dry"] and data["manifest"]["machine"]["gpu"] != "no CUDA"
    readme = (root / "README.md").read_text()
    assert table.replace_block(readme, table.render(data), table.BEGIN, table.END) == readme
    counts = json.loads((root / "benchmarks" / "results" / "op_count" / "op_count.json").read_text())
    mlla_tiny = next(r for r in counts if r["model"] == "mlla_tiny")
    assert f"one forward dispatches {mlla_tiny['ops']} PyTorch operators, {mlla_tiny['compute_ops']}" in " ".join(readme.split())
    assert sum(_module("op_count").count_ops("mlla_tiny").values()) == mlla_tiny["ops"]  # still true of the model


def test_op_count_of_a_training_step_counts_the_backward_and_autocasts_casts():
    op_count = _module("op_count")
    step = op_count.count_train_ops("test_mlla", 64)
    forward = op_count.count_ops("test_mlla", 64)
    assert step["convolution_backward"] == step["convolution"] == forward["convolution"] > 0
    assert step["native_layer_norm_backward"] == step["native_layer_norm"] > 0
    assert step["_to_copy"] > 2 * step["addmm"] and not forward["_to_copy"]  # autocast casts weights and biases, eval runs none


def test_op_count_with_the_kernel_counts_its_launches_and_not_the_interpreters_copies():
    if importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the kernel needs TRITON_INTERPRET=1 set before Triton is imported (conftest, without CUDA)")
    import mlla.ops
    from mlla.layers.attention import MllaLinearAttention

    op_count = _module("op_count")
    layers = sum(isinstance(m, MllaLinearAttention) for m in mlla.create_model("test_mlla").modules())
    torch_form = op_count.count_train_ops("test_mlla", 64)
    with mlla.ops.attention_backend("triton"), op_count._kernel_launches_counted():
        fused = op_count.count_train_ops("test_mlla", 64)
    assert fused.pop(op_count.LAUNCHES) == 4 * layers and op_count.LAUNCHES not in torch_form  # 2 forward, 2 backward
    assert fused["convolution"] == torch_form["convolution"]  # the rest of the model as it was
    compute = {name: sum(n for op, n in c.items() if op not in op_count.VIEWS) for name, c in (("torch", torch_form), ("fused", fused))}
    assert compute["fused"] + 4 * layers < compute["torch"]  # the interpreter's own copies are not counted


def test_saved_activations_splits_per_image_from_fixed_bytes_by_module():
    """benchmarks/saved_activations.py: batch two minus batch one per image, by module; the fused
    attention's form saves less than the PyTorch form's (it keeps only its inputs and a d x d state)."""
    saved = _module("saved_activations")
    torch_form = saved.measure("test_mlla", 64, "torch")
    assert torch_form["activation_mib"] > 0 and torch_form["fixed_mib"] > 0
    assert abs(sum(torch_form["by_module_mib"].values()) - torch_form["activation_mib"]) < 1e-6
    assert {"attn", "(block)", "act"} <= set(torch_form["by_module_mib"])
    one = saved.saved_bytes("test_mlla", 64, "torch", 1)
    four = saved.saved_bytes("test_mlla", 64, "torch", 4)
    per_image = (sum(four.values()) - sum(one.values())) / 3 / 2**20
    assert abs(per_image - torch_form["activation_mib"]) < 0.01 * per_image  # (near) linear in the batch
    if importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1":
        fused = saved.measure("test_mlla", 64, "triton")
        assert fused["by_module_mib"]["attn"] < torch_form["by_module_mib"]["attn"]
    # Compiled: inductor's partitioner recomputes pointwise results (SiLU, GELU, the attention's
    # feature map) in the backward instead of saving them, so the step saves less, by module.
    compiled = saved.measure("test_mlla", 64, "torch", compiled=True)
    assert compiled["step"] == "compiled" and 0 < compiled["activation_mib"] < torch_form["activation_mib"]
    assert abs(sum(compiled["by_module_mib"].values()) - compiled["activation_mib"]) < 1e-6
    assert {"act", "(block)", "attn"} <= set(compiled["by_module_mib"])
    assert compiled["by_module_mib"]["attn"] < torch_form["by_module_mib"]["attn"]
