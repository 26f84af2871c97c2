"""Kernels that carry a launch-size rule, compiled for an H100 (sm_90) on any
machine: the shared memory and registers of the sizes the code picks fit the
card. Triton compiles for a GPU target without one; its bundled ptxas reports
registers and spills. (A float32 router launch at 256-wide slices overran
shared memory on the device: the same check flags it here.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
H100_SHARED_BYTES = 227 * 1024  # the most one block may use

# Run in a process of its own: the test session's TRITON_INTERPRET=1 (no GPU)
# makes kernels interpreter objects, which do not compile.
_COMPILE = r"""
import json, re, subprocess, sys, tempfile, warnings
warnings.filterwarnings("ignore")
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
from tidal.kernels import moe_route

DT = {4: "fp32", 2: "bf16"}

def compile_report(kernel, types, consts, warps):
    sig = {n: types.get(n, "i32") for n in kernel.arg_names}
    sig.update({c: "constexpr" for c in consts})
    c = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(c.asm["ptx"])
    out = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", f.name, "-o", f.name + ".cubin"], capture_output=True, text=True, check=True).stderr
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", out))
    return {"shared": c.metadata.shared, "spill_bytes": spills}

def router(itemsize, experts, block_k):
    dt = DT[itemsize]
    types = {"X": "*" + dt, "W": "*" + dt, "Bias": "*" + dt, "Partial": "*fp32", "Logits": "*" + dt, "Weights": "*" + dt, "Ids": "*i64", "Pairs": "*i32", "BlockExpert": "*i32", "Counter": "*i32"}
    consts = dict(E=experts, K=8, BLOCK_T=moe_route.ROUTER_MAX_TOKENS, BLOCK_K=block_k, BM=16, CH=16, BFILL=16, HAS_BIAS=True, RENORM=True, IEEE=itemsize == 4)
    return compile_report(moe_route._router_route_kernel, types, consts, moe_route.ROUTER_WARPS)

results = {}
for itemsize in (2, 4):
    for experts in (64, 128):
        results[f"router {DT[itemsize]} E{experts}"] = router(itemsize, experts, moe_route.router_block_k(experts, itemsize))
results["router fp32 E128 at 256 (known bad)"] = router(4, 128, 256)
print(json.dumps(results))
"""


def _compile_reports() -> dict[str, dict[str, int]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0 and ("get_ptxas" in out.stderr or "No module named 'triton" in out.stderr):
        pytest.skip("this Triton cannot compile for sm_90 here (no NVIDIA backend or ptxas)")
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_router_launches_fit_an_h100():
    """The fused router at router_block_k's slices and ROUTER_WARPS (bf16 and
    float32, 64 and 128 experts) fits an H100's shared memory and spills no registers; the
    float32 256-wide router slice that failed on the device does not fit."""
    reports = _compile_reports()
    bad = reports.pop("router fp32 E128 at 256 (known bad)")
    assert bad["shared"] > H100_SHARED_BYTES  # the check would have caught it
    for name, r in reports.items():
        assert r["shared"] <= H100_SHARED_BYTES, f"{name}: {r['shared']} bytes of shared memory"
        assert r["spill_bytes"] == 0, f"{name}: {r['spill_bytes']} bytes of register spills"
