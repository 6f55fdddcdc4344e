"""mlla.benchmark and `mlla benchmark`: interleaving, the recorded fields, the files written."""
import csv
import json

import pytest
import torch

import mlla  # noqa: F401
import mlla.benchmark as bench
from mlla.cli import main


def test_parse_size():
    assert bench.parse_size("224") == (224, 224)
    assert bench.parse_size("320x256") == (320, 256)
    for bad in ("", "0", "12x", "axb", "1x2x3"):
        with pytest.raises(ValueError, match="image size"):
            bench.parse_size(bad)


def test_rounds_are_interleaved(monkeypatch):
    order = []
    real = bench.time_call

    def spy(fn, device, calls=1):
        order.append(fn)
        return real(fn, device, calls)

    monkeypatch.setattr(bench, "time_call", spy)
    spec = bench.BenchmarkSpec(["test_mlla"], sizes=[(32, 32)], batch_sizes=[1], dtypes=["fp32", "bf16"],
                               warmup=1, rounds=3, memory="none", matmul_size=64)
    rows = bench.run_benchmark(spec, progress=False)
    assert len(rows) == 2
    steps = order[-3 * 4:]  # 4 entries (2 matmuls, 2 model variants) in each of 3 rounds
    assert steps[:4] == steps[4:8] == steps[8:12] and len(set(steps[:4])) == 4


def test_rows_hold_throughput_flops_memory_and_environment():
    spec = bench.BenchmarkSpec(["test_mlla"], sizes=[(64, 48)], batch_sizes=[2], warmup=1, rounds=2,
                               memory="eager", matmul_size=128, threads=1)
    (row,) = bench.run_benchmark(spec, progress=False)
    assert (row["height"], row["width"], row["batch"], row["dtype"], row["backend"]) == (64, 48, 2, "fp32", "eager")
    assert row["img_per_s"] == pytest.approx(2e3 / row["ms_per_batch"])
    assert row["ms_min"] <= row["ms_per_batch"] <= row["ms_max"]
    assert row["gmacs_per_img"] > 0 and row["achieved_gflops"] > 0 and row["matmul_peak_gflops"] > 0
    assert row["achieved_gflops"] == pytest.approx(2 * row["gmacs_per_img"] * row["img_per_s"])
    assert row["peak_mem_mib"] > 0
    assert row["threads"] == 1 == torch.get_num_threads()
    assert row["torch"] == torch.__version__ and row["cpu"]
    assert row["allocator"] == "default"


def test_training_step_mode_counts_three_forward_passes():
    spec = bench.BenchmarkSpec(["test_mlla"], sizes=[(32, 32)], batch_sizes=[2], mode="train", warmup=1,
                               rounds=1, memory="none", matmul_size=64)
    (row,) = bench.run_benchmark(spec, progress=False)
    assert row["mode"] == "train"
    assert row["achieved_gflops"] == pytest.approx(3 * 2 * row["gmacs_per_img"] * row["img_per_s"])


def test_bad_spec_errors():
    for kwargs, match in [(dict(models=["no_such_model"]), "unknown model"), (dict(dtypes=["fp8"]), "dtype"),
                          (dict(backends=["jit"]), "backend"), (dict(task="seg"), "task"),
                          (dict(allocator="jemalloc"), "allocator"),
                          (dict(backends=["eager", "cudagraph"]), "use it with --device cuda")]:
        spec = bench.BenchmarkSpec(**{"models": ["test_mlla"], **kwargs})
        with pytest.raises(ValueError, match=match):
            spec.validate()


def test_cli_writes_csv_json_table_and_plot(tmp_path, capsys):
    out = tmp_path / "res"
    rc = main(["benchmark", "--models", "test_mlla", "--sizes", "32", "48x32", "--batch-sizes", "1",
               "--rounds", "1", "--warmup", "1", "--memory", "none", "--threads", "1", "--output-dir", str(out)])
    assert rc == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["height"], r["width"]) for r in rows] == [("32", "32"), ("48", "32")]
    assert len(json.loads((out / "results.json").read_text())) == 2
    assert (out / "throughput.png").read_bytes()[:4] == b"\x89PNG"
    assert "| test_mlla |" in (out / "table.md").read_text()
    assert "1 threads" in capsys.readouterr().out
    assert not list(out.glob("*.tmp"))


def test_cli_bad_model_is_a_clean_error(tmp_path, capsys):
    assert main(["benchmark", "--models", "nope_model", "--output-dir", str(tmp_path)]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_profile_breakdown_accounts_for_the_forward(monkeypatch):
    """benchmarks/profile_breakdown.py: every profiled op lands in exactly one kind (the kinds add
    up to the profiler's own total), and convolutions are told apart by their weight's shape."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_breakdown.py"
    spec = importlib.util.spec_from_file_location("profile_breakdown", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    profilers, real_profile = [], module.profile

    def recording_profile(*args, **kwargs):
        profilers.append(real_profile(*args, **kwargs))
        return profilers[-1]

    monkeypatch.setattr(module, "profile", recording_profile)
    model = bench.build_model("test_mlla", (64, 64)).eval()
    kinds = module.breakdown(model, torch.randn(2, 3, 64, 64), warmup=1)
    assert kinds["linear matmuls"] > 0 and kinds["depthwise convolutions"] > 0 and kinds["dense convolutions"] > 0
    assert "inductor kernels" not in kinds  # eager
    profiler_total = sum(e.self_cpu_time_total for e in profilers[-1].key_averages()) / 1e3  # no grouping by shape
    assert kinds["total"] == pytest.approx(profiler_total, rel=1e-6)
    depthwise = module.breakdown(torch.nn.Conv2d(8, 8, 3, groups=8), torch.randn(1, 8, 16, 16), warmup=1)
    dense = module.breakdown(torch.nn.Conv2d(16, 32, 3, padding=1), torch.randn(2, 16, 32, 32), warmup=1)  # mkldnn, as in the model
    assert "depthwise convolutions" in depthwise and "dense convolutions" not in depthwise
    assert "dense convolutions" in dense and "depthwise convolutions" not in dense


def test_cpu_allocator_times_steps_per_process_and_takes_the_median_of_rounds(tmp_path):
    """benchmarks/cpu_allocator.py: a process times its training steps (here with the allocator as
    it is: the retained one cannot be undone in the test process); rounds reduce to medians."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_allocator.py"
    spec = importlib.util.spec_from_file_location("cpu_allocator", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.parse_args(["--model", "test_mlla", "--img-size", "32", "--batch-size", "2", "--steps", "2", "--worker", "default"])
    measured = module.worker(args)
    assert len(measured["step_s"]) == 2 and min(measured["step_s"]) > 0 and measured["peak_rss_mib"] > 0

    def run(medians, rss):
        return [dict(step_s=[m * 0.9, m, m * 1.5], peak_rss_mib=r) for m, r in zip(medians, rss)]

    rows = module.summarize(args, dict(default=run([3.0, 5.0, 4.0], [100, 120, 110]), retain=run([2.0, 3.0, 2.5], [200, 220, 210])))
    default, retain = rows
    assert (default["img_per_s"], retain["img_per_s"]) == (pytest.approx(2 / 4.0), pytest.approx(2 / 2.5))
    assert retain["speed_vs_default"] == pytest.approx(1.6) and retain["memory_vs_default"] == pytest.approx(210 / 110)
    module.write(rows, tmp_path, dict(machine="cpu", threads=2, torch="x", warmup=1, steps=3, command="python x"))
    table = (tmp_path / "cpu_allocator.md").read_text()
    assert "| test_mlla | 32 | 2 | retain | 0.80 | 1.00, 0.67, 0.80 | 1.60x | 210 | 1.91x |" in table


def _readme_table_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "readme_table.py"
    spec = importlib.util.spec_from_file_location("readme_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_speed_table_is_the_result_files_row_for_row():
    """README.md's speed table holds every row of both result files (both allocators, eager and
    compiled), with the files' numbers, and nothing else."""
    table = _readme_table_module()
    rows = table.read_rows()
    assert {r["allocator"] for r in rows} == {"default", "retain"} and {r["backend"] for r in rows} == {"eager", "compile"}
    readme = table.README.read_text()
    block = readme.split(table.BEGIN)[1].split(table.END)[0]
    lines = [line for line in block.splitlines() if line.startswith("| ") and not line.startswith("| allocator")]
    assert len(lines) == len(rows)
    for line, row in zip(lines, rows):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == row["allocator"] and cells[2] == f"{row['height']}x{row['width']}" and cells[4] == row["backend"]
        assert cells[5] == table.NAMES[row["model"]]
        assert float(cells[6]) == pytest.approx(float(row["img_per_s"]), abs=0.005)
        assert float(cells[7]) == pytest.approx(float(row["ms_per_batch"]), abs=0.5)
    assert table.replace_block(readme, table.render(rows)) == readme  # `python benchmarks/readme_table.py` is a no-op


def test_readme_table_names_every_group_where_mlla_is_not_the_fastest():
    table = _readme_table_module()
    row = dict(allocator="default", task="cls", height="224", width="224", batch="32", backend="eager", dtype="fp32",
               peak_mem_mib="")
    rows = [dict(row, model="mlla_tiny", img_per_s="9.0", ms_per_batch="1"), dict(row, model="convnext_tiny", img_per_s="10.0", ms_per_batch="1"),
            dict(row, backend="compile", model="mlla_tiny", img_per_s="12.0", ms_per_batch="1"),
            dict(row, backend="compile", model="convnext_tiny", img_per_s="11.0", ms_per_batch="1")]
    text = table.render(rows)
    assert "eager: MLLA-T is 2 of 2, at 0.90x the speed of ConvNeXt-T." in text
    assert "compile: MLLA-T" not in text
    assert "| default | classification | 224x224 | 32 | compile | MLLA-T | 12.00 | 1 | - | 1 of 2 |" in text


def test_cudagraph_backend_is_labelled_and_refused_off_cuda():
    """Rows and labels name the backend; capturing a graph needs CUDA, so on a CPU the step is refused."""
    spec = bench.BenchmarkSpec(["test_mlla"], backends=["eager", "compile", "cudagraph"], device="cuda")
    labels = [v.label for v in spec.variants()]
    assert labels == ["test_mlla fp32", "test_mlla fp32 compiled", "test_mlla fp32 cuda-graph"]
    model = bench.build_model("test_mlla", (32, 32))
    with pytest.raises(ValueError, match="cudagraph"):
        bench.make_step(model, torch.randn(1, 3, 32, 32), "fp32", "infer", backend="cudagraph")
