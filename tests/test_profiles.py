"""The profiler-trace reading of the bench scripts (`sparsetrain_bench.profiles`) on a hand-made Chrome trace."""
import pytest

from sparsetrain_bench.profiles import gpu_busy, idle_causes


def _trace():
    """One step on the host (thread 1) and five kernels, timestamps in microseconds."""
    region = lambda name, a, b: {"cat": "user_annotation", "name": f"sparsetrain.{name}", "ts": a, "dur": b - a,
                                 "tid": 1}
    op = lambda name, a, b: {"cat": "cpu_op", "name": name, "ts": a, "dur": b - a, "tid": 1}
    launch = lambda corr, t: {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": t, "dur": 2, "tid": 1,
                              "args": {"correlation": corr}}
    kernel = lambda corr, a, b: {"cat": "kernel", "name": f"k{corr}", "ts": a, "dur": b - a, "tid": 7,
                                 "args": {"correlation": corr}}
    return [region("select", 0, 100), region("forward", 100, 300), op("aten::topk", 10, 30),
            op("## Call CompiledFxGraph ##", 120, 200), launch(1, 5), launch(2, 20), launch(5, 21), launch(3, 150),
            launch(4, 400), kernel(1, 10, 15), kernel(2, 40, 50), kernel(5, 45, 55), kernel(3, 160, 260),
            kernel(4, 405, 410), {"ph": "M", "name": "process_name"}]


def test_gpu_busy_is_the_union_of_kernel_intervals_over_their_span():
    busy = gpu_busy(_trace())
    assert busy["kernels"] == 5 and busy["span_ms"] == pytest.approx(0.4)
    assert busy["busy_ms"] == pytest.approx(0.125)  # 5 + 15 (two overlapping kernels) + 100 + 5 microseconds
    assert busy["busy_share"] == pytest.approx(0.125 / 0.4)
    assert gpu_busy([])["busy_share"] is None


def test_each_idle_stretch_is_charged_to_the_host_code_that_launched_the_work_ending_it():
    causes = idle_causes(_trace())
    assert causes["idle_ms_by_region"] == {"between steps": 0.145, "forward": 0.105, "select": 0.025}
    assert causes["idle_ms_by_launching_op"] == {"between steps: no CPU operation": 0.145,
                                                 "forward: ## Call CompiledFxGraph ##": 0.105,
                                                 "select: aten::topk": 0.025}
    assert idle_causes([]) == {"idle_ms_by_region": {}, "idle_ms_by_launching_op": {}}
