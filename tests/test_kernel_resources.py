"""Kernels that carry a launch-size rule, compiled for an H100 (sm_90) on any
machine: the shared memory and registers of the sizes the code picks fit the
card. Triton compiles for a GPU target without one; its bundled ptxas reports
registers and spills. (A float32 router launch at 256-wide slices overran
shared memory on the device: the same check flags it here.)"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
H100_SHARED_BYTES = 227 * 1024  # the most one block may use

# What the compile scripts below share (each script starts with it): reading
# a compiled kernel's PTX for its memory instructions, and ptxas for its spills
_SM90 = r"""
import json, re, subprocess, sys, tempfile, warnings
warnings.filterwarnings("ignore")
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

MEM = ("ld.global", "st.global", "cp.async", "atom.", "red.", "griddepcontrol")

def memory_ops(c):
    # in program order; a masked access has a predicate first, and Triton 3.6
    # writes the gdc ops as inline asm ("griddepcontrol.wait; // dummy ...")
    ops = [re.sub(r"^@!?%p\d+\s+", "", l.strip()).split()[0].rstrip(";") for l in c.asm["ptx"].splitlines() if l.strip()]
    return [op for op in ops if op.startswith(MEM)]

def spill_bytes(c):
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(c.asm["ptx"])
    log = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", f.name, "-o", f.name + ".cubin"], capture_output=True, text=True, check=True).stderr
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", log))
"""

# Run in a process of its own: the test session's TRITON_INTERPRET=1 (no GPU)
# makes kernels interpreter objects, which do not compile.
_COMPILE = _SM90 + r"""
from tidal.kernels import moe_route

DT = {4: "fp32", 2: "bf16"}

def compile_report(kernel, types, consts, warps):
    sig = {n: types.get(n, "i32") for n in kernel.arg_names}
    sig.update({c: "constexpr" for c in consts})
    c = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    return {"shared": c.metadata.shared, "spill_bytes": spill_bytes(c)}

def router(itemsize, experts, block_k, early=False):
    dt = DT[itemsize]
    types = {"X": "*" + dt, "W": "*" + dt, "Bias": "*" + dt, "Partial": "*fp32", "Logits": "*" + dt, "Weights": "*" + dt, "Ids": "*i64", "Pairs": "*i32", "BlockExpert": "*i32", "Counter": "*i32"}
    consts = dict(E=experts, K=8, BLOCK_T=moe_route.ROUTER_MAX_TOKENS, BLOCK_K=block_k, BM=16, CH=16, BFILL=16, HAS_BIAS=True, RENORM=True, IEEE=itemsize == 4, PDL=early, EARLY=early, TAIL=True)
    return compile_report(moe_route._router_route_kernel, types, consts, moe_route.ROUTER_WARPS)

results = {}
for itemsize in (2, 4):
    for experts in (64, 128):
        results[f"router {DT[itemsize]} E{experts}"] = router(itemsize, experts, moe_route.router_block_k(experts, itemsize))
        if itemsize == 2:  # (float32 takes the plain form: in the early one its weight tile spills at E 128)
            results[f"router {DT[itemsize]} E{experts}, early weights"] = router(itemsize, experts, moe_route.router_block_k(experts, itemsize), early=True)
results["router fp32 E128 at 256 (known bad)"] = router(4, 128, 256)
print(json.dumps(results))
"""


def _run_compile_script(script: str) -> dict:
    """Run one of the scripts above in a process of its own (without the
    session's TRITON_INTERPRET, the repository on its path) -> the JSON of its
    last line; skip where this Triton cannot compile for sm_90 (no NVIDIA
    backend or ptxas)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if out.returncode != 0 and ("get_ptxas" in out.stderr or "No module named 'triton" in out.stderr):
        pytest.skip("this Triton cannot compile for sm_90 here (no NVIDIA backend or ptxas)")
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_router_launches_fit_an_h100():
    """The fused router at router_block_k's slices and ROUTER_WARPS (bf16 and
    float32, 64 and 128 experts; bf16 also in PDL's early-weights form) fits an H100's shared memory and spills no registers; the
    float32 256-wide router slice that failed on the device does not fit."""
    reports = _run_compile_script(_COMPILE)
    bad = reports.pop("router fp32 E128 at 256 (known bad)")
    assert bad["shared"] > H100_SHARED_BYTES  # the check would have caught it
    for name, r in reports.items():
        assert r["shared"] <= H100_SHARED_BYTES, f"{name}: {r['shared']} bytes of shared memory"
        assert r["spill_bytes"] == 0, f"{name}: {r['spill_bytes']} bytes of register spills"


# The kernels that write or read a float8 KV cache (EngineConfig.kv_dtype="fp8"),
# compiled for sm_90 with float8 caches: the interpreter runs code the compiler
# refuses (a jit function reading a global that is not a constexpr).
_COMPILE_FP8 = r"""
import json, warnings
warnings.filterwarnings("ignore")
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tidal.kernels import extend_attention as ea, paged_attention as pa, rms_norm, tau_rope

def compiles(kernel, types, consts, warps=4, stages=3):
    # -> shared memory bytes of the kernel compiled for sm_90 (pointer and stride
    # arguments 16-divisible, as the launches specialize them: pipelining needs it)
    sig = {n: types.get(n, "i32") for n in kernel.arg_names}
    sig.update({c: "constexpr" for c in consts})
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names) if n.startswith("stride") or types.get(n, "").startswith("*")}
    c = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    assert len(c.asm["ptx"]) > 0
    return c.metadata.shared

done = {}
for cache in ("*fp8e4nv", "*bf16"):  # the float8 cache, and the exact one as before
    fp8 = cache == "*fp8e4nv"
    tile = pa.GQA_TILE_FP8 if fp8 else pa.GQA_TILE
    attn = {"Q": "*bf16", "K": cache, "V": cache, "Table": "*i64", "Rows": "*i64", "KvLens": "*i32", "PartO": "*fp32", "PartLse": "*fp32", "Out": "*bf16", "Counter": "*i32", "sm_scale": "fp32"}
    done.update({
        f"decode {cache}": compiles(pa._decode_split_kernel, attn, dict(GROUP=1, D=64, BLOCK_N=64, NS=4, DIRECT=False, FUSED=False, PDL=False)),
        f"decode grouped {cache}": compiles(pa._decode_group_split_kernel, attn, dict(GROUP=4, GP=16, D=128, BLOCK_N=tile[0], IEEE=False, NS=4, DIRECT=False, FUSED=False, F16=fp8, PREFETCH=False, PDL=False), tile[1], tile[2]),
        f"decode grouped, slots a tile ahead, {cache}": compiles(pa._decode_group_split_kernel, attn, dict(GROUP=4, GP=16, D=128, BLOCK_N=64, IEEE=False, NS=4, DIRECT=False, FUSED=False, F16=fp8, PREFETCH=True, PDL=False), 4, 4),
        f"extend {cache}": compiles(ea._extend_kernel, {**attn, "Blocks": "*i32"}, dict(GROUP=4, D=128, BLOCK_M=64, BLOCK_N=64, IEEE=False, F16=fp8), 4, ea.EXTEND_STAGES_FP8 if fp8 else 2),
        f"extend, 5 stages, {cache}": compiles(ea._extend_kernel, {**attn, "Blocks": "*i32"}, dict(GROUP=4, D=128, BLOCK_M=64, BLOCK_N=64, IEEE=False, F16=fp8), 4, 5),
        f"qk norm + rotary + KV write {cache}": compiles(rms_norm._qk_norm_rope_kv_kernel, {"QKV": "*bf16", "QW": "*bf16", "KW": "*bf16", "Cos": "*fp32", "Sin": "*fp32", "Loc": "*i64", "QOut": "*bf16", "KCache": cache, "VCache": cache, "eps": "fp32"}, dict(H=32, HKV=4, D=128, HALF=64, FP8=fp8, PDL=False), 1),
        f"tau + rotary + KV write {cache}": compiles(tau_rope._tau_rope_kv_kernel, {"QKV": "*bf16", "Lin": "*fp32", "WTau": "*fp32", "Alpha": "*bf16", "Pos": "*i64", "Loc": "*i64", "Cos": "*fp32", "Sin": "*fp32", "QOut": "*bf16", "KCache": cache, "VCache": cache}, dict(H=32, HKV=32, D=64, HALF=16, ROT=32, BLOCK_T=1, LIN_HERE=True, BLOCK_C=4096, FP8=fp8, PDL=False), 8),
    })
# tau's projection kernel (tau_rope.LIN_KERNEL, off until timed): Moondream 3's 64 heads' [wq; wv] over 6144 features, both weight types
for w, split in (("*bf16", True), ("*fp32", False)):
    done[f"tau projection {w}"] = compiles(tau_rope._tau_lin_kernel, {"QKV": "*bf16", "W": w, "Out": "*fp32"}, dict(N=64, NP=64, BLOCK_M=32, BLOCK_K=64, SPLIT=split))
print(json.dumps(done))
"""


def test_the_kv_cache_and_tau_kernels_compile_for_an_h100():
    """Every kernel that writes or reads the KV cache compiles for sm_90 with
    float8 caches, and with bf16 ones, at the tiles and stages the launches
    use (and the grouped decode's slot prefetch, the extend's 5 stages), within
    an H100's shared memory; so does tau's projection kernel (the CPU tests
    run them under the interpreter only)."""
    done = _run_compile_script(_COMPILE_FP8)
    assert len(done) == 16 and all(0 <= shared <= H100_SHARED_BYTES for shared in done.values()), done


# benchmarks/bench_pdl.py's chain kernel in each form, compiled for sm_90: where
# the grid-dependency instructions sit relative to the loads of x and the weights
_COMPILE_PDL = _SM90 + r"""
sys.path.insert(0, "benchmarks")
import bench_pdl

out = {}
for name, (pdl, early, prefetch) in bench_pdl.FORMS.items():
    sig = {"X": "*bf16", "W": "*bf16", "Y": "*bf16", "K": "i32", "stride_w": "i32", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "PDL": "constexpr", "EARLY": "constexpr", "PREFETCH": "constexpr"}
    c = triton.compile(ASTSource(fn=bench_pdl._matvec_kernel, signature=sig, constexprs=dict(BLOCK_N=16, BLOCK_K=256, PDL=pdl, EARLY=early, PREFETCH=prefetch), attrs={(i,): [["tt.divisibility", 16]] for i in range(5)}),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "launch_pdl": pdl})
    ops = [op for op in memory_ops(c) if op.startswith(("griddepcontrol", "ld.global"))]
    lines = c.asm["ptx"].splitlines()
    first_load = min(i for i, l in enumerate(lines) if "ld.global" in l)
    out[name] = {"launch_pdl": bool(c.metadata.launch_pdl), "ops": ops, "prefetch_first": [i < first_load for i, l in enumerate(lines) if "cp.async.bulk.prefetch.L2" in l]}
print(json.dumps(out))
"""


def test_the_pdl_benchmark_waits_before_it_reads_what_the_previous_kernel_wrote():
    """bench_pdl's forms compile for sm_90 as they claim: plain has no grid
    dependency control and no PDL launch; pdl waits, then lets the next kernel
    launch, before its first load;
    pdl+early lets the next kernel launch and issues its first weight loads
    (several 16-byte loads) before the wait, and x's loads come after it."""
    forms = _run_compile_script(_COMPILE_PDL)
    plain, pdl, early = forms["plain"], forms["pdl"], forms["pdl+early"]
    assert not plain["launch_pdl"] and not any(op.startswith("griddepcontrol") for op in plain["ops"])
    assert pdl["launch_pdl"] and pdl["ops"][:2] == ["griddepcontrol.wait", "griddepcontrol.launch_dependents"]
    assert early["launch_pdl"] and early["ops"][0] == "griddepcontrol.launch_dependents"
    wait = early["ops"].index("griddepcontrol.wait")
    assert wait >= 3 and all(op == "ld.global.v4.b32" for op in early["ops"][1:wait])  # the weight tile only
    # the +l2 forms: the same ops as their bases, after one bulk L2 prefetch ahead of every load; the bases have none
    assert forms["pdl+early+l2"]["ops"] == early["ops"] and forms["plain+l2"]["ops"] == plain["ops"]
    assert forms["pdl+early+l2"]["prefetch_first"] == forms["plain+l2"]["prefetch_first"] == [True]
    assert plain["prefetch_first"] == pdl["prefetch_first"] == early["prefetch_first"] == []
    # and its chain launches each form as compiled above: PDL launches exactly where the kernel waits
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_pdl

    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append((grid, kw))

    for name, (pdl, early_, prefetch) in bench_pdl.FORMS.items():
        launches.clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(bench_pdl, "_matvec_kernel", Recorder())
            bench_pdl.chain([None] * 4, [torch.empty(64, 64)] * 3, 16, pdl, early_, prefetch)
        assert [(grid, kw["launch_pdl"], kw["PDL"], kw["EARLY"], kw["PREFETCH"]) for grid, kw in launches] == [((4,), pdl, pdl, early_, prefetch)] * 3, name


# The decode chain's kernels with programmatic dependent launch on (tidal.kernels.pdl), compiled for sm_90
_COMPILE_PDL_KERNELS = _SM90 + r"""
from tidal.kernels import fused_moe, moe_route, paged_attention as pa, residual_norm, rms_norm, tau_rope

def first_ops(kernel, types, consts, warps=4, aligned=()):
    # aligned: integer arguments Triton would specialize as multiples of 16 at launch (with every pointer)
    sig = {n: types.get(n, "i32") for n in kernel.arg_names}
    sig.update({c: "constexpr" for c in consts})
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names) if n in aligned or types.get(n, "").startswith("*")} if aligned else {}
    c = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs={**consts, "PDL": True}, attrs=attrs), target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "launch_pdl": True})
    ops = memory_ops(c)
    wait = ops.index("griddepcontrol.wait") if "griddepcontrol.wait" in ops else len(ops)
    return {"launch_pdl": bool(c.metadata.launch_pdl), "first": ops[:3], "waits": ops.count("griddepcontrol.wait"), "accesses": len(ops) - 2,
            "before_wait": ops[:wait], "after_wait": ops[wait + 1 :], "spill_bytes": spill_bytes(c), "shared": c.metadata.shared}

bf = "*bf16"
attn = {"Q": bf, "K": bf, "V": bf, "Table": "*i64", "Rows": "*i64", "KvLens": "*i32", "PartO": "*fp32", "PartLse": "*fp32", "Out": bf, "Counter": "*i32", "sm_scale": "fp32"}
router_types = {"X": bf, "W": bf, "Bias": bf, "Partial": "*fp32", "Logits": bf, "Weights": bf, "Ids": "*i64", "Pairs": "*i32", "BlockExpert": "*i32", "Counter": "*i32"}
UP_ALIGNED = ("stride_xt", "stride_we", "stride_wn", "stride_ot", "dim", "inner")  # as Triton specializes the launch
up_types = {"X": bf, "W": bf, "Out": bf, "Pairs": "*i32", "BlockExpert": "*i32", "Partial": "*fp32", "RBias": bf, "RWeights": bf, "RIds": "*i64"}
router_consts = dict(E=128, K=8, BLOCK_T=moe_route.ROUTER_MAX_TOKENS, BLOCK_K=128, BM=16, CH=16, BFILL=16, HAS_BIAS=False, RENORM=True, IEEE=False, TAIL=True)
out = {
    "residual_norm": first_ops(residual_norm._residual_norm_kernel, {n: bf for n in ("X", "Attn", "Parts", "W", "B", "XOut", "HOut")} | {"eps": "fp32"}, dict(K=8, BLOCK_D=2048, NORM=True)),
    "add_rms_norm": first_ops(rms_norm._add_rms_norm_kernel, {n: bf for n in ("X", "Parts", "W", "XOut", "HOut")} | {"eps": "fp32"}, dict(K=8, ADD=True, NORM=True, BLOCK_D=2048)),
    "qk_norm_rope_kv": first_ops(rms_norm._qk_norm_rope_kv_kernel, {"QKV": bf, "QW": bf, "KW": bf, "Cos": "*fp32", "Sin": "*fp32", "Loc": "*i64", "QOut": bf, "KCache": bf, "VCache": bf, "eps": "fp32"}, dict(H=32, HKV=4, D=128, HALF=64, FP8=False), 1),
    "tau_rope_kv": first_ops(tau_rope._tau_rope_kv_kernel, {"QKV": bf, "Lin": "*fp32", "WTau": "*fp32", "Alpha": bf, "Pos": "*i64", "Loc": "*i64", "Cos": "*fp32", "Sin": "*fp32", "QOut": bf, "KCache": bf, "VCache": bf}, dict(H=32, HKV=32, D=64, HALF=16, ROT=32, BLOCK_T=1, LIN_HERE=True, BLOCK_C=4096, FP8=False), 8),
    "decode split": first_ops(pa._decode_split_kernel, attn, dict(GROUP=1, D=64, BLOCK_N=64, NS=16, DIRECT=False, FUSED=False)),
    "decode grouped split": first_ops(pa._decode_group_split_kernel, attn, dict(GROUP=8, GP=16, D=128, BLOCK_N=64, IEEE=False, NS=16, DIRECT=False, FUSED=False, F16=False, PREFETCH=False)),
    "decode reduce": first_ops(pa._decode_reduce_kernel, {"PartO": "*fp32", "PartLse": "*fp32", "Out": bf, "KvLens": "*i32"}, dict(BLOCK_N=64, NS=16, D=128)),
    "router": first_ops(moe_route._router_route_kernel, router_types, router_consts | {"EARLY": False}, moe_route.ROUTER_WARPS),
    "moe up": first_ops(fused_moe._moe_up_kernel, up_types, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, IEEE=False, ACT=1, ROUTE=False, NE=1, KT=1, PROWS=1, ROWS=1, R_BIAS=False, RENORM=True)),
    # one token routed in the up kernel (moe_route.ROUTE_IN_UP): Qwen3-30B's 128 experts, Moondream's 64 with a router bias
    "moe up, routing one token, E128": first_ops(fused_moe._moe_up_kernel, up_types, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, IEEE=False, ACT=1, ROUTE=True, NE=128, KT=8, PROWS=16, ROWS=4, R_BIAS=False, RENORM=True), aligned=UP_ALIGNED),
    "moe up, routing one token, E64": first_ops(fused_moe._moe_up_kernel, up_types, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, IEEE=False, ACT=0, ROUTE=True, NE=64, KT=8, PROWS=16, ROWS=4, R_BIAS=True, RENORM=True), aligned=UP_ALIGNED),
    "router, partials only": first_ops(moe_route._router_route_kernel, router_types, router_consts | {"EARLY": False, "TAIL": False}, moe_route.ROUTER_WARPS),
    "moe down": first_ops(fused_moe._moe_down_kernel, {"A": bf, "W": bf, "Out": bf, "Pairs": "*i32", "BlockExpert": "*i32", "Weights": bf}, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, IEEE=False)),
}
out["router, early weights"] = first_ops(moe_route._router_route_kernel, router_types, router_consts | {"EARLY": True}, moe_route.ROUTER_WARPS,
                                        aligned=("dim", "k_per_program", "stride_x", "stride_w"))
print(json.dumps(out))
"""


def test_the_decode_chains_kernels_wait_for_their_predecessor_before_touching_its_output():
    """With tidal.kernels.pdl on, each decode-chain kernel (norms, the KV
    writes, decode attention and its reduce, the fused router, the experts'
    up and down), compiled for sm_90, is a PDL launch whose first memory
    instruction is the wait for its predecessor, then the release of its
    successor: no load or store of the predecessor's data can run ahead. In
    its early-weights form (pdl.EARLY_WEIGHTS) the fused router releases its
    successor first and issues only its weight slice's loads (16-byte
    vectors) before the wait; x, its partials' stores and the ticket come after."""
    from tidal.kernels import moe_route

    kernels = _run_compile_script(_COMPILE_PDL_KERNELS)
    assert len(kernels) == 14
    for name in ("moe up, routing one token, E128", "moe up, routing one token, E64", "router, partials only"):  # the one-token routing forms fit an H100 without spills
        assert kernels[name]["spill_bytes"] == 0 and kernels[name]["shared"] <= H100_SHARED_BYTES, (name, kernels[name])
    router = kernels.pop("router, early weights")
    assert router["launch_pdl"] and router["waits"] == 1 and router["before_wait"][0] == "griddepcontrol.launch_dependents"
    early = router["before_wait"][1:]
    # exactly the weight slice: E 128 x BLOCK_K 128 bf16 in 16-byte loads over 8 warps' 256 threads (x's loads would add more)
    assert early == ["ld.global.v4.b32"] * (128 * 128 * 2 // 16 // (32 * moe_route.ROUTER_WARPS)), early
    after = router["after_wait"]
    assert any(op.startswith("ld.global") for op in after) and any(op.startswith("st.global") for op in after) and any(op.startswith("atom.") for op in after)
    for name, k in kernels.items():
        assert k["launch_pdl"] and k["waits"] == 1 and k["accesses"] >= 3, (name, k)  # the kernel's own loads and stores are seen
        assert k["first"][:2] == ["griddepcontrol.wait", "griddepcontrol.launch_dependents"], (name, k)
        assert not k["first"][2].startswith("griddepcontrol"), (name, k)


# The skinny kernel compiled for sm_90 (strides divisible by 16, as Triton
# specializes them at launch): its forms (plain and split-K, with and without
# PDL) at a 32 x 256 tile, and at the models' decode projections (bf16;
# skinny_config's tiles; takes_early_form's choice)
_COMPILE_SKINNY = _SM90 + r"""
from tidal.kernels import skinny_gemm

k = skinny_gemm._skinny_kernel
types = {"X": "*bf16", "W": "*bf16", "B": "*bf16", "Y": "*bf16", "Partial": "*fp32", "Ticket": "*i32"}
aligned = [i for i, a in enumerate(k.arg_names) if a in types or a in ("K", "k_per_split", "stride_xm", "stride_wn", "stride_ym")]

def compile_skinny(block_n, block_k, split, pdl, warps, stages, prefetch=False):
    consts = dict(HAS_BIAS=True, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=False, SPLIT=split, PDL=pdl, PREFETCH=prefetch)
    sig = {a: types.get(a, "i32") for a in k.arg_names} | {c: "constexpr" for c in consts}
    return triton.compile(ASTSource(fn=k, signature=sig, constexprs=consts, attrs={(i,): [["tt.divisibility", 16]] for i in aligned}),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages, "launch_pdl": pdl})

forms = {}
for split in (1, 4):
    for pdl in (False, True):
        c = compile_skinny(32, 256, split, pdl, 4, 4)
        forms[f"split {split} pdl {pdl}"] = {"launch_pdl": bool(c.metadata.launch_pdl), "ops": memory_ops(c)}
# with the L2 prefetch of the program's slice (tidal.kernels.l2_prefetch): where in the program it is issued, and ptxas's view
for pdl in (False, True):
    c = compile_skinny(32, 256, 1, pdl, 4, 4, prefetch=True)
    lines = [l.strip() for l in c.asm["ptx"].splitlines()]
    at = lambda text: [i for i, l in enumerate(lines) if text in l]
    first_access = min(i for i, l in enumerate(lines) if re.sub(r"^@!?%p\d+\s+", "", l).startswith(("ld.global", "st.global", "cp.async.cg", "cp.async.ca")))
    forms[f"prefetch pdl {pdl}"] = {"prefetches": at("cp.async.bulk.prefetch.L2.global"), "waits": at("griddepcontrol.wait"),
                                    "prefetch_text": [l for l in lines if "cp.async.bulk.prefetch" in l],
                                    "first_access": first_access, "ops": memory_ops(c), "spill_bytes": spill_bytes(c)}
# (out, in): Qwen3-30B-A3B qkv, o, router, lm_head; Qwen3-VL-8B q, k/v, gate/up, down, lm_head; Moondream 3 qkv, proj, dense MLP, lm_head
shapes = {}
for n, kk in [(5120, 2048), (2048, 4096), (128, 2048), (151936, 2048), (4096, 4096), (1024, 4096), (12288, 4096), (4096, 12288), (151936, 4096),
              (6144, 2048), (2048, 2048), (8192, 2048), (2048, 8192), (51200, 2048), (64, 2048)]:
    bn, bk, warps, stages = skinny_gemm.skinny_config(n, kk)
    early = skinny_gemm.takes_early_form(bn, bk, 2)
    c = compile_skinny(bn, bk, 1, early, warps, stages)
    shapes[f"{n}x{kk}"] = {"early": early, "tile": [bn, bk], "spill_bytes": spill_bytes(c), "shared": c.metadata.shared}
print(json.dumps({"forms": forms, "shapes": shapes}))
"""


@functools.cache
def _skinny_compiles() -> dict:
    """_COMPILE_SKINNY's report, run once for both tests that read it."""
    return _run_compile_script(_COMPILE_SKINNY)


def test_the_skinny_product_streams_its_first_weight_tile_before_the_wait():
    """With PDL, the skinny kernel (plain and split-K, sm_90) releases its
    successor first, then issues only loads (its first weight tile, 16-byte
    vectors) before the one wait for its predecessor; x and everything it
    stores come after. Without PDL: no grid-dependency op, no PDL launch."""
    forms = _skinny_compiles()["forms"]
    for split in (1, 4):
        plain, pdl = forms[f"split {split} pdl False"], forms[f"split {split} pdl True"]
        assert not plain["launch_pdl"] and not any(op.startswith("griddepcontrol") for op in plain["ops"])
        ops = pdl["ops"]
        assert pdl["launch_pdl"] and ops[0] == "griddepcontrol.launch_dependents" and ops.count("griddepcontrol.wait") == 1
        early = ops[1 : ops.index("griddepcontrol.wait")]
        # exactly the first weight tile: 32 x 256 bf16 in 16-byte loads over 4 warps' 128 threads (x's loads would add more)
        assert early == ["ld.global.v4.b32"] * (32 * 256 * 2 // 16 // 128), (split, early)
        after = ops[ops.index("griddepcontrol.wait") + 1 :]
        assert any(op.startswith("ld.global") for op in after) and any(op.startswith("st.global") for op in after)


def test_the_skinny_product_asks_for_its_slice_in_l2_before_any_load():
    """With tidal.kernels.l2_prefetch, the skinny kernel (sm_90) issues one bulk
    L2 prefetch from thread 0 of each program, ahead of every load and store of the program (and, with
    PDL's early form, ahead of the wait for its predecessor); ptxas takes it
    without spills, and the program's own loads and stores are still there."""
    forms = _skinny_compiles()["forms"]
    for pdl in (False, True):
        f = forms[f"prefetch pdl {pdl}"]
        assert len(f["prefetches"]) == 1 and f["prefetches"][0] < f["first_access"], (pdl, f)
        # issued by the program's thread 0 alone, under its predicate
        text = f["prefetch_text"][0]
        assert "mov.u32 tid, %tid.x; setp.eq.u32 first, tid, 0;" in text and "@first cp.async.bulk.prefetch.L2.global" in text, text
        assert f["spill_bytes"] == 0
        assert any(op.startswith("ld.global") for op in f["ops"]) and any(op.startswith("st.global") for op in f["ops"])
        if pdl:
            assert len(f["waits"]) == 1 and f["prefetches"][0] < f["waits"][0]
        else:
            assert not f["waits"]


def test_the_skinny_products_early_form_spills_nothing_at_the_models_shapes():
    """At every decode projection of the three models (bf16, skinny_config's
    tiles), where takes_early_form chooses PDL's early-weights form it
    compiles for sm_90 without register spills and within an H100's shared
    memory; the narrow tiles of the K = 2048 projections take it, the lm_heads'
    wide ones do not."""
    shapes = _skinny_compiles()["shapes"]
    for name, r in shapes.items():
        assert r["shared"] <= H100_SHARED_BYTES, (name, r)
        if r["early"]:
            assert r["spill_bytes"] == 0, (name, r)
    assert shapes["5120x2048"]["early"] and shapes["2048x4096"]["early"] and shapes["128x2048"]["early"]
    assert not shapes["151936x2048"]["early"] and not shapes["151936x4096"]["early"]

def test_pdl_is_held_off_inside_the_block_and_back_after(monkeypatch):
    """pdl_on follows ENABLED on an sm_90 card with the grid-dependency ops,
    is False inside held_off (nested too) and True again once the outermost
    block is left, also when it leaves by an exception."""
    from tidal.kernels import pdl

    monkeypatch.setattr(pdl, "HAS_GDC", True)
    monkeypatch.setattr(pdl, "_sm90", lambda device: True)
    dev = torch.device("cuda", 0)
    monkeypatch.setattr(pdl, "ENABLED", False)
    assert not pdl.pdl_on(dev)
    monkeypatch.setattr(pdl, "ENABLED", True)
    assert pdl.pdl_on(dev)
    with pdl.held_off():
        assert not pdl.pdl_on(dev)
        with pdl.held_off():
            assert not pdl.pdl_on(dev)
        assert not pdl.pdl_on(dev)
    assert pdl.pdl_on(dev)
    with pytest.raises(RuntimeError), pdl.held_off():
        raise RuntimeError("leaves the block")
    assert pdl.pdl_on(dev)
