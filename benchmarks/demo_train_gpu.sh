#!/usr/bin/env bash
# One continuous demo-model training run that outlives the device tool's 10-minute command limit.
#
#   bash benchmarks/demo_train_gpu.sh start MINUTES [extra train args]   # starts the trainer (setsid), watches ~9 min
#   bash benchmarks/demo_train_gpu.sh watch                               # watches ~9.5 min more
#   bash benchmarks/demo_train_gpu.sh finish                              # waits for the end, exports to $OUT
#   bash benchmarks/demo_train_gpu.sh once MINUTES [extra train args]    # all in one call (the safe way)
#
# Use `once` (MINUTES <= ~7.5: the trainer's start and compile take 1.5-2.5 min of them, the exports ~1 min,
# all inside the 10-minute call) and chain calls with RESUME: on 2026-12-04 the machine was given back between
# calls twice in one session although each next call was issued at once (the 30-s warm period is shorter than a
# reply can take), so a trainer that outlives its call is lost with the minutes since its last save. `once`
# brings back the final exports and the float32 params (no EMA: with the working tree, data and the shipped
# model, a second copy would pass the 64-MiB limit of what travels): copy $OUT/run to runs/NAME here and resume
# with `RESUME=runs/NAME` + `carry: ["data", "runs/NAME"]`.
#
# The trainer runs in its own process session, so it survives the end of the `start` call as long as the
# machine stays held: the next call must come within the device tool's warm period (30 s). It writes to
# $RUN (default /root/demo_run, outside the working tree and $OUT, which is emptied before each command).
# `start` and `watch` end by copying the trainer's latest periodic save (every 3 min) into $OUT/run
# (float32 params + state.json) and $OUT/run/ema, so a machine lost between calls costs only the minutes
# since that save: copy $OUT/run to runs/NAME here and resume with `RESUME=runs/NAME` + `carry:
# ["data", "runs/NAME"]` (the trainer resumes a state it finds in $RUN; without Adam's moments, with a
# re-warm). (2026-12-04: a 21.5-min run was lost at minute 18 because the call after `watch` came too late
# and this copy did not exist yet.) `finish` exports the EMA, final and best-validation params as bf16 model
# files (the demo preset's sampler: 3 steps from the LR latent at sigma 0.1 without its noise, wavelet colour fix) with the log into $OUT.
# INIT=MODEL_FILE (with `start` / `once`, no RESUME) starts the run from a model file instead of from scratch
# (`python -m qdit4sr_jax.train import`: fine-tuning the shipped demo model at peak LR $INIT_LR, default 2e-4).
# The trainer keeps JAX's persistent compilation cache in $CACHE (/root/jaxcache); `once` brings it back as
# $OUT/jaxcache.tar, and a RESUME directory holding jaxcache.tar restores it, so that the next call skips the
# ~90-s compile of the train step.
# Needs `carry: ["data"]` (python -m qdit4sr_jax.data.gather --out data).
set -uo pipefail
RUN=${RUN:-/root/demo_run}
CACHE=${CACHE:-/root/jaxcache}
LOG=$RUN.log
phase=${1:?start MINUTES | watch | finish | once MINUTES}

watch_for() {     # print progress lines for up to $1 seconds, or until the trainer has exited
  local until=$(( $(date +%s) + $1 ))
  while [ "$(date +%s)" -lt "$until" ]; do
    if ! kill -0 "$(cat "$RUN.pid" 2>/dev/null)" 2>/dev/null; then echo "trainer exited"; break; fi
    sleep 20
  done
  tr '\r' '\n' < "$LOG" | grep -v '^train: ' | tail -n 25
  tr '\r' '\n' < "$LOG" | grep '^train: ' | tail -n 1
}

bring_back() {    # the latest save -> $OUT/run (+ ema unless $1 = params-only), for a resume on a fresh machine
  local err=/dev/null; [ "${1:-}" = params-only ] && err=/dev/stderr     # `once`: a missing state is an error
  mkdir -p "$OUT/run"
  cp "$RUN"/state.json "$RUN"/params-*.npz "$OUT/run/" 2>"$err"
  [ "${1:-}" = params-only ] && return
  mkdir -p "$OUT/run/ema"
  cp "$RUN"/ema/state.json "$RUN"/ema/params-*.npz "$OUT/run/ema/" 2>/dev/null
  ls -la "$OUT/run" "$OUT/run/ema"
}

case "$phase" in
  start)
    minutes=${2:?minutes}; shift 2
    nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
    mkdir -p "$(dirname "$RUN")"
    if [ -n "${RESUME:-}" ]; then
      cp -r "$RESUME" "$RUN"; echo "resuming from $RESUME"
      [ -f "$RESUME/jaxcache.tar" ] && tar -xf "$RESUME/jaxcache.tar" -C "$(dirname "$CACHE")" \
        && echo "compilation cache restored: $(du -sh "$CACHE" | cut -f1)"
    elif [ -n "${INIT:-}" ]; then
      python3 -m qdit4sr_jax.train import --model "$INIT" --out "$RUN" --step "${INIT_STEP:-500}" --lr "${INIT_LR:-2e-4}" || exit 1
    fi
    PYTHONUNBUFFERED=1 setsid nohup python3 -m qdit4sr_jax.train --data data --out "$RUN" \
      --compile-cache "$CACHE" \
      --max-minutes "$minutes" --total-steps 1000000 --schedule time --batch 128 --lr 4e-4 --warmup 500 \
      --weight-decay 0.05 --bridge-frac 1.0 --bridge-sigma 0.1 --prediction lr_residual --residual-scale 0.1 \
      --color-aug --invert-prob 0.25 --ema 0.999 --keep-best --val-every 250 --log-every 250 \
      --save-every-minutes 3 "$@" > "$LOG" 2>&1 < /dev/null &
    echo $! > "$RUN.pid"
    echo "trainer pid $(cat "$RUN.pid")"
    [ "${NO_WATCH:-0}" = 1 ] && exit 0
    watch_for 530
    bring_back
    ;;
  watch)
    watch_for 555
    bring_back
    ;;
  once)     # start, wait for the end, bring back the final float32 params (no EMA: size), export
    NO_WATCH=1 bash "$0" start "${@:2}" || exit 1
    while kill -0 "$(cat "$RUN.pid" 2>/dev/null)" 2>/dev/null; do sleep 5; done
    bring_back params-only
    SKIP_FINAL=1 bash "$0" finish
    size=$(du -sb "$CACHE" 2>/dev/null | cut -f1)
    if [ -n "$size" ] && [ "$size" -lt 16000000 ]; then tar -cf "$OUT/jaxcache.tar" -C "$(dirname "$CACHE")" \
      "$(basename "$CACHE")"; else echo "compilation cache not brought back (${size:-0} bytes)"; fi
    ls -la "$OUT" "$OUT/run"
    ;;
  finish)
    while kill -0 "$(cat "$RUN.pid" 2>/dev/null)" 2>/dev/null; do sleep 5; done
    tr '\r' '\n' < "$LOG" | grep -v '^train: ' > "$OUT/train.log"
    tail -n 40 "$OUT/train.log"
    kinds="ema final best"; [ "${SKIP_FINAL:-0}" = 1 ] && kinds="ema best"
    for d in $kinds; do
      src="$RUN"; [ "$d" = final ] || src="$RUN/$d"; name=demo_$d.safetensors
      [ -f "$src/state.json" ] && JAX_PLATFORMS=cpu python3 -m qdit4sr_jax.train export --state "$src" --out "$OUT/$name" \
        --sampler-from demo
    done
    [ "${SKIP_FINAL:-0}" = 1 ] || cp "$RUN/state.json" "$OUT/state.json"
    ;;
  *) echo "unknown phase $phase" >&2; exit 2 ;;
esac
