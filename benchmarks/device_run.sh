#!/usr/bin/env bash
# One part of the device checklist per call (each fits a 10-minute device command):
#
#   bash benchmarks/device_run.sh tests       # the CUDA tests: test_cuda, the fast paths, Qwen
#   bash benchmarks/device_run.sh kernels     # each Triton kernel against its torch reference, real shapes
#   bash benchmarks/device_run.sh tune        # fused-MoE block sizes -> $OUT/moe_configs.json
#   bash benchmarks/device_run.sh md-decode   # Moondream 3 decode sweep
#   bash benchmarks/device_run.sh md-rest     # Moondream 3 latency, torch path, reference, mixed workload
#   bash benchmarks/device_run.sh qwen-moe    # Qwen3-30B-A3B beside transformers
#   bash benchmarks/device_run.sh qwen-vl     # Qwen3-VL-8B beside transformers
#   bash benchmarks/device_run.sh profile     # batch-1 decode kernel by kernel: Moondream 3 and Qwen3-30B-A3B
#   bash benchmarks/device_run.sh variants    # decode-sized kernels alone, variants beside cuBLAS and floors
#   bash benchmarks/device_run.sh prefill     # Qwen3-VL prefill profile + 128 chats; a Moondream mixed step's wall vs GPU time; the mixed workload with host profile
#   bash benchmarks/device_run.sh tune-prefill  # fused-MoE block sizes at 512-4096 tokens (8 warps too), merged into the table
#   bash benchmarks/device_run.sh small-card  # the full model in bf16 in 24 GB (memory capped), every skill
#   bash benchmarks/device_run.sh timeline    # batch-1 graph replays over time (busy, overlapping, idle) and the host's phases of a step: Moondream 3 and Qwen3-30B-A3B
#   bash benchmarks/device_run.sh overlap     # Moondream 3 decode and detect/point with EngineConfig.overlap on and off, first output (quick)
#   bash benchmarks/device_run.sh routing     # MoE routing + alignment: its kernel tests, then each form timed at 16-1024 tokens
#   bash benchmarks/device_run.sh http        # the HTTP path: the front end alone, an HTTP request's time split with server variants (twice each), then at a 0.2 ms GIL switch interval
#   bash benchmarks/device_run.sh mixed       # test_fast_path, then the mixed workload at 64 clients through the engine and through HTTP (http_front, one round)
#   bash benchmarks/device_run.sh fp8         # EngineConfig.kv_dtype="fp8": its kernel tests, then Qwen3-VL-8B's 128 chats with the float8 cache and the exact one
#   bash benchmarks/device_run.sh fp8-ttft    # Qwen3-VL-8B's first token for a new image, float8 cache then exact, with the one-image prefill step's kernels
#   bash benchmarks/device_run.sh attention-large  # grouped decode attention at batch 64 / 128, bf16 and float8 caches: splits and tiles
#   bash benchmarks/device_run.sh router-programs  # the fused router's programs (default / 4 / 1) in both models' batch-1 and batch-8 decode
#   bash benchmarks/device_run.sh priority    # the MoE branch's stream priority (text.BRANCH_PRIORITY) in Moondream decode
#   bash benchmarks/device_run.sh pdl         # a chain of decode-sized products in one graph, with and without programmatic dependent launch; tidal.kernels.pdl's bits tests
#   bash benchmarks/device_run.sh pdl-decode  # tidal.kernels.pdl off / on in both MoE models' decode
#   bash benchmarks/device_run.sh matrix      # fused-MoE table (committed / moe_candidate.json) x PDL off / on x Moondream's streams, both MoE models' decode
#   bash benchmarks/device_run.sh pdl-check   # PDL's early-weights form (pdl.EARLY_WEIGHTS) and the skinny product's L2 prefetch: bits tests, bench_pdl, then Qwen3-30B decode (PDL / early / early with every projection skinny / + L2 prefetch), Qwen3-VL-8B early off / on
#   bash benchmarks/device_run.sh route-in-up  # one token routed in the experts' up kernel (moe_route.ROUTE_IN_UP): bits tests, both MoE models' decode off / on
#   bash benchmarks/device_run.sh md-pdl-branches  # Moondream 3 decode with PDL on neither, the main, the side or both of a block's two streams (text.PDL_BRANCHES)
#   bash benchmarks/device_run.sh round       # where starts are scarce: test_cuda, bench_pdl, Qwen3-30B decode with the forms written since the last device run
#   bash benchmarks/device_run.sh tau         # tau's projection kernel (tau_rope.LIN_KERNEL): its tests, then a mixed step's profile with it on and off
#   bash benchmarks/device_run.sh check       # after a kernel change, in ~5 minutes: kernel + fast-path tests, bench_kernels, quick decode of both MoE models
#
# Run from the repository root with the wheels the device image lacks in .whl/
# (fastapi, uvicorn, pydantic and their dependencies, Pillow 13; see
# docs/PERFORMANCE.md) and, for md-rest, the authors' reference in peers/.
# Results land in $OUT; TIDAL_COMMIT names the commit in them: pass it from the local
# checkout (TIDAL_COMMIT=abc1234 bash ...): the device's copy of .git has been seen to lag
# the working tree it carries, so `git rev-parse` there can name an older commit.
set -uo pipefail
part="${1:?which part: tests, kernels, tune, tune-prefill, md-decode, md-rest, qwen-moe, qwen-vl, profile, variants, prefill, small-card, overlap, routing, http, mixed, fp8, fp8-ttft, router-programs, attention-large, priority, pdl, pdl-decode, pdl-check, route-in-up, md-pdl-branches, matrix, round, tau, check, timeline, md-timeline}"
out="${OUT:-.}"
if [ -d .whl ]; then
  pip install -q --no-deps --target /tmp/deps .whl/*.whl 2>&1 | grep -v -i "warning" | tail -2
fi
export PYTHONPATH="/tmp/deps:.${PYTHONPATH:+:$PYTHONPATH}"
export TIDAL_COMMIT="${TIDAL_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader

# pytest under a time limit, printed as: each failure's test and one-line cause, then the counts
tests_in() {  # LIMIT_S LABEL PYTEST_ARGS...
  local limit="$1" label="$2"; shift 2
  timeout "$limit" python -m pytest -q -p no:cacheprovider -rfE --tb=line "$@" 2>&1 \
    | grep -E "^(FAILED|ERROR) |\.py:[0-9]+: |[0-9]+ (passed|failed|error)" | tail -16 | sed "s|^|$label: |"
}
case "$part" in
  tests)
    # long compiles: a per-file time limit keeps one slow file from hiding the others' results
    for f in tests/test_cuda.py tests/test_fast_path.py tests/test_qwen_fast_path.py tests/test_qwen3_moe.py tests/test_qwen3_dense.py; do
      tests_in 200 "$f" "$f"
    done
    # the decode-path kernels (the whole file is the kernels part)
    tests_in 200 "test_kernels (decode path)" tests/test_kernels.py -k "decode or route or rope_halves or silu or skinny or tau or residual_norm or extend" ;;
  kernels)
    for f in tests/test_kernels.py tests/test_resample.py; do
      tests_in 450 "$f" "$f"
    done ;;
  tune) timeout 570 python benchmarks/tune_moe.py --out "$out" --quick --budget-s 480 ;;  # decode sizes first, then prefill sizes while time lasts
  tune-prefill) timeout 570 python benchmarks/tune_moe.py --out "$out" --quick --merge --tokens 512 1024 2048 4096 --budget-s 480 ;;
  md-decode) timeout 570 python benchmarks/bench_moondream.py --only decode --out "$out" 2>&1 | grep -v "capturing" ;;
  md-rest) timeout 570 python benchmarks/bench_moondream.py --only latency,eager_extend,torch,reference,mixed --out "$out" 2>&1 | grep -v "capturing" ;;
  qwen-moe) timeout 570 python benchmarks/bench_qwen.py --model moe --out "$out" --profile 2>&1 | grep -v "capturing" | tail -80 ;;
  qwen-vl) timeout 570 python benchmarks/bench_qwen.py --model vl --out "$out" --profile 2>&1 | grep -v "capturing" | tail -80 ;;
  profile)
    timeout 200 python benchmarks/profile_step.py --batch 1 --out "$out" 2>&1 | grep -v "capturing" | head -45
    timeout 240 python benchmarks/bench_qwen.py --model moe --batches 1 --no-hf --no-concurrent --out "$out" --profile 2>&1 | grep -v "capturing" | head -45 ;;
  variants)
    timeout 300 python benchmarks/bench_kernels.py --out "$out"
    timeout 150 python benchmarks/bench_moondream.py --quick --only decode,skinny,branches --out "$out" 2>&1 | grep "decode batch"
    for flag in "" --skinny; do
      timeout 70 python benchmarks/bench_qwen.py --model moe --no-hf --no-concurrent --batches 1 8 $flag --out "$out" 2>&1 | grep "tidal decode" | sed "s|^|qwen3-30b ${flag:-cublas}: |"
    done ;;
  prefill)
    timeout 150 python benchmarks/bench_qwen.py --model vl --no-hf --batches 1 128 --profile --out "$out" 2>&1 | grep -v "capturing" | tail -60
    timeout 150 python benchmarks/profile_step.py --batch 1 --mixed --out "$out" 2>&1 | grep -A28 "=== mixed"
    timeout 240 python benchmarks/bench_moondream.py --quick --only mixed --host-profile --out "$out" 2>&1 | grep -v "capturing" | tail -80 ;;
  small-card) timeout 300 python benchmarks/small_card.py --memory-gb 24 2>&1 | grep -v "capturing" | tail -20 ;;
  overlap) timeout 540 python benchmarks/bench_moondream.py --quick --only decode,overlap,latency --out "$out" 2>&1 | grep -E "decode batch|ttft|objects|copy|Error|error" ;;
  routing)
    tests_in 120 "test_kernels (routing)" tests/test_kernels.py -k "route"
    timeout 150 python benchmarks/bench_kernels.py --only routing --out "$out" 2>&1 | tail -16 ;;
  http)
    timeout 60 python benchmarks/front_end.py --requests 256 --rounds 1 2>&1 | tail -3
    timeout 260 python benchmarks/http_front.py --rounds 2 2>&1 | grep -E "^\||cores|CPU shares|Error|error"
    timeout 150 python benchmarks/with_setting.py tidal.server.state.SWITCH_INTERVAL_S=0.0002 -- benchmarks/http_front.py --rounds 1 --variants default 2>&1 | grep -E "^with|^\| (engine|default)|Error|error" ;;
  mixed)
    tests_in 150 tests/test_fast_path.py tests/test_fast_path.py
    # 256 requests at 64 clients through the engine and through HTTP, one round
    timeout 150 python benchmarks/http_front.py --rounds 1 --variants default 2>&1 | grep -E "^\||cores|CPU shares|Error|error" ;;
  fp8)
    for kv in fp8 auto; do  # Qwen3-VL-8B's 128 image chats and decode at 128, the float8 cache then the exact one
      timeout 200 python benchmarks/bench_qwen.py --model vl --no-hf --batches 128 --tokens 8 --kv-dtype $kv --out "$out" 2>&1 | grep -E "^tidal|where it went|same model|Error" | sed "s|^|kv $kv: |"
    done
    tests_in 120 "test_kernels (float8 cache)" tests/test_kernels.py -k "float8 or cache_value or tau_rope_kv or qk_norm_rope_kv or decode_attention or extend_attention"
    tests_in 80 "test_qwen_fast_path (float8 cache)" tests/test_qwen_fast_path.py -k float8 ;;
  router-programs)
    # the fused router's programs (moe_route.ROUTER_PROGRAMS): one a K tile (default), 4, 1; batch-1 decode of both models, each way in one call
    for v in None 4 1; do
      timeout 100 python benchmarks/with_setting.py tidal.kernels.moe_route.ROUTER_PROGRAMS=$v -- benchmarks/bench_moondream.py --quick --only decode --out "$out/rp-$v" 2>&1 | grep -E "decode batch (1|8):" | sed "s|^|programs $v: |"
      timeout 90 python benchmarks/with_setting.py tidal.kernels.moe_route.ROUTER_PROGRAMS=$v -- benchmarks/bench_qwen.py --model moe --no-hf --no-concurrent --batches 1 8 --out "$out/rp-$v" 2>&1 | grep -E "^tidal decode" | sed "s|^|programs $v: |"
    done ;;
  fp8-ttft)
    # first token for a new 1280x720 image, float8 cache then exact: the time and the profiled one-image prefill step
    # (fp8-5: the extend kernel with 5 stages over the float8 cache, extend_attention.EXTEND_STAGES_FP8)
    for kv in fp8 fp8-5 auto; do
      mkdir -p "$out/$kv"
      timeout 120 python benchmarks/with_setting.py tidal.kernels.extend_attention.EXTEND_STAGES_FP8=$([ $kv = fp8-5 ] && echo 5 || echo 2) -- \
        benchmarks/bench_qwen.py --model vl --no-hf --batches 1 --tokens 4 --no-concurrent --profile --prefill-images 1 --kv-dtype ${kv%-5} --out "$out/$kv" 2>&1 | grep -E "^prefill step|time to first" | sed "s|^|kv $kv: |"
      grep -E "_extend_kernel|_qk_norm_rope_kv|cudnn|nvjet" "$out/$kv/profile-prefill-1-images.txt" | head -8 | cut -c1-60,132-146,188-203 | sed "s|^|kv $kv: |"
    done ;;
  attention-large)
    # grouped decode attention at batch 64 / 128 over bf16 and float8 caches: splits, then tiles (GQA_TILE, GQA_TILE_FP8)
    timeout 300 python benchmarks/bench_kernels.py --only attention-large --out "$out" 2>&1 | tail -16 ;;
  priority)
    # the MoE branch's stream priority (text.BRANCH_PRIORITY: 0 default, -1 higher; only the order of the two matters): Moondream decode, each way in one call
    # (its bits test is test_cuda's parallel_branches, in the tests part)
    for v in 0 -1; do
      timeout 110 python benchmarks/with_setting.py tidal.models.moondream3.text.BRANCH_PRIORITY=$v -- benchmarks/bench_moondream.py --quick --only decode --out "$out/prio$v" 2>&1 | grep -E "decode batch (1|8|32):" | sed "s|^|priority $v: |"
    done ;;
  pdl)
    # programmatic dependent launch: a chain of products alone, then tidal.kernels.pdl's bits tests (Moondream, Qwen3-MoE)
    timeout 200 python benchmarks/bench_pdl.py --out "$out"
    tests_in 250 "pdl tests" tests/test_cuda.py tests/test_qwen_fast_path.py -k programmatic ;;
  pdl-decode)
    # tidal.kernels.pdl off / on: both MoE models' decode, each way in one call
    for v in False True; do
      timeout 110 python benchmarks/with_setting.py tidal.kernels.pdl.ENABLED=$v -- benchmarks/bench_moondream.py --quick --only decode --out "$out/pdl-$v" 2>&1 | grep -E "decode batch (1|8|32):" | sed "s|^|pdl $v: |"
      timeout 90 python benchmarks/with_setting.py tidal.kernels.pdl.ENABLED=$v -- benchmarks/bench_qwen.py --model moe --no-hf --no-concurrent --batches 1 8 --out "$out/pdl-$v" 2>&1 | grep -E "^tidal decode" | sed "s|^|pdl $v: |"
    done ;;
  matrix)
    # one call, baselines beside: the committed fused-MoE table and moe_candidate.json (repo root, untracked) with PDL off and on;
    # Moondream also on one stream (PDL's waiting programs may crowd the MoE branch on the side stream)
    cp tidal/kernels/moe_configs.json /tmp/moe_committed.json
    for table in committed candidate; do
      if [ $table = candidate ]; then cp moe_candidate.json tidal/kernels/moe_configs.json; fi
      for v in False True; do
        for streams in True False; do
          if [ $streams = False ] && [ $table = committed ]; then continue; fi
          timeout 80 python benchmarks/with_setting.py tidal.kernels.pdl.ENABLED=$v tidal.models.moondream3.text.PARALLEL_BRANCHES=$streams -- benchmarks/bench_moondream.py --quick --only decode --out "$out/md-$table-$v-$streams" 2>&1 | grep -E "decode batch (1|8|32):" | sed "s|^|moondream $table pdl=$v two_streams=$streams: |"
        done
        timeout 70 python benchmarks/with_setting.py tidal.kernels.pdl.ENABLED=$v -- benchmarks/bench_qwen.py --model moe --no-hf --no-concurrent --batches 1 8 --out "$out/qwen-$table-$v" 2>&1 | grep -E "^tidal decode" | sed "s|^|qwen3-30b $table pdl=$v: |"
      done
    done
    cp /tmp/moe_committed.json tidal/kernels/moe_configs.json ;;
  pdl-check)
    # tidal.kernels.pdl's early-weights form (the router and skinny products load weights before the wait) and
    # tidal.kernels.l2_prefetch (a skinny program asks for its weight slice in L2 first): bits tests, the chain, then the decode A/B
    tests_in 90 "pdl tests" tests/test_kernels.py tests/test_qwen_fast_path.py -k "programmatic or skinny_chain or router_after"
    timeout 80 python benchmarks/bench_pdl.py --out "$out" 2>&1 | tail -12
    for form in "True False auto False" "True True auto False" "True True all False" "True True all True"; do
      set -- $form
      timeout 60 python benchmarks/with_setting.py tidal.kernels.pdl.ENABLED=$1 tidal.kernels.pdl.EARLY_WEIGHTS=$2 tidal.kernels.l2_prefetch.L2_PREFETCH=$4 -- benchmarks/bench_qwen.py --model moe --no-hf --no-concurrent --batches 1 8 --skinny $3 --out "$out/qwen-$1-$2-$3-$4" 2>&1 | grep -E "^tidal decode" | sed "s|^|qwen3-30b pdl=$1 early=$2 skinny=$3 l2=$4: |"
    done
    for v in False True; do
      timeout 75 python benchmarks/with_setting.py tidal.kernels.pdl.EARLY_WEIGHTS=$v -- benchmarks/bench_qwen.py --model vl --no-hf --no-concurrent --batches 1 32 --out "$out/vl-$v" 2>&1 | grep -E "^tidal decode" | sed "s|^|qwen3-vl-8b early=$v: |"
    done ;;
  route-in-up)
    # one token routed in the experts' up kernel (moe_route.ROUTE_IN_UP): its bits tests, then both MoE models' decode off / on
    tests_in 150 "route-in-up tests" tests/test_kernels.py tests/test_qwen_fast_path.py -k "routed_in_the_up"
    for v in False True; do
      timeout 60 python benchmarks/with_setting.py tidal.kernels.moe_route.ROUTE_IN_UP=$v -- benchmarks/bench_qwen.py --model moe --no-hf --no-concurrent --batches 1 8 --out "$out/qwen-route-$v" 2>&1 | grep -E "^tidal decode" | sed "s|^|qwen3-30b route in up=$v: |"
      timeout 80 python benchmarks/with_setting.py tidal.kernels.moe_route.ROUTE_IN_UP=$v -- benchmarks/bench_moondream.py --quick --only decode --out "$out/md-route-$v" 2>&1 | grep -E "decode batch (1|8):" | sed "s|^|moondream route in up=$v: |"
    done ;;
  md-pdl-branches)
    tests_in 150 "pdl branch tests" tests/test_cuda.py -k "pdl_branches or programmatic"
    for v in none main side both; do
      timeout 80 python benchmarks/with_setting.py "tidal.models.moondream3.text.PDL_BRANCHES='$v'" -- benchmarks/bench_moondream.py --quick --only decode --out "$out/md-pdl-$v" 2>&1 | grep -E "decode batch (1|8|32):" | sed "s|^|moondream pdl on $v: |"
    done ;;
  round)
    # the most per call where starts are scarce (~570 s): test_cuda, the PDL chain with its L2 forms, and Qwen3-30B decode
    # with the forms written since the last device run (early weights + every projection skinny + L2 prefetch; routing in the up kernel)
    tests_in 200 tests/test_cuda.py tests/test_cuda.py
    timeout 80 python benchmarks/bench_pdl.py --out "$out" 2>&1 | tail -12
    for form in "False False auto False" "True True all True" "False False auto True"; do
      set -- $form
      timeout 60 python benchmarks/with_setting.py tidal.kernels.pdl.EARLY_WEIGHTS=$1 tidal.kernels.l2_prefetch.L2_PREFETCH=$2 tidal.kernels.moe_route.ROUTE_IN_UP=$4 -- benchmarks/bench_qwen.py --model moe --no-hf --no-concurrent --batches 1 8 --skinny $3 --out "$out/qwen-$1-$2-$3-$4" 2>&1 | grep -E "^tidal decode" | sed "s|^|qwen3-30b early=$1 l2=$2 skinny=$3 route-in-up=$4: |"
    done ;;
  tau)
    tests_in 120 "test_kernels (tau)" tests/test_kernels.py -k "tau or bf16_parts"
    for v in True False; do
      timeout 110 python benchmarks/with_setting.py tidal.kernels.tau_rope.LIN_KERNEL=$v -- benchmarks/profile_step.py --batch 1 --mixed --no-micro --out "$out/tau-$v" > /dev/null 2>&1
      grep -E "=== mixed|_tau_lin_kernel|sm80_xmma_gemm_f32|GeluCUDA|direct_copy|^total" "$out/tau-$v/profile.txt" | tail -8 | sed "s|^|tau kernel $v: |"
    done ;;
  check)
    for f in tests/test_fast_path.py tests/test_qwen3_moe.py; do
      tests_in 100 "$f" "$f"
    done
    tests_in 150 "test_kernels (attention, routing)" tests/test_kernels.py -k "decode_attention or route"
    timeout 150 python benchmarks/bench_kernels.py --out "$out" 2>&1 | sed -n '/decode attention/,$p'
    timeout 150 python benchmarks/bench_moondream.py --quick --only decode --out "$out" 2>&1 | grep "decode batch"
    timeout 120 python benchmarks/bench_qwen.py --model moe --no-hf --batches 1 64 --out "$out" 2>&1 | grep -E "^tidal|where it went" ;;
  timeline|md-timeline)
    timeout 100 python benchmarks/profile_step.py --batch 1 --no-micro --out "$out" 2>&1 | grep -E "^copy|^steps back|=== decode|^timeline|per stream|^  idle|^  on stream|^  - |^  host in|^host phases|^  phase "
    [ "$part" = md-timeline ] || timeout 80 python benchmarks/bench_qwen.py --model moe --no-hf --no-concurrent --batches 1 --profile --out "$out" 2>&1 | grep -E "tidal decode|^timeline|per stream|^  idle|^  on stream|^  - |^host phases|^  phase " ;;
  *) echo "unknown part $part" >&2; exit 2 ;;
esac
