"""The GPU benchmark's bookkeeping for a short loan (no GPU needed): the order, the budget, the JSON-lines log,
and BENCHMARKS.json merged whatever ends the run. The measurements themselves run only on a GPU."""
import json
import time

import pytest

import bench.__main__ as bench_cli
import bench.sd35m as sd35m
import loading


def fake_worker(calls, seconds=0.0, fail=()):
    def worker(layout, resolution, checkpointing, prompts, device, compiled, flash, layers, profile, timeout=None):
        name = sd35m.case_name(layout, checkpointing, prompts, compiled, flash)
        calls.append((name, timeout))
        time.sleep(seconds)
        if name in fail:
            raise SystemExit(f"worker failed:\ntorch.OutOfMemoryError: CUDA out of memory ({name})")
        return {"step_seconds": 0.5, "peak_gib": 10.0 + prompts, "flops": 0 if compiled else 2e12 * prompts}
    return worker


def test_cases_run_in_order_each_appended_to_the_log_as_it_finishes(tmp_path):
    calls, results, log = [], {}, tmp_path / "gpu.jsonl"
    sd35m.sd35m_gpu(results, smoke=True, log=str(log), worker=fake_worker(calls, fail={"sampler_2p"}))
    assert [c for c, _ in calls] == [sd35m.case_name(*c) for c in sd35m.SMOKE_CASES]
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["case"] for line in lines] == [c for c, _ in calls]
    assert "out of memory" in lines[2]["gpu_sd35m_128_sampler_2p_error"]
    # a compiled case has no FLOP count of its own: the eager count of its family, per prompt, is carried over
    assert results["gpu_sd35m_128_adapters_2p_compiled_flash_tflops_achieved"] == pytest.approx(2 * 2e12 / 0.5 / 1e12)
    assert results["gpu_sd35m_128_adapters_1p_peak_gib"] == 11.0


def test_a_case_that_cannot_finish_within_the_budget_is_skipped_and_the_worker_is_told_the_time_left(tmp_path):
    calls, results = [], {}
    summary = sd35m.sd35m_gpu(results, smoke=True, budget_seconds=1.2, worker=fake_worker(calls, seconds=0.7))
    assert len(calls) == 1 and calls[0][1] <= 1.2  # the second would end past 1.2 s at the first one's pace
    assert len(summary) == len(sd35m.SMOKE_CASES) and all("skipped" in line for _, line in summary[1:])
    assert not any("sampler" in key for key in results)


def test_cases_flag_picks_cases_by_name_and_refuses_unknown_ones():
    assert sd35m.pick_cases("adapters_8p_compiled_flash,adapters_4p") == [("adapters", 0, 4, 0, 0), ("adapters", 0, 8, 1, 1)]
    with pytest.raises(loading.UserError, match="unknown case.*'adapters_3p'"):
        sd35m.pick_cases("adapters_3p")


def test_results_are_merged_into_benchmarks_json_whatever_ends_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "BENCHMARKS.json").write_text(json.dumps({"older_key": 1.0, "commands": []}))

    def interrupted(results, **kwargs):
        results["gpu_sd35m_512_adapters_4p_step_seconds"] = 0.6
        raise KeyboardInterrupt  # e.g. the loan's clock
    monkeypatch.setattr(bench_cli, "sd35m_gpu", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench_cli.main(["sd35m-gpu", "--log", str(tmp_path / "log.jsonl")])
    merged = json.loads((tmp_path / "BENCHMARKS.json").read_text())
    assert merged["older_key"] == 1.0 and merged["gpu_sd35m_512_adapters_4p_step_seconds"] == 0.6
    assert "python -m bench sd35m-gpu" in merged["commands"]
