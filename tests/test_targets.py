"""benchmarks/targets.py: each figure against its target, floor and peer, and
the benchmark scripts' results named as the target table reads them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import targets  # noqa: E402
from targets import Target, target_table, verdict  # noqa: E402

LATENCY = Target("decode", "ms_key", "ms", 1.6, True, "floor_key", reference="ref_key", speedup=3.0)
RATE = Target("throughput", "rate_key", "tok/s", 8000, False, "floor_key", per_step=256)


@pytest.mark.parametrize(
    "results, want",
    [
        ({"ms_key": 1.5, "ref_key": 4.6}, "MET"),  # under the bound, 3.07x the reference
        ({"ms_key": 1.5, "ref_key": 4.4}, "MISS (the 3x)"),  # under the bound, 2.9x
        ({"ms_key": 1.7, "ref_key": 9.0}, "MISS"),  # over the bound
        ({"ms_key": 1.7, "ref_key": 4.0}, "MISS"),  # both
        ({"ms_key": 1.5}, "MET the bound; the 3x not measured (no peer)"),
        ({"ms_key": 1.5, "ref_key": float("nan")}, "MET the bound; the 3x not measured (no peer)"),
        ({"ms_key": 0.0, "ref_key": 4.0}, "MET"),  # no division by zero
        ({"ref_key": 4.0}, "not run"),
    ],
)
def test_latency_verdicts(results, want):
    assert verdict(LATENCY, results) == want


def test_rate_verdicts_and_the_floor_in_the_figures_unit():
    assert verdict(RATE, {"rate_key": 8000.0}) == "MET"
    assert verdict(RATE, {"rate_key": 7999.0}) == "MISS"
    table = target_table({"gpu": "card", "commit": "abc1234", "run": "quick", "rate_key": 7000.0, "floor_key": 25.6, "copy_bandwidth_tb_s": 2.98}, [RATE])
    head = table.splitlines()[0]
    assert head.startswith("card, torch ?, commit abc1234") and "run: quick" in head and "2.98 TB/s" in head
    row = table.splitlines()[-1]
    assert "| 7,000 tok/s | 10,000 tok/s |" in row and row.endswith("| MISS |")  # 256 sequences a step over 25.6 ms
    assert "KV cache" not in head
    fp8 = target_table({"kv_dtype": "fp8", "rate_key": 9000.0}, [RATE]).splitlines()[0]
    assert "KV cache in fp8 (a numerics option: not the exact cache)" in fp8  # a figure it helps is not the exact cache's


def test_ratio_to_the_peer_is_how_many_times_faster():
    row = target_table({"ms_key": 2.0, "ref_key": 5.0}, [LATENCY]).splitlines()[-1]
    assert "| 2.50x (target 3x) |" in row and row.endswith("| MISS |")


def _run(script: str, *args: str, out: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TIDAL_COMMIT="test")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_the_moondream_benchmark_names_its_results_as_the_table_reads_them(tmp_path):
    """A tiny dry run of bench_moondream's decode and latency parts: every
    target those parts measure has its figure (a renamed key would read "not
    run"), and the table is written beside the JSON."""
    _run("bench_moondream.py", "--tiny", "--quick", "--only", "decode,latency", out=tmp_path)
    assert "run: tiny shapes (a dry run), quick" in (tmp_path / "targets.md").read_text().splitlines()[0]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in (tmp_path / "targets.md").read_text().splitlines() if line.startswith("| ")}
    measured = [t for t in targets.MOONDREAM if t.key.startswith(("fast_decode_b1_", "fast_ttft_", "fast_detect_", "fast_warmup"))]
    assert len(measured) == 7
    for t in measured:
        assert "not run" not in rows[t.figure], rows[t.figure]
    for t in targets.MOONDREAM:
        if t.key.startswith(("fast_mixed", "fast_decode_b256")):
            assert rows[t.figure].endswith("| not run |")


def test_the_qwen_benchmark_names_its_results_as_the_table_reads_them(tmp_path):
    _run("bench_qwen.py", "--model", "moe", "--tiny", "--no-hf", "--batches", "1", "--concurrent", "64", "--out-tokens", "4", out=tmp_path)
    table = (tmp_path / "targets-qwen3-moe.md").read_text()
    assert "not run" not in table, table


def test_with_setting_changes_a_knob_before_the_script_runs(tmp_path):
    """benchmarks/with_setting.py: the script sees the module's new value; a
    name the module lacks, or no script, is refused."""
    script = tmp_path / "show.py"
    script.write_text("import sys\nfrom tidal.kernels import moe_route\nprint('value', moe_route.ROUTER_WARPS, sys.argv[1:])\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    helper = str(ROOT / "benchmarks" / "with_setting.py")
    out = subprocess.run([sys.executable, helper, "tidal.kernels.moe_route.ROUTER_WARPS=4", "--", str(script), "--flag"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "value 4 ['--flag']" in out.stdout, out.stderr
    bad = subprocess.run([sys.executable, helper, "tidal.kernels.moe_route.NO_SUCH_KNOB=1", "--", str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "has no NO_SUCH_KNOB" in bad.stderr


def test_the_http_benchmark_splits_each_request_s_time(tmp_path):
    """A tiny dry run of benchmarks/http_front.py: clients in several
    processes get every request answered (a non-200 fails the run), and the
    HTTP row has the server's preparing and engine times, each measured and
    within the clients' mean latency, and the CPU shares."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    args = ["--tiny", "--requests-per-client", "1", "--concurrency", "4", "--rounds", "1", "--variants", "default"]
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "http_front.py"), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| default |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    req_s, mean_ms, prepare_ms, engine_ms = (float(cells[i]) for i in (2, 4, 5, 6))
    assert req_s > 0 and 0 < prepare_ms < mean_ms and 0 < engine_ms < mean_ms  # server-side parts within the clients' latency
    shares = [float(x) for x in cells[11].split("/")]
    assert all(0 <= s < 1.5 for s in shares[:3]) and shares[3] > 0
