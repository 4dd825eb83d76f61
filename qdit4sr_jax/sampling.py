"""Flow-matching Euler sampler (SD3 timestep shift), the whole loop under one `jax.jit` (`lax.scan`).

Schedule (`flow_schedule`) reproduces diffusers' `FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000,
shift=3.0).set_timesteps(T)` as DiT4SR's pipeline uses it: sigmas [T+1] (last 0) and timesteps [T]
(= 1000 * sigma) in float32. Euler step: x <- x + (sigma[i+1] - sigma[i]) * v(x, t_i).

The model is called as ``model_fn(params, x, lr, t, context, pooled, step, collect) -> (v, stats)``:
x, lr [N,h,w,C] float32 latents, t [N] float32 (0..1000), context [N,L,D] | None, pooled [N,P] | None,
step an int32 scalar (0..T-1, the sampling-step index every `Linear` receives so a per-step
activation-bit schedule can index by it), collect a python bool: when True the model returns its
`calib` collection as ``stats`` (else {}). `transformer_fn(cfg)` builds it from `DiT4SRTransformer`.

Classifier-free guidance follows diffusers: batch [negative; positive], v = v_u + g (v_c - v_u);
with g == 1 the doubled batch is skipped. The (guided) output becomes a velocity through `velocity`
(cfg.prediction: the output itself, or the LR-residual parametrisation of the demo model). Latents larger than ``tile_latent`` (h*w > tile^2) are
denoised per step in square tiles of min(tile, h, w) with overlap ``tile_overlap`` and Gaussian
blending, as DiT4SR's pipeline does.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from qdit4sr_jax.config import ModelConfig
from qdit4sr_jax.model.layers import CALIB


# ----------------------------------------------------------------------------- schedule

def _shift(s, shift):
    return shift * s / (1 + (shift - 1) * s)


def flow_schedule(num_steps: int, shift: float = 3.0, num_train_timesteps: int = 1000,
                  start_sigma: float = 1.0):
    """-> (sigmas [num_steps+1] float32, timesteps [num_steps] float32), numpy.

    With start_sigma == 1 this equals diffusers' FlowMatchEulerDiscreteScheduler(shift).set_timesteps(T).
    With start_sigma < 1 the unshifted linspace starts at the unshifted value whose shifted sigma is
    ``start_sigma`` (so sigmas[0] == start_sigma) and ends at the same sigma_min.
    """
    if int(num_steps) < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0.0 < float(start_sigma) <= 1.0:
        raise ValueError(f"start_sigma must be in (0, 1], got {start_sigma}")
    n = num_train_timesteps
    # __init__: sigmas over the training timesteps, shifted, in float32 (as torch computes them)
    train_t = np.linspace(1, n, n, dtype=np.float32)[::-1].copy()
    train_s = _shift(train_t / np.float32(n), np.float32(shift)).astype(np.float32)
    sigma_max, sigma_min = float(train_s[0]), float(train_s[-1])
    if start_sigma < 1.0:
        sigma_max = float(start_sigma / (shift - (shift - 1) * start_sigma))  # inverse shift
    # set_timesteps: float64 linspace in timestep units, shifted again, then float32
    ts = np.linspace(sigma_max * n, sigma_min * n, int(num_steps))
    sig = _shift(ts / n, float(shift)).astype(np.float32)
    timesteps = (sig * np.float32(n)).astype(np.float32)
    return np.concatenate([sig, np.zeros(1, np.float32)]), timesteps


# ----------------------------------------------------------------------------- tiling

def tile_offsets(length: int, tile: int, overlap: int):
    """Start offsets of tiles of size `tile` covering [0, length): stride tile-overlap, last flush with the end."""
    if tile >= length:
        return [0]
    stride = tile - overlap
    if stride <= 0:
        raise ValueError(f"tile_overlap {overlap} must be smaller than the tile size {tile}")
    n = 1
    while (n - 1) * stride + tile < length:
        n += 1
    return [i * stride for i in range(n - 1)] + [length - tile]


def gaussian_weights(tile: int) -> np.ndarray:
    """DiT4SR's tile blending weights [tile, tile] float32 (variance 0.01 of the tile-normalised
    coordinate; the row midpoint is tile/2, the column midpoint (tile-1)/2, as in the reference)."""
    var = 0.01
    xs = np.arange(tile, dtype=np.float64)
    px = np.exp(-((xs - (tile - 1) / 2) ** 2) / (tile * tile) / (2 * var)) / np.sqrt(2 * np.pi * var)
    py = np.exp(-((xs - tile / 2) ** 2) / (tile * tile) / (2 * var)) / np.sqrt(2 * np.pi * var)
    return np.outer(py, px).astype(np.float32)


def needs_tiling(h: int, w: int, tile: Optional[int]) -> bool:
    return bool(tile) and h * w > tile * tile


def tiled_apply(fn: Callable, x, lr, tile: int, overlap: int, *, tile_batch: Optional[int] = None,
                force: bool = False):
    """Apply ``fn(x_tiles, lr_tiles) -> (out [N,t,t,C'], stats)`` over overlapping square tiles of
    x, lr [B,h,w,C] and blend the outputs with `gaussian_weights` -> ([B,h,w,C'], stats).

    Tiles are used when h*w > tile^2 (or ``force``); tile side t = min(tile, h, w); when t shrank to
    <= overlap (a thin latent), the overlap becomes t // 2 (DiT4SR's loop never ends there). All tiles go through
    `fn` as one batch [n_tiles*B, ...] (tile-major), or ``tile_batch`` tiles at a time via `lax.map`
    (stats are then stacked over chunks). Without tiling returns fn(x, lr) unchanged.
    """
    B, h, w, _ = x.shape
    if not force and not needs_tiling(h, w, tile):
        return fn(x, lr)
    t = min(tile, h, w)
    if overlap >= t and t < tile:
        overlap = t // 2
    pos = [(oy, ox) for oy in tile_offsets(h, t, overlap) for ox in tile_offsets(w, t, overlap)]
    n = len(pos)
    xt = jnp.stack([x[:, oy:oy + t, ox:ox + t] for oy, ox in pos])      # [n, B, t, t, C]
    lt = jnp.stack([lr[:, oy:oy + t, ox:ox + t] for oy, ox in pos])
    if tile_batch is None or tile_batch >= n:
        out, stats = fn(xt.reshape((n * B,) + xt.shape[2:]), lt.reshape((n * B,) + lt.shape[2:]))
        out = out.reshape((n, B) + out.shape[1:])
    else:
        out, stats = jax.lax.map(lambda a: fn(a[0], a[1]), (xt, lt), batch_size=int(tile_batch))
    wt = gaussian_weights(t)
    cnt = np.zeros((h, w), np.float32)
    for oy, ox in pos:
        cnt[oy:oy + t, ox:ox + t] += wt
    acc = jnp.zeros((B, h, w, out.shape[-1]), jnp.float32)
    wj = jnp.asarray(wt)[None, :, :, None]
    for k, (oy, ox) in enumerate(pos):
        acc = acc.at[:, oy:oy + t, ox:ox + t].add(out[k].astype(jnp.float32) * wj)
    return acc / jnp.asarray(cnt)[None, :, :, None], stats


# ----------------------------------------------------------------------------- model function

@functools.lru_cache(maxsize=None)
def transformer_fn(cfg: ModelConfig) -> Callable:
    """model_fn for `DiT4SRTransformer(cfg)` (cached per config so jit caches hit)."""
    from qdit4sr_jax.model.dit4sr import DiT4SRTransformer
    module = DiT4SRTransformer(cfg)

    def model_fn(params, x, lr, t, context, pooled, step, collect):
        if collect:
            out, var = module.apply({"params": params}, x, lr, t, context, pooled, step=step, mutable=[CALIB])
            return out.astype(jnp.float32), var.get(CALIB, {})
        return module.apply({"params": params}, x, lr, t, context, pooled, step=step).astype(jnp.float32), {}

    return model_fn


# ----------------------------------------------------------------------------- loop

def initial_latents(noise, lr_latent, sigma0, start: str, noise_scale: float = 1.0):
    """start 'noise': the noise; 'lr': (1 - sigma0) * lr_latent + sigma0 * noise_scale * noise (DiT4SR's LR
    start at noise_scale 1; `ModelConfig.start_noise`)."""
    if start == "noise":
        return noise
    if start == "lr":
        return (1.0 - sigma0) * lr_latent + (sigma0 * noise_scale) * noise
    raise ValueError(f"start must be 'noise' or 'lr', got {start!r}")


def velocity(out, x, lr_latent, sigma, prediction: str = "velocity", residual_scale: float = 0.1):
    """The flow velocity [B,h,w,C] float32 from the transformer output `out` at latent x, sigma > 0.

    prediction "velocity": out itself; "lr_residual": x0_hat = lr_latent - residual_scale * out and
    v = (x - x0_hat) / sigma (so the Euler step to sigma 0 lands exactly on x0_hat)."""
    if prediction == "velocity":
        return out
    if prediction == "lr_residual":
        x0_hat = lr_latent - residual_scale * out
        return (x - x0_hat) / sigma
    raise ValueError(f"prediction must be 'velocity' or 'lr_residual', got {prediction!r}")


def _rep(a, n):
    return None if a is None else jnp.concatenate([a] * n, axis=0) if n > 1 else a


@functools.partial(jax.jit, static_argnames=("model_fn", "num_steps", "shift", "guidance_scale", "start",
                                             "start_sigma", "start_noise", "tile_latent", "tile_overlap", "tile_batch",
                                             "force_tiling", "collect_stats", "prediction", "residual_scale",
                                             "prepare_weights"))
def _sample(params, lr_latent, noise, context, pooled, neg_context, neg_pooled, output_offsets=None, *, model_fn,
            num_steps,
            shift, guidance_scale, start, start_sigma, tile_latent, tile_overlap, tile_batch, force_tiling,
            collect_stats, prediction="velocity", residual_scale=0.1, prepare_weights=None, start_noise=1.0):
    if prepare_weights:                   # fused quantized layers: weight-side operands once, before the loop
        from qdit4sr_jax.quant.kernels.prepared import SAMPLER_MODES, prepare
        params = prepare(params, **SAMPLER_MODES[prepare_weights])
    sigmas, timesteps = flow_schedule(num_steps, shift, start_sigma=start_sigma)
    B = noise.shape[0]
    cfg_on = guidance_scale != 1.0
    if cfg_on:
        ctx = None if context is None else jnp.concatenate([neg_context, context], axis=0)
        pool = None if pooled is None else jnp.concatenate([neg_pooled, pooled], axis=0)
        lr_in = jnp.concatenate([lr_latent, lr_latent], axis=0)
    else:
        ctx, pool, lr_in = context, pooled, lr_latent
    nb = 2 * B if cfg_on else B
    x0 = initial_latents(noise.astype(jnp.float32), lr_latent.astype(jnp.float32), float(sigmas[0]), start,
                         start_noise)
    sig = jnp.asarray(sigmas)
    tsj = jnp.asarray(timesteps)

    def step_fn(x, i):
        xin = jnp.concatenate([x, x], axis=0) if cfg_on else x

        def fn(xt, lt):
            r = xt.shape[0] // nb  # number of tiles in this batch
            tb = jnp.full((xt.shape[0],), tsj[i], jnp.float32)
            return model_fn(params, xt, lt, tb, _rep(ctx, r), _rep(pool, r), i, collect_stats)

        v, stats = tiled_apply(fn, xin, lr_in, tile_latent, tile_overlap,
                               tile_batch=None if collect_stats else tile_batch,
                               force=force_tiling and bool(tile_latent))
        if cfg_on:
            vu, vc = jnp.split(v, 2, axis=0)
            v = vu + guidance_scale * (vc - vu)
        if output_offsets is not None:
            v = v + output_offsets[i]
        v = velocity(v.astype(jnp.float32), x, lr_latent, sig[i], prediction, residual_scale)
        x = x + (sig[i + 1] - sig[i]) * v
        return x, (stats if collect_stats else None)

    x, stats = jax.lax.scan(step_fn, x0, jnp.arange(num_steps, dtype=jnp.int32))
    return (x, stats) if collect_stats else x


def sample(cfg: ModelConfig, params, lr_latent, noise, *, context=None, pooled=None, neg_context=None,
           neg_pooled=None, num_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
           start: Optional[str] = None, start_sigma: Optional[float] = None, tile_latent: Optional[int] = -1,
           tile_overlap: Optional[int] = None, tile_batch: Optional[int] = None, force_tiling: bool = False,
           collect_stats: bool = False, model_fn: Optional[Callable] = None, output_offsets=None,
           prepare_weights: Optional[str] = None, start_noise: Optional[float] = None):
    """Denoise from ``noise`` conditioned on ``lr_latent`` (both [B,h,w,C] float32) -> latents [B,h,w,C].

    params: the transformer's params. context [B,L,D] / pooled [B,P]: prompt embeddings (None with
    cfg.context_mode == 'learned'); neg_*: negative embeddings, required when guidance_scale != 1.
    Defaults come from cfg (num_steps, guidance_scale, start, start_sigma, start_noise, tile_latent, tile_overlap;
    tile_latent=None or 0 disables tiling; ``force_tiling`` tiles even latents no larger than one tile;
    ``tile_batch`` runs that many tiles per model call). With ``collect_stats`` returns (latents, stats) where stats
    is the model's `calib` collection per step, each leaf stacked with a leading step axis [T, ...].
    ``output_offsets`` [T, B, h, w, C] float32 (optional) is added to the (guided) model output of each step
    before it becomes a velocity: the handle `quant.stepgain.step_sensitivity` differentiates through.
    ``prepare_weights`` (quantized layers with execution "fused"; the outputs are the same except "fast"): None
    computes their weight-side kernel operands per call (XLA may hoist them out of the step loop); "unpacked" once per
    run, before the loop: int8 codes and float branch factors in kernel layout (`quant.kernels.
    prepared`; the full DiT4SR at W4A4-small then holds 2.88 GB instead of 1.45 GB); "packed" the same with
    the codes left packed (1.62 GB; `python benchmarks/weight_memory.py --preset qdit4sr-w4a4-small`); "fast"
    "unpacked" with the branch down-projection on each layer's input and x' rounded once to bf16 (rounds
    differently; the fastest on the H100: `quant.kernels.prepared.SAMPLER_MODES`); "fast-mosaic" "fast" with the
    Mosaic GPU kernels on a Hopper GPU and the layers reading one input (to_q / to_k / to_v, add_*_proj) as one
    layer each group, merged here before the jitted loop where their VaTMP schedules are known equal
    (`quant.kernels.merged`; the fastest on Hopper; elsewhere "fast" with the groups merged; done per call: pass
    `merged.merge_tree(params)` to do it once for many calls, a merged tree is left as it is);
    "fast-mosaic-separate" the same with each layer on its own. A tree
    prepared beforehand (e.g. `quant.kernels.prepare(q, prologue="pallas")`: the prologue kernel) runs as given.
    """
    from qdit4sr_jax.quant.kernels.prepared import SAMPLER_MODES
    if prepare_weights is not None and prepare_weights not in SAMPLER_MODES:
        *first, last = SAMPLER_MODES
        raise ValueError(f"prepare_weights must be None, {', '.join(map(repr, first))} or {last!r}, "
                         f"got {prepare_weights!r}")
    if prepare_weights is not None and SAMPLER_MODES[prepare_weights].get("merge"):
        from qdit4sr_jax.quant.kernels.merged import merge_tree
        params = merge_tree(params)             # concrete schedules here; traced ones inside `_sample` stay apart
    num_steps = int(cfg.num_steps if num_steps is None else num_steps)
    guidance_scale = float(cfg.guidance_scale if guidance_scale is None else guidance_scale)
    start = cfg.start if start is None else start
    start_sigma = float(cfg.start_sigma if start_sigma is None else start_sigma)
    start_noise = float(cfg.start_noise if start_noise is None else start_noise)
    if not 0.0 <= start_noise <= 1.0:
        raise ValueError(f"start_noise must be in [0, 1], got {start_noise}")
    tile_latent = cfg.tile_latent if tile_latent == -1 else (tile_latent or 0)
    tile_overlap = int(cfg.tile_overlap if tile_overlap is None else tile_overlap)
    if start not in ("noise", "lr"):
        raise ValueError(f"start must be 'noise' or 'lr', got {start!r}")
    if noise.ndim != 4 or tuple(noise.shape) != tuple(lr_latent.shape):
        raise ValueError(f"noise {tuple(noise.shape)} and lr_latent {tuple(lr_latent.shape)} must be equal "
                         f"[B, h, w, C] shapes")
    if (context is None) != (pooled is None):
        raise ValueError("pass both context and pooled prompt embeddings, or neither")
    if guidance_scale != 1.0 and context is not None and (neg_context is None or neg_pooled is None):
        raise ValueError(f"guidance_scale={guidance_scale} needs negative embeddings (neg_context, neg_pooled); "
                         "pass guidance_scale=1.0 to sample without classifier-free guidance")
    if guidance_scale != 1.0 and context is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs prompt and negative embeddings; a learned "
                         "context has no negative: use guidance_scale=1.0")
    if tile_latent and not 0 <= tile_overlap < tile_latent:
        raise ValueError(f"tile_overlap {tile_overlap} must be in [0, tile size {tile_latent})")
    if tile_latent and tile_latent % cfg.patch_size:
        raise ValueError(f"tile_latent {tile_latent} must be a multiple of the patch size {cfg.patch_size}")
    if not (force_tiling or needs_tiling(noise.shape[1], noise.shape[2], tile_latent)):
        tile_latent, tile_overlap, force_tiling = 0, 0, False   # untiled: one compiled variant for any tile size
    B = noise.shape[0]

    def _b(a, name):
        if a is None:
            return None
        a = jnp.asarray(a, jnp.float32)
        if a.shape[0] == 1 and B > 1:
            a = jnp.broadcast_to(a, (B,) + a.shape[1:])
        if a.shape[0] != B:
            raise ValueError(f"{name} batch {a.shape[0]} != latent batch {B}")
        return a

    if output_offsets is not None and tuple(output_offsets.shape) != (num_steps,) + tuple(noise.shape):
        raise ValueError(f"output_offsets {tuple(output_offsets.shape)} must be [num_steps, B, h, w, C] = "
                         f"{(num_steps,) + tuple(noise.shape)}")
    return _sample(params, jnp.asarray(lr_latent, jnp.float32), jnp.asarray(noise, jnp.float32),
                   _b(context, "context"), _b(pooled, "pooled"), _b(neg_context, "neg_context"),
                   _b(neg_pooled, "neg_pooled"),
                   None if output_offsets is None else jnp.asarray(output_offsets, jnp.float32),
                   model_fn=model_fn or transformer_fn(cfg), num_steps=num_steps, shift=float(cfg.shift),
                   guidance_scale=guidance_scale, start=start, start_sigma=start_sigma,
                   tile_latent=int(tile_latent or 0), tile_overlap=tile_overlap, tile_batch=tile_batch,
                   force_tiling=bool(force_tiling), collect_stats=bool(collect_stats),
                   prediction=cfg.prediction, residual_scale=float(cfg.residual_scale),
                   prepare_weights=prepare_weights, start_noise=start_noise)
