#!/bin/bash
# One batched GPU call (device tool, <= 600 s), each measurement bounded by `timeout` so that one failure or
# overrun leaves the others their time. Results land in $OUT.
#   bash benchmarks/gpu/gpu_session.sh            # the 2026-11 H100 batch (RESULTS.md entry of code 7003b8b)
#   bash benchmarks/gpu/gpu_session.sh profile    # where the W4A4 step's ~40 ms over W8A8 goes (gpu_notes.md):
#       kernels per layer on the GPU, per-kernel profile of the 512 px step, steps inside a lax.scan with
#       weights as stored and prepared with the prologue kernel (timeouts sum to 545 s)
#   bash benchmarks/gpu/gpu_session.sh core       # Mosaic int8 GEMM; 1024 x 1 steps incl. prepared + prologue kernel
#   bash benchmarks/gpu/gpu_session.sh rest       # per-kernel profiles at 512 x 1; qwix at 1024 x 1; 1024 x 4
#   bash benchmarks/gpu/gpu_session.sh next       # prepared weights with the XLA prologue in the step; 1024 x 4 (ran 12-05 10:46, H100)
#   bash benchmarks/gpu/gpu_session.sh next2      # steps inside the sampler's scan; W8A8 / qwix at batch 4  (ran 12-05 10:58, H100)
#   bash benchmarks/gpu/gpu_session.sh next3      # what 12-05's calls left: the prepared W4A4 step's per-kernel profile,
#                                             # prepared / W8A8 inside the scan, W4A4 prepared and bf16 at batch 4
#   bash benchmarks/gpu/gpu_session.sh i24a      # issue 24, first call: FP8 vs int8 GEMM and the joint down-projection
#                                             # per layer (routes.py), the online Hadamard per layer (layer_kernels
#                                             # --rotations), command buffers for the scanned step (cb-while)
#   bash benchmarks/gpu/gpu_session.sh i24b      # issue 24, second call: routes.py with FP8 codes made beforehand, the
#                                             # Hadamard as dense Kronecker factors, the joint down-projection;
#                                             # bf16 scan under default / cb-off, W4A4-small under cb-off
#   bash benchmarks/gpu/gpu_session.sh i24c      # Hadamard implementations per call and per prepared layer, joint
#                                             # down-projection, 1024- and 512-px steps of bf16, W8A8 and the paper /
#                                             # smoothing + rotation W4A4-small presets (2-step scan)
#   bash benchmarks/gpu/gpu_session.sh i24d      # all six modes' 1024-px steps (+ smoothing-only -small, paper W4A4)
#   bash benchmarks/gpu/gpu_session.sh i24x      # next: fused linear on the Mosaic GEMM: check + 512-px steps (<= 400 s);
#                                             # then i24y (1024 px), i24z (W8A8 on Triton / Mosaic, 512 + 1024 px)
#   bash benchmarks/gpu/gpu_session.sh i24cg     # 12-08 first: codes x' * (1 / s) checked, device us incl. bf16 GEMM,
#                                             # 512-px steps bf16 / paper-small merged without and with CUDA graphs
#   bash benchmarks/gpu/gpu_session.sh i24run    # after i24cg, if the Hadamard kernel's runs of 128 were faster: their
#                                             # fused check, 512-px steps with runs of 64 / 128 (bf16 in each)
#   bash benchmarks/gpu/gpu_session.sh i24all    # next: the record, 512 + 1024 px: bf16, W8A8 merged, paper-small, paper
#   bash benchmarks/gpu/gpu_session.sh i24merge  # after i24all: GPU check of q/k/v as one layer, 512-px steps merged vs not
#   bash benchmarks/gpu/gpu_session.sh i24mchk   # very short of device time: i24merge's check alone
#   bash benchmarks/gpu/gpu_session.sh i24go     # next (12-07 evening on): K = 1536 codes check, 512-px steps
#   bash benchmarks/gpu/gpu_session.sh i24chk    # very short of device time: i24go's checks alone
#   bash benchmarks/gpu/gpu_session.sh i24prof2  # after i24go: 512-px profile of "fast-mosaic", Hadamard tunings
#   bash benchmarks/gpu/gpu_session.sh i24tune   # after i24next: GEMM tile sweep at the 512-px shapes, Hadamard kernel tunings
#   bash benchmarks/gpu/gpu_session.sh i24gaps   # after i24all: 512-px steps with the scanned step as CUDA graphs
#   bash benchmarks/gpu/gpu_session.sh i24codes  # next: the Hadamard kernel's codes as x' * (1 / s) (one division per
#                                             # row): exactness + device us, fused check, 512-px steps bf16 / merged
#   bash benchmarks/gpu/gpu_session.sh i24floor  # (<= 200 s) what a Mosaic call costs vs rows: device us and gaps of
#                                             # the Hadamard / codes / int8 GEMM kernels at 128-8192 rows, the floor
#   bash benchmarks/gpu/gpu_session.sh i24next   # next: in-kernel codes per swizzle, fused check of fast-mosaic, 512-px steps
#   bash benchmarks/gpu/gpu_session.sh i24rt     # next: fused check of the run maxima (XLA reduce vs the GEMM's 16-column blocks)
#   bash benchmarks/gpu/gpu_session.sh i24fix    # next: GPU check + 512-px steps after the per-call XLA kernels were removed
#   bash benchmarks/gpu/gpu_session.sh i24last   # next: 512-px profile + HLO of prepbfh alone; W8A8 Mosaic + FP8 attention at 1024 px
#   bash benchmarks/gpu/gpu_session.sh i24w8     # next: W8A8 on the Mosaic GEMM + cuDNN FP8 attention, 1024 + 512 px, bf16 beside
#   bash benchmarks/gpu/gpu_session.sh i24prof   # next: 512-px profile + HLO bf16 / prepbfh, then 1024-px steps bf16 / prepbfh
#   bash benchmarks/gpu/gpu_session.sh i24step   # next: 512-px steps bf16 + one W4A4 mode (MODES, SIZE), compile times
#   bash benchmarks/gpu/gpu_session.sh i24had    # 12-07: the Mosaic Hadamard kernel: exactness + us per call, fused
#                                             # checks, 512-px steps bf16 / prepbfr / prepbfh / prepbf (<= 580 s)
#   bash benchmarks/gpu/gpu_session.sh i24rot    # 12-07: the rotation + features + row-max kernel vs XLA (<= 200 s)
#   bash benchmarks/gpu/gpu_session.sh i24w      # 12-07: the warp-specialized Mosaic int8 GEMM, sweep + shapes (<= 300 s)
#   bash benchmarks/gpu/gpu_session.sh i24t      # next (after 12-07 03:26): GPU check of the shared q/k/v down-projection,
#                                             # 512-px steps bf16 / paper-small prepbf (shared) / prepbfns (per layer),
#                                             # DotMerger off; profile + HLO (the scale from one shared max-reduce);
#                                             # i24u: 1024 px bf16 / paper-small / paper prepbf
#   bash benchmarks/gpu/gpu_session.sh i24v      # 12-07 03:26 (ran): shared-down GPU check, 512 + 1024-px bf16 / prepbf,
#                                             # profile (`CASES`, `T` set its sizes and time)
#   (i24s, written 12-06 and never run, was i24v without the shared check: 512 + 1024-px steps bf16 / paper-small
#                                             # prepbf, DotMerger off; profile)
#   bash benchmarks/gpu/gpu_session.sh i24q      # 12-06 (6): 512-px steps bf16 / paper-small prepbf (level tables, bf16
#                                             # inner stage), 3 XLA variants, profile + HLO; i24r: 1024 px (ran)
#   bash benchmarks/gpu/gpu_session.sh i24o      # 12-06 (5): 6144 Hadamard wide-sum per call; 512-px profile + optimized
#                                             # HLO + steps (prepbf, joint features in place, wide-sum); i24p: 1024 px
#   bash benchmarks/gpu/gpu_session.sh i24n      # 12-06 (4): 512-px step profile bf16 / W8A8 / paper-small prepbf, then
#                                             # 1024-px prepbf steps
#   bash benchmarks/gpu/gpu_session.sh i24l      # next: the prologue kernel feature by feature, 16 warps, down="input",
#                                             # 512 px; i24m: 1024 px prep vs prepin
#   bash benchmarks/gpu/gpu_session.sh i24j      # 12-06 (2) after i24h: per-kernel paper layer, 512-px prepk at 8 warps,
#                                             # paper (not -small) at 512; i24k: paper (not -small) at 1024
#   bash benchmarks/gpu/gpu_session.sh i24h      # 12-06 (2): the rotation inside the prologue kernel: GPU check, layer,
#                                             # 512-px steps (prep vs prepk); i24i: the 1024-px steps
#   bash benchmarks/gpu/gpu_session.sh i24f      # after 12-06: Hadamard impls per call, 512-px steps (bf16, paper-small,
#                                             # W8A8, qdit4sr-small); i24g: 1024-px paper W4A4 and dense-wide
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
# one persistent compilation cache for the call's processes (since 12-08): the quantize programs and the bf16 step
# compile once per call, not once per script; outside $OUT, so none of it comes back. A "compile s" figure of a
# program that an earlier script of the call compiled is then a cache read.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/qdit4sr-jax-cache}
nvidia-smi --query-gpu=name,clocks.sm --format=csv,noheader
t0=$(date +%s); el() { echo "== [$(( $(date +%s) - t0 )) s] $*"; }
# steps NAME TIMEOUT ARGS...: benchmarks/step_latency.py ARGS bounded by TIMEOUT, its JSON and log as $OUT/NAME.json /
# .log, then its result lines (the JAX warnings left out)
steps() {
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 benchmarks/step_latency.py "$@" --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  grep -v "^W[0-9]\|Warning" "$OUT/$name.log" | grep "quantized\|px b\|note" | cut -c1-230
}
# shared_check LIMIT: the GPU check of the shared q / k / v down-projection (benchmarks/gpu/prologue_check.py --shared)
shared_check() {
  el "shared down-projection check"; timeout "$1" python3 benchmarks/gpu/prologue_check.py --shared --m 8192 \
      --k 1536 --n 1536 --out "$OUT/shared_check.json" 2>&1 | grep -v "^W[0-9]\|Warning" | tail -4 | cut -c1-230
}
# profile512 MODE [ARGS...]: the 512-px per-kernel profile + optimized HLO of MODE (step_profile.py ARGS) with what is
# left of ${T:-550} s since t0 (none below 120 s: `timeout 0` would mean no limit), as $OUT/profile512.json / .log, $OUT/hlo
profile512() {
  local left=$(( ${T:-550} - ($(date +%s) - t0) ))
  [ $left -ge 120 ] || { el "profile 512 skipped ($left s left)"; return 0; }
  el "profile 512 + HLO ($left s)"; timeout $left python3 benchmarks/gpu/step_profile.py --cases 512x1 \
      --modes "$1" --hlo "$OUT/hlo" --attention cudnn --iters 2 --warmup 1 --top 40 "${@:2}" \
      --out "$OUT/profile512.json" > "$OUT/profile512.log" 2>&1
  grep -v "^W[0-9]\|Warning" "$OUT/profile512.log" | grep "^|\|^#\|^fusions\|ms of kernels" | cut -c1-170 | head -90
}
# fused_check NAME LIMIT ARGS...: benchmarks/gpu/mosaic_fused_check.py ARGS (--no-time) bounded by LIMIT, as
# $OUT/NAME.json / .log, then one summary line (members, rel. errors, ok); its exit status
fused_check() {
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 benchmarks/gpu/mosaic_fused_check.py --no-time "$@" --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -v "^W[0-9]\|Warning" "$OUT/$name.log" | grep -o "'member': '[a-z_]*'\|'rel_vs_triton': [0-9.e-]*\|'rel_vs_fake': [0-9.e-]*\|'ok': [A-Za-z]*\|'error.*" | paste -sd' ' | cut -c1-900
  return $rc
}
# passed RC NAME: whether fused_check NAME (exit status RC) passed: every row 'ok', no error
passed() { [ "$1" -eq 0 ] && grep -q "'ok': True" "$OUT/$2.log" && ! grep -q "'error'\|'ok': False" "$OUT/$2.log"; }
# hadamard_tune LIMIT FEATURE_SHAPES: the Hadamard kernel's tunings (warpgroups, prefetch, output slots) and the
# features GEMM's first FEATURE_SHAPES shapes (benchmarks/gpu/rotation_gemm.py), as $OUT/hadamard_tune.json / .log
hadamard_tune() {
  timeout "$1" python3 benchmarks/gpu/rotation_gemm.py --shapes 0 --hadamard-shapes 3 --features-shapes "$2" \
      --hadamard-configs w2p1o1 w3p2o2 w2p2o2 w1p3o2 w2p1o1c128 w3p2o2c128 --reps 4 --out "$OUT/hadamard_tune.json" > "$OUT/hadamard_tune.log" 2>&1
  grep -v "^W[0-9]\|Warning" "$OUT/hadamard_tune.log" | cut -c1-400 | tail -12
}
# steps512 T MODES... [OPTIONS]: the 512-px steps of MODES (step_latency.py OPTIONS after them) with what is left of
# T s since t0, as $OUT/${S512_NAME:-steps512}.json / .log, under the XLA option sets ${S512_VARIANTS:-no-dot-merge}
steps512() {
  local left=$(( $1 - ($(date +%s) - t0) )); shift
  el "steps 512 ($left s): $*"; steps ${S512_NAME:-steps512} $(( left - 5 )) --cases 512x1 --scan-steps 2 --modes "$@" \
      --attention cudnn --xla-variants ${S512_VARIANTS:-no-dot-merge} --iters 6 --warmup 1 --deadline $(( left - 20 ))
}
if [ "${1:-}" = i24v ]; then
  # issue 24, 12-07, one call when device time is short (<= 560 s): the GPU check of the shared q / k / v
  # down-projection, then the 512 + 1024-px steps of bf16 and paper-small "fast" (everything since 12-06 22:16), DotMerger
  # off, then the 512-px profile + HLO with what time is left of ${T:-550} s.
  P=p:qdit4sr-paper-w4a4-small
  shared_check 70
  el "steps ${CASES:-512x1 1024x1}"; steps steps $(( ${T:-550} - 60 )) --cases ${CASES:-512x1 1024x1} \
      --scan-steps 2 --modes bf16 $P:prepbf --attention cudnn --xla-variants no-dot-merge --iters 6 --warmup 1 --deadline $(( ${T:-550} - 90 ))
  profile512 $P:prepbf
  el done
  exit 0
fi
if [ "${1:-}" = i24y ] || [ "${1:-}" = i24z ]; then
  # issue 24, after i24x (<= 560 s each). i24y: the 1024-px steps bf16 / paper-small "fast" on Triton / on the Mosaic
  # GEMM. i24z: W8A8 (the `w8a8` preset, prepared) on Triton / on Mosaic at 512 and 1024 px, bf16 beside.
  if [ "$1" = i24y ]; then
    P=p:qdit4sr-paper-w4a4-small
    el "steps 1024"; steps steps1024 550 --cases 1024x1 --scan-steps 2 --modes bf16 $P:prepbf $P:prepbfm \
        --attention cudnn --xla-variants no-dot-merge --iters 4 --warmup 1 --deadline 500
  else
    el "w8a8 steps"; steps w8a8 550 --cases 512x1 1024x1 --scan-steps 2 --modes bf16 p:w8a8:prepbf p:w8a8:prepbfm \
        --attention cudnn --xla-variants no-dot-merge --iters 4 --warmup 1 --deadline 500
  fi
  el done
  exit 0
fi
if [ "${1:-}" = i24x ]; then
  # issue 24, 12-07 (<= 400 s): the fused linear on the warp-specialized Mosaic GEMM (prepare(gemm="mosaic")):
  # GPU check vs the Triton GEMM and fake-quant + time per call, then the 512-px steps bf16 / paper-small "fast"
  # on Triton (prepbf) / on Mosaic (prepbfm) (X_MODES: other modes, e.g. the plain paper preset's grouped GEMM:
  # "bf16 p:qdit4sr-paper-w4a4:prepbf p:qdit4sr-paper-w4a4:prepbfm")
  # (the kernel's first run: if the check fails or hangs, no step runs on it; the standalone GEMM sweep runs instead)
  el "mosaic fused check"; timeout ${CHECK_S:-100} python3 benchmarks/gpu/mosaic_fused_check.py --cases ${CHECK_CASES:-4} \
      --variants ${CHECK_VARIANTS:-mosaic} --out "$OUT/mosaic_fused_check.json" > "$OUT/mosaic_fused_check.log" 2>&1; rc=$?
  grep -v "^W[0-9]\|Warning" "$OUT/mosaic_fused_check.log" | cut -c1-300 | tail -14
  P=p:qdit4sr-paper-w4a4-small
  left=$(( ${T:-390} - ($(date +%s) - t0) ))
  if [ $rc -ne 0 ] || grep -q "'error'\|'finite': False" "$OUT/mosaic_fused_check.log"; then
    el "check failed (rc $rc): standalone GEMM sweep instead ($left s)"; timeout $left python3 benchmarks/gpu/ws_gemm.py \
        --deadline $(( left - 40 )) --out "$OUT/ws_gemm.json" > "$OUT/ws_gemm.log" 2>&1
    grep -v "^W[0-9]\|Warning\|Deprecat" "$OUT/ws_gemm.log" | cut -c1-260 | tail -30
  else
    el "steps 512 ($left s)"; steps steps512 $left --cases 512x1 --scan-steps 2 --modes ${X_MODES:-bf16 $P:prepbf $P:prepbfm} \
        --attention cudnn --xla-variants no-dot-merge --iters 8 --warmup 2 --deadline $(( left - 20 ))
  fi
  el done
  exit 0
fi
if [ "${1:-}" = i24all ]; then
  # issue 24's record (<= ${T:-580} s): one call, the 512- and 1024-px steps (2-step scan, CFG, batch 1, cuDNN
  # attention, DotMerger off) of bf16, W8A8, the paper preset's -small form and the paper preset, all as the sampler's
  # "fast-mosaic" (q / k / v merged, prepbfhq); the deadline drops the last modes first (ALL_MODES, ALL_CASES,
  # ALL_VARIANT override)
  el "steps ${ALL_CASES:-512x1 1024x1}"; steps all $(( ${T:-580} - 5 )) --cases ${ALL_CASES:-512x1 1024x1} --scan-steps 2 \
      --modes ${ALL_MODES:-bf16 p:w8a8:prepbfhq p:qdit4sr-paper-w4a4-small:prepbfhq p:qdit4sr-paper-w4a4:prepbfhq} \
      --attention cudnn --xla-variants ${ALL_VARIANT:-no-dot-merge} --iters 6 --warmup 1 --deadline $(( ${T:-580} - 25 ))
  el done
  exit 0
fi
if [ "${1:-}" = i24mchk ]; then
  # very short of device time (<= ${CHECK_S:-150} s): i24merge's GPU check of the merged group alone
  el "merged group check"; fused_check merge_check ${CHECK_S:-150} --cases 1 --variants mosaic_had mosaic_had_merged
  el done
  exit 0
fi
if [ "${1:-}" = i24merge ]; then
  # issue 24, after i24all (<= ${T:-570} s): the GPU check of a to_q / to_k / to_v group as one layer (the sampler's
  # "fast-mosaic" since 12-07 23:10: one Mosaic GEMM of N = 3 x 1536 reading each member's low-rank features per 1536 columns)
  # against Triton and the unmerged group; if right, the 512-px steps of bf16 and paper-small / W8A8 "fast-mosaic"
  # unmerged (prepbfh) and merged (prepbfhq), else the same without the merged paper-small mode
  P=p:qdit4sr-paper-w4a4-small
  el "merged group check"; fused_check merge_check ${CHECK_S:-100} --cases 1 --variants mosaic_had mosaic_had_merged
  if passed $? merge_check; then steps512 ${T:-570} bf16 $P:prepbfh $P:prepbfhq p:w8a8:prepbfh p:w8a8:prepbfhq
  else el "merged group not right: W8A8 only"; steps512 ${T:-570} bf16 $P:prepbfh p:w8a8:prepbfh p:w8a8:prepbfhq; fi
  el done
  exit 0
fi
if [ "${1:-}" = i24go ]; then
  # issue 24, one call when device time is short (<= ${T:-570} s): the fused linear with the K = 1536 codes made in
  # the Hadamard kernel (the race fix, checked right on 12-07 16:05, now the default) vs Triton; if right, the 512-px
  # steps bf16 / "fast-mosaic" (prepbfh, never timed with these codes) / W8A8 on the Mosaic GEMM (with the one-step
  # level table since 12-07 16:05: 0.96x before it); if not, the check of "fast-mosaic" with K = 1536 codes from
  # XLA and the steps with it if that passes, else on the Mosaic GEMM alone (prepbfm)
  P=p:qdit4sr-paper-w4a4-small
  el "fused check, K = 1536 codes in the kernel"
  fused_check go64_check ${CHECK_S:-90} --cases 3 --variants mosaic_had --codes-in-kernel 64 128
  if passed $? go64_check; then
    steps512 ${T:-570} bf16 $P:prepbfh p:w8a8:prepbfm --codes-in-kernel 64 128
  else
    el "K = 1536 in-kernel codes not right: fast-mosaic with XLA's codes there"
    fused_check go_check ${CHECK_S:-90} --cases 3 --variants mosaic_had --codes-in-kernel 128
    if passed $? go_check; then steps512 ${T:-570} bf16 $P:prepbfh p:w8a8:prepbfm --codes-in-kernel 128
    else el "fast-mosaic check failed: Mosaic GEMM alone"; steps512 ${T:-570} bf16 $P:prepbfm p:w8a8:prepbfm; fi
  fi
  el done
  exit 0
fi
if [ "${1:-}" = i24chk ]; then
  # issue 24, when device time is very short (<= ${T:-200} s): i24go's checks alone, the fused linear with the K = 1536
  # codes made in the Hadamard kernel (the race fix), then with them from XLA, each vs Triton and fake-quant
  el "fused check, K = 1536 codes in the kernel"
  fused_check go64_check ${CHECK_S:-100} --cases 3 --variants mosaic_had --codes-in-kernel 64 128
  left=$(( ${T:-200} - ($(date +%s) - t0) ))
  [ $left -ge 50 ] && { el "fused check, K = 1536 codes from XLA ($left s)"; fused_check go_check $(( left - 5 )) --cases 3 \
      --variants mosaic_had --codes-in-kernel 128; }
  el done
  exit 0
fi
if [ "${1:-}" = i24prof2 ]; then
  # issue 24, after i24go (<= ${T:-420} s): the 512-px per-kernel profile + HLO of "fast-mosaic" (prepbfh; PROF_ARGS,
  # e.g. "--codes-in-kernel 128" for K = 1536 codes from XLA), its Mosaic kernels named (GEMM / Hadamard / features),
  # then the Hadamard kernel's tunings with the time left
  P=p:qdit4sr-paper-w4a4-small
  T=$(( ${T:-420} - ${HT_S:-110} )) profile512 ${PROF_MODE:-$P:prepbfh} ${PROF_ARGS:-}
  left=$(( ${T:-420} - ($(date +%s) - t0) ))
  [ $left -ge 60 ] && { el "Hadamard configs ($left s)"; hadamard_tune $(( left - 5 )) 0; }
  el done
  exit 0
fi
if [ "${1:-}" = i24tune ]; then
  # issue 24, after i24next (<= ${T:-570} s): tunings of the Mosaic kernels at the 512-px step's shapes: the
  # warp-specialized int8 GEMM's tile / grid sweep kept on the first 4 shapes (2048-4096 rows), then the Hadamard
  # kernel's (warpgroups, prefetch, output slots) and the features GEMM vs XLA's dot
  el "ws GEMM sweep"; timeout ${WS_S:-280} python3 benchmarks/gpu/ws_gemm.py --shapes 4 --keep 4 --deadline $(( ${WS_S:-280} - 40 )) \
      --out "$OUT/ws_gemm.json" > "$OUT/ws_gemm.log" 2>&1
  grep -v "^W[0-9]\|Warning\|Deprecat" "$OUT/ws_gemm.log" | cut -c1-260 | tail -16
  left=$(( ${T:-570} - ($(date +%s) - t0) ))
  el "Hadamard configs, features GEMM ($left s)"; hadamard_tune $(( left - 5 )) 2
  el done
  exit 0
fi
if [ "${1:-}" = i24cg ]; then
  # issue 24, 12-08 first call (<= ${T:-570} s): (1) the fused check of "fast-mosaic"'s layers vs Triton with the
  # Hadamard kernel's codes as x' * (1 / s) (lowered only so far); (2) device us per call (`launch_floor.py`) of the
  # Hadamard kernel (x', codes of 1 / 3 members) at run lengths 64 and 128 (2 / 4 rows of x per tile at K = 1536),
  # the int8 GEMM and cuBLAS bf16 (a weight per call) at 2048 / 4096 rows: the codes epilogue's cost, the tile size,
  # the GEMM ratio by device time; (3) the 512-px steps of paper-small "fast-mosaic" (merged, prepbfhq; CG_MODES)
  # and bf16 with DotMerger off, and the same with the scanned step as CUDA graphs (command buffers incl. WHILE, min
  # graph size 1): do the Mosaic route's ~12 ms of gaps go?
  P=p:qdit4sr-paper-w4a4-small
  el "fused check (codes as x' * (1 / s))"; fused_check codes_check ${CHECK_S:-90} --cases 3 --variants mosaic_had
  ok=$?
  el "device us per call"; timeout ${LF_S:-130} python3 benchmarks/gpu/launch_floor.py --kinds hadamard codes1 codes3 \
      int8_gemm bf16_gemm --rows 2048 4096 --hadamard-runs 64 128 --deadline $(( ${LF_S:-130} - 25 )) \
      --out "$OUT/launch_cg.json" > "$OUT/launch_cg.log" 2>&1
  grep -v "^W[0-9]\|Warning\|Deprecat" "$OUT/launch_cg.log" | cut -c1-200 | tail -17
  # the quantized mode first: if the deadline drops a run, it is bf16 under CUDA graphs (ratios fill in either way)
  if passed $ok codes_check; then modes="${CG_MODES:-$P:prepbfhq} bf16"; else el "fused check failed: W8A8 only"; modes="p:w8a8:prepbfhq bf16"; fi
  S512_NAME=cg512 S512_VARIANTS="no-dot-merge nodm-cb-while-min1" steps512 ${T:-570} $modes
  el done
  exit 0
fi
if [ "${1:-}" = i24run ]; then
  # issue 24, after i24cg if its runs of 128 were faster (<= ${T:-570} s): the fused check of "fast-mosaic"'s layers
  # with the Hadamard kernel's runs of 128 at K = 1536 (4 rows of x per tile; never run on a GPU) vs Triton; if right,
  # the 512-px steps bf16 / paper-small "fast-mosaic" with runs of 64 (the default), then, in a second process,
  # bf16 / the same with runs of 128 (`--hadamard-run 1536=128`: read when traced, one setting per process)
  P=p:qdit4sr-paper-w4a4-small
  el "fused check, runs of 128 at K = 1536"; fused_check run_check ${CHECK_S:-90} --cases 3 --variants mosaic_had \
      --hadamard-run 1536=128
  if passed $? run_check; then
    now=$(( $(date +%s) - t0 ))          # runs of 64 until half of what is left, then runs of 128
    S512_NAME=run64 steps512 $(( now + (${T:-570} - now) / 2 )) bf16 $P:prepbfhq --hadamard-run 1536=64
    S512_NAME=run128 steps512 ${T:-570} bf16 $P:prepbfhq --hadamard-run 1536=128
  else el "runs of 128 not right: no steps"; fi
  el done
  exit 0
fi
if [ "${1:-}" = i24codes ]; then
  # issue 24, next (<= ${T:-570} s): the Hadamard kernel's codes epilogue with one division per row instead of one per
  # element (36.8 vs 17.4 us for 3 members' codes vs x' at 4096 x 1536 before, H200 23:17): (1) its codes against
  # its own XLA form (`rotation_gemm.py`'s hadamard rows: differing codes must be 0); (2) device us per call of x' /
  # 1 / 3 members' codes at 2048 and 4096 rows (`launch_floor.py`); (3) the fused check of "fast-mosaic"'s layers vs
  # Triton; if it passes, (4) the 512-px steps bf16 / paper-small "fast-mosaic" (merged) / W8A8 merged
  P=p:qdit4sr-paper-w4a4-small
  el "Hadamard kernel rows (codes vs own XLA form)"; timeout ${HR_S:-100} python3 benchmarks/gpu/rotation_gemm.py --shapes 0 \
      --hadamard-shapes 2 --features-shapes 0 --reps 4 --out "$OUT/rotation_codes.json" > "$OUT/rotation_codes.log" 2>&1
  grep -v "^W[0-9]\|Warning\|Deprecat" "$OUT/rotation_codes.log" | grep -i "hadamard\|codes\|error" | cut -c1-300 | tail -8
  el "device us per call"; timeout ${LF_S:-80} python3 benchmarks/gpu/launch_floor.py --kinds hadamard codes1 codes3 \
      --rows 2048 4096 --out "$OUT/launch_codes.json" > "$OUT/launch_codes.log" 2>&1
  grep -v "^W[0-9]\|Warning\|Deprecat" "$OUT/launch_codes.log" | cut -c1-200 | tail -8
  el "fused check"; fused_check codes_check ${CHECK_S:-90} --cases 3 --variants mosaic_had
  if passed $? codes_check; then steps512 ${T:-570} bf16 $P:prepbfhq p:w8a8:prepbfhq
  else el "fused check failed: no steps"; fi
  el done
  exit 0
fi
if [ "${1:-}" = i24floor ]; then
  # issue 24 (<= ${T:-200} s): the Mosaic kernels' fixed cost per call (launch_floor.py): wall and device us per call
  # of the Hadamard kernel (x' and three members' codes), the int8 GEMM and cuBLAS bf16 at 128-8192 rows, and a
  # one-tile Mosaic kernel (the floor)
  el "launch floor"; timeout $(( ${T:-200} - 5 )) python3 benchmarks/gpu/launch_floor.py --deadline $(( ${T:-200} - 40 )) \
      --out "$OUT/launch_floor.json" > "$OUT/launch_floor.log" 2>&1
  grep -v "^W[0-9]\|Warning\|Deprecat" "$OUT/launch_floor.log" | cut -c1-230 | tail -40
  el done
  exit 0
fi
if [ "${1:-}" = i24gaps ]; then
  # issue 24, after i24all (<= ${T:-570} s): the 512-px steps of bf16, paper-small "fast-mosaic" (prepbfh) and W8A8
  # merged (prepbfhq) with DotMerger off, and the same with the scanned step as CUDA graphs (command buffers incl.
  # WHILE, min graph size 1): do the ~12 ms of gaps between the Mosaic route's kernels go? (GAP_MODE: the modes)
  P=p:qdit4sr-paper-w4a4-small
  el "steps 512, command buffers"; steps gaps512 $(( ${T:-570} - 5 )) --cases 512x1 --scan-steps 2 --modes bf16 \
      ${GAP_MODE:-$P:prepbfhq p:w8a8:prepbfhq} --attention cudnn --xla-variants no-dot-merge nodm-cb-while-min1 --iters 6 --warmup 1 \
      --deadline $(( ${T:-570} - 25 ))
  el done
  exit 0
fi
if [ "${1:-}" = i24next ]; then
  # issue 24, next session (<= ${T:-570} s): (1) the Hadamard kernel's in-kernel codes per swizzle of its int8 tiles vs
  # their XLA form (wrong at K = 1536 on 12-07, before the row max stopped sharing a reduction scratch between
  # warpgroups), the level lookup at step 2; (2) the fused linear with K = 1536 codes in the kernel, then on
  # "fast-mosaic" as it is (K = 1536: kernel x' + XLA codes) vs Triton; (3) the 512-px steps bf16 / paper-small
  # "fast-mosaic" (prepbfh, if (2) passed) / "fast" on the Mosaic GEMM (prepbfm, checked bit-exact) / "fast" (prepbf)
  el hadamard; timeout ${HAD_S:-150} python3 benchmarks/gpu/rotation_gemm.py --shapes 0 --hadamard-shapes 2 --reps 4 \
      --out "$OUT/hadamard.json" > "$OUT/hadamard.log" 2>&1
  grep -v "^W[0-9]\|Warning" "$OUT/hadamard.log" | grep -o "'hadamard': \[[0-9, ]*\]\|'codes[a-z_0-9]*': [^}]*}\?" | cut -c1-300
  el "fused check, K = 1536 codes in the kernel"
  fused_check codes64_check ${CHECK_S:-70} --cases 2 --variants mosaic_had --codes-in-kernel 64 128
  el "fused check"; fused_check next_check ${CHECK_S:-100} --cases 3 --variants mosaic_had; rc=$?
  P=p:qdit4sr-paper-w4a4-small
  modes="bf16 $P:prepbfh $P:prepbfm $P:prepbf"         # (the deadline skips the last ones first)
  if ! passed $rc next_check; then
    el "fused check failed or off (rc $rc): no prepbfh step"; modes="bf16 $P:prepbfm $P:prepbf"
  fi
  steps512 ${T:-570} $modes
  el done
  exit 0
fi
if [ "${1:-}" = i24rt ]; then
  # issue 24, 12-07 after 10:25 (<= ${T:-170} s): the fused linear on the Mosaic route vs Triton with the K = 1536 run
  # maxima reduced in XLA (RUN_TILE 16, the default since i24fix found them wrong in one [64, 24] epilogue block),
  # then handed to the GEMM's 16-column blocks (--run-tile 8)
  for rt in 16 8; do
    el "fused check, run tile $rt"; fused_check rt${rt}_check ${CHECK_S:-75} --cases 2 --variants mosaic_had --run-tile $rt
  done
  el done
  exit 0
fi
if [ "${1:-}" = i24fix ]; then
  # issue 24, 12-07 after 10:10 (<= ${T:-480} s): the per-call XLA kernels of the Mosaic route gone (the Hadamard kernel
  # looks the step's levels up itself; the int8 GEMM takes the row max of the run maxima; jd padded at prepare):
  # GPU check of the fused linear vs Triton, then the 512-px steps bf16 / paper-small "fast" (prepbfh)
  el "fused check"; fused_check fix_check ${CHECK_S:-110} --cases ${CHECK_CASES:-3} --variants mosaic_had; rc=$?
  P=p:qdit4sr-paper-w4a4-small
  modes="bf16 $P:prepbfh"
  if [ $rc -ne 0 ] || grep -q "'error'\|'finite': False" "$OUT/fix_check.log"; then
    el "check failed (rc $rc): the step on the Mosaic GEMM alone"; modes="bf16 $P:prepbfm"
  fi
  steps512 ${T:-480} $modes
  el done
  exit 0
fi
if [ "${1:-}" = i24last ]; then
  # issue 24, 12-07 after 10:03 (<= ${T:-585} s): the 512-px per-kernel profile + HLO of paper-small prepbfh alone (the
  # i24prof profile ran out of time writing its HLO), then W8A8 on the Mosaic GEMM + cuDNN FP8 attention at 1024 px
  P=p:qdit4sr-paper-w4a4-small
  el "profile 512 + HLO"; timeout ${PROF_S:-240} python3 benchmarks/gpu/step_profile.py --cases 512x1 \
      --modes $P:prepbfh --hlo "$OUT/hlo" --attention cudnn --iters 2 --warmup 1 --top 40 \
      --out "$OUT/profile512.json" > "$OUT/profile512.log" 2>&1
  grep -v "^W[0-9]\|Warning" "$OUT/profile512.log" | grep "^|\|^#\|^fusions\|ms of kernels" | cut -c1-170 | head -60
  left=$(( ${T:-585} - ($(date +%s) - t0) ))
  el "w8a8 steps ($left s)"; steps w8a8 $(( left - 5 )) --cases 1024x1 --scan-steps 2 --modes bf16 p:w8a8:prepbfm \
      --attention cudnn --quant-attention fp8 --xla-variants no-dot-merge --iters 4 --warmup 1 --deadline $(( left - 20 ))
  el done
  exit 0
fi
if [ "${1:-}" = i24w8 ]; then
  # issue 24, after 12-07 09:50 (<= ${T:-585} s): W8A8 (the `w8a8` preset, prepared, GEMMs on the warp-specialized Mosaic
  # kernel) at 1024 and 512 px with cuDNN FP8 attention (QATTN), bf16 on cuDNN bf16 attention in the same run
  el "w8a8 steps"; steps w8a8 $(( ${T:-585} - 5 )) --cases ${CASES:-1024x1 512x1} --scan-steps 2 \
      --modes bf16 ${W8_MODES:-p:w8a8:prepbfm} --attention cudnn --quant-attention ${QATTN:-fp8} \
      --xla-variants no-dot-merge --iters 4 --warmup 1 --deadline $(( ${T:-585} - 25 ))
  el done
  exit 0
fi
if [ "${1:-}" = i24prof ]; then
  # issue 24, after 12-07 09:50 (<= ${T:-585} s): the 512-px per-kernel profile + optimized HLO of bf16 and paper-small
  # on the Mosaic GEMM + Hadamard codes kernel (prepbfh: 0.59x at 09:50), then the 1024-px steps bf16 / prepbfh
  P=p:qdit4sr-paper-w4a4-small
  el "profile 512 + HLO"; timeout ${PROF_S:-270} python3 benchmarks/gpu/step_profile.py --cases 512x1 \
      --modes bf16 $P:prepbfh --hlo "$OUT/hlo" --attention cudnn --iters 2 --warmup 1 --top 40 \
      --out "$OUT/profile512.json" > "$OUT/profile512.log" 2>&1
  grep -v "^W[0-9]\|Warning" "$OUT/profile512.log" | grep "^|\|^#\|^fusions\|ms of kernels" | cut -c1-170 | head -70
  left=$(( ${T:-585} - ($(date +%s) - t0) ))
  el "steps 1024 ($left s)"; steps steps1024 $(( left - 5 )) --cases 1024x1 --scan-steps 2 --modes bf16 $P:prepbfh \
      --attention cudnn --xla-variants no-dot-merge --iters 4 --warmup 1 --deadline $(( left - 20 ))
  el done
  exit 0
fi
if [ "${1:-}" = i24step ]; then
  # issue 24, after 12-07 (<= ${T:-585} s): one 512-px step call, bf16 and ONE W4A4 mode (default: paper-small on the
  # Mosaic GEMM + Hadamard codes kernel, prepbfh; MODES / SIZE override), compile times recorded in the JSON
  P=p:qdit4sr-paper-w4a4-small
  modes="${MODES:-bf16 $P:prepbfh}"
  el "steps ${SIZE:-512}: $modes"; steps steps${SIZE:-512} $(( ${T:-585} - 5 )) --cases ${SIZE:-512}x1 --scan-steps 2 \
      --modes $modes --attention cudnn --xla-variants no-dot-merge --iters 6 --warmup 1 --deadline $(( ${T:-585} - 25 ))
  grep -o '"compile_s": [0-9.]*' "$OUT/steps${SIZE:-512}.json" 2>/dev/null | tr '\n' ' '; echo
  el done
  exit 0
fi
if [ "${1:-}" = i24had ]; then
  # issue 24, 12-07 (<= ${T:-580} s): the Mosaic Hadamard kernel (mosaic_hadamard.py, its first GPU run): exactness
  # vs today's XLA x' and us per call at K = 1536 / 6144; the fused linear with prologue="mosaic" and on the Mosaic
  # GEMM (incl. the group-wise "gnk" layer, fixed after 08:00) vs the Triton GEMM and fake-quant; then the 512-px
  # steps bf16 / paper-small on Mosaic GEMM + rotation GEMM prologue (prepbfr) / + Hadamard kernel (prepbfh, only if
  # its checks pass) / on Triton (prepbf) ($H_MODES sets them)
  el hadamard; timeout ${HAD_S:-160} python3 benchmarks/gpu/rotation_gemm.py --shapes 0 --hadamard-shapes ${HAD_SHAPES:-2} \
      --reps 4 --out "$OUT/hadamard.json" > "$OUT/hadamard.log" 2>&1; rc1=$?
  grep -v "^W[0-9]\|Warning" "$OUT/hadamard.log" | cut -c1-700 | tail -6
  el "fused checks"; timeout ${CHECK_S:-110} python3 benchmarks/gpu/mosaic_fused_check.py --cases ${CHECK_CASES:-3} \
      --variants mosaic_had mosaic --no-time --out "$OUT/had_fused_check.json" > "$OUT/had_fused_check.log" 2>&1; rc2=$?
  grep -v "^W[0-9]\|Warning" "$OUT/had_fused_check.log" | cut -c1-700 | tail -5
  P=p:qdit4sr-paper-w4a4-small
  modes="${H_MODES:-bf16 $P:prepbfr $P:prepbfh $P:prepbf}"
  if [ $rc1 -ne 0 ] || grep -q "'error'\|'finite': False\|'max_diff': [2-9]\|'max_diff': [0-9][0-9]" "$OUT/hadamard.log" || \
      grep "mosaic_had" "$OUT/had_fused_check.log" | grep -q "'finite': False\|'error'"; then
    el "hadamard check failed (rc $rc1 / $rc2): no prepbfh step"; modes=$(echo $modes | sed "s/[^ ]*:prepbfh//")
  fi
  left=$(( ${T:-580} - ($(date +%s) - t0) ))
  el "steps 512 ($left s): $modes"; steps steps512h $left --cases 512x1 --scan-steps 2 --modes $modes \
      --attention cudnn --xla-variants no-dot-merge --iters 6 --warmup 1 --deadline $(( left - 15 ))
  el done
  exit 0
fi
if [ "${1:-}" = i24rot ]; then
  # issue 24, 12-07 (<= 200 s): the prologue's rotation as one Mosaic kernel (x' + branch features + row maxima,
  # mosaic_bf16_gemm_rowmax) vs today's XLA ops: exactness and ms per call at the step's q/k/v input shapes
  el rotation-gemm; timeout ${T:-190} python3 benchmarks/gpu/rotation_gemm.py --out "$OUT/rotation_gemm.json" \
      2>&1 | grep -v "^W[0-9]\|Warning" | cut -c1-400 | tail -6
  el done
  exit 0
fi
if [ "${1:-}" = i24w ]; then
  # issue 24, 12-07 (<= 300 s): the persistent warp-specialized Mosaic int8 GEMM (mosaic_int8_gemm_ws) at the
  # step's linear shapes vs cuBLAS bf16 / XLA int8 / our Triton GEMM: exactness, tile sweep, best configs per shape
  # (WS_CONFIGS: skip the check and sweep, time those configs on every shape; WS_GROUPED=N: group-wise weights too)
  el ws-gemm; timeout ${T:-290} python3 benchmarks/gpu/ws_gemm.py --deadline $(( ${T:-290} - 60 )) \
      ${WS_CONFIGS:+--configs $WS_CONFIGS} ${WS_GROUPED:+--grouped $WS_GROUPED} --out "$OUT/ws_gemm.json" \
      > "$OUT/ws_gemm.log" 2>&1
  grep -v "^W[0-9]\|Warning\|Deprecat" "$OUT/ws_gemm.log" | cut -c1-260 | tail -60
  el done
  exit 0
fi
if [ "${1:-}" = i24t ] || [ "${1:-}" = i24u ]; then
  # issue 24, 12-07 (<= 560 s each). Untimed since 12-06 22:16: input rows padded once on x, the signs folded into
  # the input-space down-projection again, the per-token scale as the max-reduce's output (no select kernel), and
  # new: one down-projection GEMM per to_q / to_k / to_v group (`prepared.share_inputs`; prepbf has it, prepbfns
  # is the same without it). i24t: GPU check of the shared path (each member vs unshared and vs fake-quant), the
  # 512-px steps with DotMerger off, then the profile + HLO of prepbf. i24u: the 1024-px steps of bf16, paper-small
  # and the paper preset itself, "fast" ($V: variants).
  P=p:qdit4sr-paper-w4a4-small
  if [ "$1" = i24t ]; then
    shared_check 90
    el "steps 512"; steps steps512 380 --cases 512x1 --scan-steps 2 --modes bf16 $P:prepbf $P:prepbfns \
        --attention cudnn --xla-variants no-dot-merge --iters 8 --warmup 2 --deadline 330
    profile512 $P:prepbf
  else
    el "steps 1024"; steps steps1024 550 --cases 1024x1 --scan-steps 2 --modes bf16 $P:prepbf p:qdit4sr-paper-w4a4:prepbf \
        --attention cudnn --xla-variants ${V:-no-dot-merge} --iters 4 --warmup 1 --deadline 500
  fi
  el done
  exit 0
fi
if [ "${1:-}" = i24q ] || [ "${1:-}" = i24r ]; then
  # issue 24, next session (two W4A4 modes at most per call: each costs ~50 s to prepare and 25-80 s to compile).
  # i24q (<= 560 s): the 512-px steps of bf16 and paper-small "fast" (prepbf: the code levels from per-step tables,
  # the 6144 rotation's inner stage in bf16, the branch features in place) with XLA's defaults, DotMerger off
  # (no-dot-merge) and XLA's dots on cuBLAS instead of Triton (no-triton-gemm: no split-K reduce kernels), then the
  # per-kernel profile and optimized HLO of paper-small prepbf if time is left (did the 496 scalar kernels and the
  # 47 three-part splits go?). i24r (<= 560 s): the 1024-px steps, with the variants in $V (default: default
  # no-dot-merge).
  P=p:qdit4sr-paper-w4a4-small
  if [ "$1" = i24q ]; then
    el "steps 512"; steps steps512 400 --cases 512x1 --scan-steps 2 --modes bf16 $P:prepbf --attention cudnn \
        --xla-variants default no-dot-merge no-triton-gemm --iters 8 --warmup 2 --deadline 340
    profile512 $P:prepbf
  else
    el "steps 1024"; steps steps1024 540 --cases 1024x1 --scan-steps 2 --modes bf16 $P:prepbf --attention cudnn \
        --xla-variants ${V:-default no-dot-merge} --iters 4 --warmup 1 --deadline 525
  fi
  el done
  exit 0
fi
if [ "${1:-}" = i24o ] || [ "${1:-}" = i24p ]; then
  # issue 24, 12-06 session 5. i24o (<= 560 s): the 6144 Hadamard as "wide-sum" (one K = 512 +-1 GEMM, H_12 as
  # float32 sums) vs "dense" / "dense-wide" per call; the 512-px step's per-kernel profile and optimized HLO (fusions
  # by source line) for bf16 and paper-small prepbf (the joint branch features now read in place by the GEMM
  # kernel) with auto / wide-sum rotation; the 512-px steps in a 2-step scan. i24p (<= 560 s): the 1024-px steps.
  P=p:qdit4sr-paper-w4a4-small
  if [ "$1" = i24o ]; then
    el "hadamard 8192 x 6144"; timeout 100 python3 benchmarks/gpu/routes.py --parts hadamard --hadamard-k 6144 \
        --hadamard-impls dense dense-wide wide-sum --out "$OUT/hadamard.json" 2>&1 | grep "hadamard 8192" | cut -c1-500
    el "profile 512 + HLO"; timeout 230 python3 benchmarks/gpu/step_profile.py --cases 512x1 \
        --modes bf16 $P:prepbf $P:prepbf:wide-sum --hlo "$OUT/hlo" --attention cudnn --iters 2 --warmup 1 --top 30 \
        --deadline 200 --out "$OUT/profile512.json" > "$OUT/profile512.log" 2>&1
    grep -v "^W[0-9]\|Warning" "$OUT/profile512.log" | grep "^|\|^#\|^fusions\|ms of kernels" | cut -c1-170 | head -260
    left=$(( 550 - ($(date +%s) - t0) ))
    el "steps 512 ($left s)"; steps steps512 $left --cases 512x1 --scan-steps 2 \
        --modes bf16 $P:prepbf $P:prepbf:wide-sum $P:prep --attention cudnn --iters 5 --warmup 1 --deadline $(( left - 12 ))
  else
    el "steps 1024"; steps steps1024 540 --cases 1024x1 --scan-steps 2 \
        --modes bf16 $P:prepbf $P:prepbf:wide-sum p:qdit4sr-w4a4-small:prepbf:wide-sum --attention cudnn \
        --iters 3 --warmup 1 --deadline 525
  fi
  el done
  exit 0
fi
if [ "${1:-}" = i24n ]; then
  # issue 24, 12-06 session 4, after i24l (prepbf 0.49x at 512 px): where the 512-px W4A4 step's extra ~29 ms go,
  # per kernel kind against bf16 and W8A8 (calls and device ms per step), then the 1024-px steps of bf16 and
  # paper-small / qdit4sr-small prepbf with the time left.
  P=p:qdit4sr-paper-w4a4-small
  el "profile 512"; timeout 260 python3 benchmarks/gpu/step_profile.py --cases 512x1 --modes bf16 w8a8-fused $P:prepbf \
      --attention cudnn --iters 3 --warmup 1 --top 30 --deadline 240 --out "$OUT/profile512.json" > "$OUT/profile512.log" 2>&1
  grep -v "^W[0-9]\|Warning" "$OUT/profile512.log" | grep "^|\|^#" | cut -c1-160 | head -150
  left=$(( 550 - ($(date +%s) - t0) ))
  el "steps 1024 ($left s)"; steps steps1024 $left --cases 1024x1 --scan-steps 2 \
      --modes bf16 $P:prepbf p:qdit4sr-w4a4-small:prepbf --attention cudnn --iters 3 --warmup 1 --deadline $(( left - 12 ))
  el done
  exit 0
fi
if [ "${1:-}" = i24l ] || [ "${1:-}" = i24m ]; then
  # issue 24, next session. i24l (<= 560 s): where the prologue kernel's time goes, feature by feature (ablation
  # rows, per-kernel device times) at 8192 rows with tiles 16 x 4 / 8 / 16 warps (16 warps: 48 registers per thread
  # for the rotated tile instead of 96) and the down-projection on the layer's input (down="input"); then the 512-px
  # steps of bf16 and paper-small prep / prepbf / prepin / prepk (16 warps).
  # i24m (<= 560 s): the 1024-px steps of bf16, paper-small prepbf / prep, qdit4sr-small prepbf / prep, paper-small
  # prepin (prepbf = down="input" + xprime="bfloat16").
  P=p:qdit4sr-paper-w4a4-small
  if [ "$1" = i24l ]; then
    el "layer 8192"; timeout 150 python3 benchmarks/gpu/layer_kernels.py --m 8192 --k 1536 --n 1536 --time \
        --rotations --prologue-ablation --only ablation "prologue kernel + Hadamard full" "full 1536 (Kronecker) signs" \
        "down=input" --prologue-tiles 16x4 16x8 16x16 --per-kernel --out "$OUT/ablation8192.json" 2>&1 \
        | grep "^|\|failed\|: " | grep -v Warning | cut -c1-300
    left=$(( 550 - ($(date +%s) - t0) ))
    el "steps 512 ($left s)"; steps steps512 $left --cases 512x1 --scan-steps 2 \
        --modes bf16 $P:prep $P:prepbf $P:prepin $P:prepk --prologue-tile 16x4x16 --attention cudnn --iters 5 --warmup 1 \
        --deadline $(( left - 12 ))
  else
    el "steps 1024"; steps steps1024 540 --cases 1024x1 --scan-steps 2 \
        --modes bf16 $P:prepbf $P:prep p:qdit4sr-w4a4-small:prepbf p:qdit4sr-w4a4-small:prep $P:prepin --attention cudnn \
        --iters 3 --warmup 1 --deadline 525
  fi
  el done
  exit 0
fi
if [ "${1:-}" = i24j ] || [ "${1:-}" = i24k ]; then
  # issue 24, 12-06 session 2, after i24h (the rotating prologue kernel lost at 16 rows x 4 warps: 0.24x at 512 px).
  # i24j (<= 560 s): per-kernel device times of the paper layer (XLA rotation vs the kernel, now 8 warps for
  #   rotated layers) at 8192 and 2048 rows, then the 512-px steps of bf16, paper-small prepk, paper (not -small) prep.
  # i24k (<= 400 s): the 1024-px steps of bf16 and qdit4sr-paper-w4a4 (not -small) prep.
  if [ "$1" = i24j ]; then
    for m in 8192 2048; do
      el "layer $m"; timeout 90 python3 benchmarks/gpu/layer_kernels.py --m $m --k 1536 --n 1536 --time --rotations \
          --only "prologue kernel (Pallas" "full 1536 (Kronecker) signs" --per-kernel --out "$OUT/layer$m.json" 2>&1 \
          | grep "^|\|failed\|: " | grep -v Warning | cut -c1-400
    done
    left=$(( 550 - ($(date +%s) - t0) ))
    el "steps 512 ($left s)"; steps steps512 $left --cases 512x1 --scan-steps 2 \
        --modes bf16 p:qdit4sr-paper-w4a4-small:prepk p:qdit4sr-paper-w4a4:prep --attention cudnn \
        --iters 5 --warmup 1 --deadline $(( left - 12 ))
  else
    el "steps 1024"; steps steps1024 390 --cases 1024x1 --scan-steps 2 \
        --modes bf16 p:qdit4sr-paper-w4a4:prep --attention cudnn --iters 3 --warmup 1 \
        --deadline 375
  fi
  el done
  exit 0
fi
if [ "${1:-}" = i24h ] || [ "${1:-}" = i24i ]; then
  # issue 24, 12-06 session 2: the rotation inside the prologue kernel (prologue_kernel._kernel_rotated).
  # i24h (<= 560 s): GPU check of the kernel vs the XLA prologue, the 8192 x 1536 layer with the rotation in the
  #   kernel vs in XLA (tiles 16x4, 16x8), then the 512-px steps: bf16, the paper preset's -small form with the
  #   XLA prologue (prep) and the kernel (prepk), W8A8, qdit4sr-small with the kernel.
  # i24i (<= 560 s): the 1024-px steps of bf16, paper-small prep / prepk and qdit4sr-paper-w4a4 (not -small) prepk.
  P=p:qdit4sr-paper-w4a4-small
  if [ "$1" = i24h ]; then
    el check; timeout 100 python3 benchmarks/gpu/prologue_check.py --m 8192 --k 1536 --n 1536 \
        --out "$OUT/check.json" 2>&1 | grep -v Warning | tail -3
    el layer; timeout 150 python3 benchmarks/gpu/layer_kernels.py --m 8192 --k 1536 --n 1536 --time --rotations \
        --only "prologue kernel" "no smoothing [auto]" --prologue-tiles 16x4 16x8 --out "$OUT/layer.json" 2>&1 \
        | grep "^|\|failed" | cut -c1-200
    left=$(( 550 - ($(date +%s) - t0) ))
    el "steps 512 ($left s)"; steps steps512 $left --cases 512x1 --scan-steps 2 \
        --modes bf16 $P:prep $P:prepk w8a8-fused p:qdit4sr-w4a4-small:prepk --attention cudnn \
        --iters 5 --warmup 1 --deadline $(( left - 12 ))
  else
    el "steps 1024"; steps steps1024 540 --cases 1024x1 --scan-steps 2 \
        --modes bf16 $P:prepk $P:prep p:qdit4sr-paper-w4a4:prepk --attention cudnn --iters 3 --warmup 1 \
        --deadline 525
  fi
  el done
  exit 0
fi
if [ "${1:-}" = i24f ] || [ "${1:-}" = i24g ]; then
  # issue 24 after 12-06 (Hadamard default "auto" = one +-1 GEMM per block <= 2048 on a GPU).
  # i24f (<= 560 s): the Hadamard implementations per call (with dense-wide for the 6144 blocks), then the 512-px
  #   steps of bf16, the paper preset's -small form, W8A8 and qdit4sr-small in a 2-step scan (the must-show size
  #   that 12-06's call did not reach).
  # i24g (<= 560 s): the 1024-px steps of bf16, qdit4sr-paper-w4a4 (not -small) and -small with dense-wide for
  #   the 6144 blocks.
  if [ "$1" = i24f ]; then
    el hadamard; timeout 70 python3 benchmarks/gpu/routes.py --parts hadamard --reps 10 --out "$OUT/routes.json" \
        2>&1 | grep -v Warning | tail -4
    left=$(( 550 - ($(date +%s) - t0) ))
    el "steps 512 ($left s)"; steps steps512 $left --cases 512x1 --scan-steps 2 \
        --modes bf16 p:qdit4sr-paper-w4a4-small:prep w8a8-fused p:qdit4sr-w4a4-small:prep --attention cudnn \
        --iters 5 --warmup 1 --deadline $(( left - 12 ))
  else
    el "steps 1024"; steps steps1024 300 --cases 1024x1 --scan-steps 2 \
        --modes bf16 p:qdit4sr-paper-w4a4:prep --attention cudnn --iters 3 --warmup 1 --deadline 285 \
       
    left=$(( 550 - ($(date +%s) - t0) ))
    el "dense-wide ($left s)"; timeout $left python3 benchmarks/step_latency.py --cases 1024x1 --scan-steps 2 \
        --modes p:qdit4sr-paper-w4a4-small:prep --hadamard dense-wide --attention cudnn --iters 3 --warmup 1 \
        --out "$OUT/wide.json" 2>&1 | grep -v "^W[0-9]\|Warning" | grep "px b" | cut -c1-230
  fi
  el done
  exit 0
fi
if [ "${1:-}" = i24e ]; then
  # the short form of i24c (<= 330 s): Hadamard implementations per call and per prepared layer, then the 1024-px
  # steps of bf16, the paper preset's -small form and W8A8 (2-step scan)
  el hadamard; timeout 60 python3 benchmarks/gpu/routes.py --parts hadamard --reps 10 --out "$OUT/routes.json" \
      2>&1 | grep -v Warning | tail -4
  el layer-1536; timeout 45 python3 benchmarks/gpu/layer_kernels.py --m 8192 --k 1536 --n 1536 --time --rotations \
      --hadamard-impls butterfly dense dense-sum full --only prepared --out "$OUT/layer1536.json" 2>&1 | grep "^|"
  left=$(( 320 - ($(date +%s) - t0) ))
  el "steps 1024 ($left s)"; timeout $left python3 benchmarks/step_latency.py --cases 1024x1 --scan-steps 2 \
      --modes bf16 p:qdit4sr-paper-w4a4-small:prep w8a8-fused --attention cudnn --iters 3 --warmup 1 \
      --deadline $(( left - 10 )) --out "$OUT/steps.json" > "$OUT/steps.log" 2>&1
  grep -v "^W[0-9]\|Warning" "$OUT/steps.log" | grep "quantized\|px b\|^|\|note" | cut -c1-230
  el done
  exit 0
fi
if [ "${1:-}" = i24c ] || [ "${1:-}" = i24d ]; then
  # issue 24, 12-05 evening. i24c: the online Hadamard per implementation (exactness vs float64 on the GPU, device
  # time), the prepared layer with each implementation and the joint down-projection (K = 1536), then the
  # 1024- and 512-px steps in a 2-step scan. i24d: the 1024-px steps of all six modes. Explicit presets (p:PRESET:prep = prepared, joint down).
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | grep -v Warning
  MODES="bf16 p:qdit4sr-paper-w4a4-small:prep w8a8-fused p:qdit4sr-rot-w4a4-small:prep p:qdit4sr-smooth-w4a4-small:prep p:qdit4sr-paper-w4a4:prep"
  if [ "$1" = i24c ]; then
    el hadamard; timeout 60 python3 benchmarks/gpu/routes.py --parts hadamard down --reps 10 --out "$OUT/routes.json" \
        2>&1 | grep -v Warning | tail -7
    el layer-1536; timeout 75 python3 benchmarks/gpu/layer_kernels.py --m 8192 --k 1536 --n 1536 --time --rotations \
        --hadamard-impls dense dense-sum full --only prepared --out "$OUT/layer1536.json" 2>&1 | grep "^|"
    left=$(( 580 - ($(date +%s) - t0) ))
    el "steps 1024 + 512 ($left s)"; timeout $left python3 benchmarks/step_latency.py --cases 1024x1 512x1 --scan-steps 2 \
        --modes bf16 p:qdit4sr-paper-w4a4-small:prep w8a8-fused p:qdit4sr-rot-w4a4-small:prep --attention cudnn \
        --iters 3 --warmup 1 --deadline $(( left - 12 )) --out "$OUT/steps.json" > "$OUT/steps.log" 2>&1
    grep -v "^W[0-9]\|Warning" "$OUT/steps.log" | grep "quantized\|px b\|^|\|note" | cut -c1-230
  else
    el "steps 1024"; timeout 570 python3 benchmarks/step_latency.py --cases 1024x1 --scan-steps 2 --modes $MODES \
        --attention cudnn --iters 3 --warmup 1 --deadline 555 --out "$OUT/steps1024.json" > "$OUT/steps1024.log" 2>&1
    grep -v "^W[0-9]\|Warning" "$OUT/steps1024.log" | grep "quantized\|px b\|^|\|note" | cut -c1-230
  fi
  el done
  exit 0
fi
if [ "${1:-}" = i24b ]; then
  el routes; ROUTES_NO_FP8B=1 timeout 150 python3 benchmarks/gpu/routes.py --reps 10 --out "$OUT/routes.json" 2>&1 | grep -v Warning | tail -12
  el scan-bf16; timeout 90 python3 benchmarks/step_latency.py --cases 512x1 --scan-steps 4 --modes bf16 \
      --xla-variants default cb-off --attention cudnn --iters 5 --warmup 1 --out "$OUT/scan_bf16.json" \
      2>&1 | grep -v Warning | grep "px b\|^|"
  el scan-w4a4; timeout 200 python3 benchmarks/step_latency.py --cases 512x1 --scan-steps 4 --modes w4a4s-fused \
      --xla-variants cb-off --attention cudnn --iters 5 --warmup 1 --out "$OUT/scan_w4_off.json" \
      2>&1 | grep -v Warning | grep "px b\|^|"
  el done
  exit 0
fi
if [ "${1:-}" = i24a ]; then
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
  python3 -c "
import sys; sys.path.insert(0, 'benchmarks'); import jax, jax.numpy as jnp; from step_latency import XLA_VARIANTS
for n, o in XLA_VARIANTS.items():
    try: jax.jit(lambda x: jnp.sin(x) * 2, compiler_options=o or None).lower(jnp.ones(4)).compile(); print(n, 'accepted')
    except Exception as e: print(n, 'REJECTED', str(e)[:150])" 2>&1 | grep -v Warning
  el routes; timeout 80 python3 benchmarks/gpu/routes.py --out "$OUT/routes.json" 2>&1 | grep -v Warning | tail -25
  el rotations-1536; timeout 70 python3 benchmarks/gpu/layer_kernels.py --m 8192 --k 1536 --n 1536 --time --rotations \
      --only VaTMP prepared Hadamard 2>&1 | grep -v Warning | tail -12
  el rotations-6144; timeout 50 python3 benchmarks/gpu/layer_kernels.py --m 8192 --k 6144 --n 1536 --time --rotations \
      --only VaTMP Hadamard 2>&1 | grep -v Warning | tail -8
  el scan-variants; timeout 345 python3 benchmarks/step_latency.py --cases 512x1 --scan-steps 4 --modes w4a4s-fused bf16 \
      --xla-variants default cb-while --attention cudnn --iters 5 --warmup 1 --deadline 300 --out "$OUT/scan_cb.json" \
      2>&1 | grep -v Warning | tail -14
  el done
  exit 0
fi
if [[ "${1:-}" =~ ^(core|rest|next|next2|next3)$ ]]; then
  # core (timeouts sum to 530 s): the Mosaic GPU int8 GEMM against cuBLAS bf16 / Triton, the prologue kernel
  #   per layer, the 1024 x 1 step of bf16 / W8A8 / W4A4-small as stored and prepared with the prologue kernel.
  # rest (560 s): the per-kernel profile of the 512 x 1 W8A8 / W4A4-small stored / prepared steps, qwix at
  #   1024 x 1 (carry [".whl"]), batch 4 at 1024.
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
  if ls .whl/qwix-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/qwix-*.whl && export PYTHONPATH=/tmp/site:$PWD
  fi
  if [ "$1" = next ]; then
    # after 2026-12-05: prepared weights with the XLA prologue (never timed in a step), the Triton column of the
    # GEMM benchmark re-taken (that run built its non-square weights transposed), batch 4 at 1024 px (570 s)
    el mosaic-gemm; timeout 45 python3 benchmarks/gpu/mosaic_gemm.py --shapes 3 --deadline 30 --out "$OUT/mosaic_gemm.json" \
        > "$OUT/mosaic_gemm.log" 2>&1
    grep -v "^W[0-9]\|Deprecat\|out_shape" "$OUT/mosaic_gemm.log" | tail -8
    el step-1024x1; timeout 180 python3 benchmarks/step_latency.py --cases 1024x1 --modes bf16 w4a4s-prep \
        --attention cudnn --iters 8 --warmup 2 --deadline 170 --out "$OUT/step1024.json" > "$OUT/step1024.log" 2>&1
    grep -v "^W[0-9]" "$OUT/step1024.log" | tail -5
    el profile-512x1; timeout 170 python3 benchmarks/gpu/step_profile.py --cases 512x1 --modes w8a8-fused w4a4s-prep \
        --iters 3 --warmup 2 --deadline 160 --out "$OUT/profile.json" > "$OUT/profile.log" 2>&1
    grep -v "^W[0-9]" "$OUT/profile.log" | tail -30
    el step-1024x4; timeout 175 python3 benchmarks/step_latency.py --cases 1024x4 --modes w4a4s-prep bf16 \
        --attention cudnn --iters 5 --warmup 1 --deadline 165 --out "$OUT/step1024x4.json" > "$OUT/step1024x4.log" 2>&1
    grep -v "^W[0-9]" "$OUT/step1024x4.log" | tail -5
  elif [ "$1" = next3 ]; then
    # after 2026-12-05 11:08 (H100): the measurements that ran into their timeouts (575 s)
    el profile-prep-512x1; timeout 230 python3 benchmarks/gpu/step_profile.py --cases 512x1 --modes w4a4s-prep w8a8-fused \
        --iters 3 --warmup 2 --deadline 215 --out "$OUT/profile_prep.json" > "$OUT/profile_prep.log" 2>&1
    grep -v "^W[0-9]" "$OUT/profile_prep.log" | tail -40
    el scan-prep-512x1; timeout 165 python3 benchmarks/step_latency.py --cases 512x1 --modes bf16 w4a4s-prep w8a8-fused \
        --scan-steps 4 --attention cudnn --iters 5 --warmup 1 --deadline 155 --out "$OUT/scan_prep.json" \
        > "$OUT/scan_prep.log" 2>&1
    grep -v "^W[0-9]" "$OUT/scan_prep.log" | tail -6
    el batch4-prep; timeout 175 python3 benchmarks/step_latency.py --cases 512x4 1024x4 --modes bf16 w4a4s-prep \
        --attention cudnn --iters 5 --warmup 1 --deadline 165 --out "$OUT/batch4_prep.json" > "$OUT/batch4_prep.log" 2>&1
    grep -v "^W[0-9]" "$OUT/batch4_prep.log" | tail -8
  elif [ "$1" = next2 ]; then
    # the sampler's view: per step inside a 4-step lax.scan (does XLA:GPU hoist the stored tree's weight-side work
    # out of the loop, as XLA:CPU does?), then W8A8 and qwix at batch 4 (carry [".whl"]) (560 s)
    el scan-512x1; timeout 250 python3 benchmarks/step_latency.py --cases 512x1 --modes bf16 w4a4s-fused w4a4s-prep \
        w8a8-fused --scan-steps 4 --attention cudnn --iters 5 --warmup 1 --deadline 238 --out "$OUT/scan.json" \
        > "$OUT/scan.log" 2>&1
    grep -v "^W[0-9]" "$OUT/scan.log" | tail -7
    el batch4; timeout 310 python3 benchmarks/step_latency.py --cases 1024x4 512x4 --modes w8a8-fused qwix-w8a8 bf16 \
        --attention cudnn --iters 5 --warmup 1 --deadline 298 --out "$OUT/batch4.json" > "$OUT/batch4.log" 2>&1
    grep -v "^W[0-9]" "$OUT/batch4.log" | tail -9
  elif [ "$1" = core ]; then
    el mosaic-gemm; timeout 90 python3 benchmarks/gpu/mosaic_gemm.py --sweep --deadline 60 --out "$OUT/mosaic_gemm.json" \
        > "$OUT/mosaic_gemm.log" 2>&1
    grep -v "^W[0-9]\|Deprecat\|out_shape" "$OUT/mosaic_gemm.log" | tail -16
    el layer-kernels; timeout 50 python3 benchmarks/gpu/layer_kernels.py --time --prologue-tiles 32x4 32x8 \
        > "$OUT/layer_kernels.log" 2>&1
    tail -14 "$OUT/layer_kernels.log"
    el step-1024x1; timeout 390 python3 benchmarks/step_latency.py --cases 1024x1 --modes bf16 w4a4s-prepk \
        w8a8-fused w4a4s-fused --attention cudnn --iters 8 --warmup 2 --deadline 375 --out "$OUT/step1024.json" \
        > "$OUT/step1024.log" 2>&1
    grep -v "^W[0-9]" "$OUT/step1024.log" | tail -9
  else
    el profile-512x1; timeout 235 python3 benchmarks/gpu/step_profile.py --cases 512x1 --modes w8a8-fused w4a4s-fused \
        --iters 3 --warmup 2 --deadline 222 --out "$OUT/profile.json" > "$OUT/profile.log" 2>&1
    grep -v "^W[0-9]" "$OUT/profile.log" | tail -60
    el qwix-1024x1; timeout 165 python3 benchmarks/step_latency.py --cases 1024x1 --modes bf16 qwix-w8a8 w8a8-int \
        --attention cudnn --iters 8 --warmup 2 --deadline 155 --out "$OUT/qwix1024.json" > "$OUT/qwix1024.log" 2>&1
    grep -v "^W[0-9]" "$OUT/qwix1024.log" | tail -6
    el step-1024x4; timeout 160 python3 benchmarks/step_latency.py --cases 1024x4 --modes bf16 w4a4s-fused \
        --attention cudnn --iters 5 --warmup 1 --deadline 150 --out "$OUT/step1024x4.json" > "$OUT/step1024x4.log" 2>&1
    grep -v "^W[0-9]" "$OUT/step1024x4.log" | tail -6
  fi
  el done
  exit 0
fi
if [ "${1:-}" = profile ]; then
  el layer-kernels; timeout 60 python3 benchmarks/gpu/layer_kernels.py --time --prologue-tiles 32x4 32x8 64x8 \
      > "$OUT/layer_kernels.log" 2>&1
  tail -16 "$OUT/layer_kernels.log"
  el step-profile; timeout 235 python3 benchmarks/gpu/step_profile.py --cases 512x1 --modes w8a8-fused w4a4s-fused \
      w4a4s-prepk --iters 3 --warmup 2 --deadline 235 --out "$OUT/profile.json" > "$OUT/profile.log" 2>&1
  grep -v "^W[0-9]" "$OUT/profile.log" | tail -70
  el scan; timeout 235 python3 benchmarks/step_latency.py --cases 512x1 --modes bf16 w4a4s-fused w4a4s-prepk \
      --scan-steps 4 --attention cudnn --iters 5 --warmup 1 --deadline 220 --out "$OUT/scan.json" \
      > "$OUT/scan.log" 2>&1
  tail -8 "$OUT/scan.log"
  el done
  exit 0
fi
python -c "import jax; print('jax', jax.__version__, jax.devices())"
el attention; timeout 60 python benchmarks/gpu/attention_latency.py --sizes 1024 512 --q-scale 1 3 --iters 20 \
    --deadline 50 --out $OUT/attention.json > $OUT/attention.log 2>&1; tail -25 $OUT/attention.log
el step-cudnn; timeout 190 python benchmarks/step_latency.py --sizes 1024 --batch 1 --modes bf16 w4a4i-fused \
    --attention cudnn --iters 8 --warmup 2 --deadline 180 --out $OUT/step_cudnn.json > $OUT/step_cudnn.log 2>&1
tail -22 $OUT/step_cudnn.log
el step-fp8; timeout 170 python benchmarks/step_latency.py --sizes 1024 --batch 1 --modes bf16 w4a4i-fused \
    --attention fp8 --iters 8 --warmup 2 --deadline 160 --out $OUT/step_fp8.json > $OUT/step_fp8.log 2>&1
tail -22 $OUT/step_fp8.log
el linear; timeout 70 python benchmarks/gpu/linear_latency.py --recipes w8 w4g64i --configs 9 --shapes 3 \
    --no-attention --deadline 60 --out $OUT/linear.json > $OUT/linear.log 2>&1; tail -30 $OUT/linear.log
el quantize; timeout 100 python benchmarks/quantize_time.py --calib-size 0 --no-warm --deadline 95 \
    --out $OUT/quantize_time.json > $OUT/quantize.log 2>&1; tail -15 $OUT/quantize.log
el done
