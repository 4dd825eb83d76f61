"""Train the demo model (flow matching, optax AdamW), in resumable runs.

    python -m qdit4sr_jax.train --data data --out runs/demo --total-steps 20000 --max-minutes 8.5
    python -m qdit4sr_jax.train export --state runs/demo --out qdit4sr_jax/assets/demo.safetensors
    python -m qdit4sr_jax.train import --model qdit4sr_jax/assets/demo.safetensors --out runs/ft   # fine-tune

Objective (rectified flow, as SD3): x0 = the HR image through the space-to-depth autoencoder, z_lr = the
bicubic-upsampled LR image through the same autoencoder, x_t = (1 - s) x0 + s eps, target v = eps - x0,
loss = mean |v_theta(x_t, z_lr, t = 1000 s) - v|^2. s is drawn half uniform on (0, 1), half logit-normal(0, 1).

Resumable: `--out DIR` holds `state.json` (step, config, optimizer settings, data seed, loss log) and
`params-*.npz` shards (float32 params, each shard < 15 MiB so that they travel through the device
tool). Adam's moments are not stored (they would double the state); a resumed run re-initialises them
and ramps the learning rate up again over `--rewarm` steps. Compute runs in bfloat16 on GPU
(`--dtype`), params stay float32. The HR/LR pairs come from `PairBank` (worker processes).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qdit4sr_jax.config import ModelConfig, VAEConfig
from qdit4sr_jax.model import vae as vae_lib
from qdit4sr_jax.model.dit4sr import DiT4SRTransformer, init_params

SHARD_BYTES = 15 * 2**20


# ----------------------------------------------------------------------------- data -> latents

def to_unit(x_uint8):
    """uint8 images -> float32 in [-1, 1]."""
    return jnp.asarray(x_uint8, jnp.float32) / 127.5 - 1.0


def lr_condition(cfg: ModelConfig, lr_uint8):
    """LR uint8 [B, h, w, 3] -> bicubic x cfg.scale -> autoencoder latent [B, h*s/f, w*s/f, C] float32."""
    lr = to_unit(lr_uint8)
    B, h, w, _ = lr.shape
    up = jax.image.resize(lr, (B, h * cfg.scale, w * cfg.scale, 3), "bicubic")
    return vae_lib.encode(cfg.vae, {}, up, sample=False)


def hr_latent(cfg: ModelConfig, hr_uint8):
    """HR uint8 [B, H, W, 3] -> latent [B, H/f, W/f, C] float32 (the autoencoder must be parameter-free)."""
    return vae_lib.encode(cfg.vae, {}, to_unit(hr_uint8), sample=False)


_PERMS = np.array([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]], np.int32)


def color_augment(hr_uint8, lr_uint8, rng, invert_prob: float = 0.0):
    """The same random colour transform on each HR/LR pair: one of the 6 channel permutations (uniform) and,
    with probability `invert_prob`, the negative image (255 - x). Both act per pixel, so the LR image stays
    the degradation of the HR one up to the noise model's intensity dependence.

    hr uint8 [B, H, W, 3], lr uint8 [B, h, w, 3] -> the same shapes and dtype.
    """
    kp, ki = jax.random.split(rng)
    B = hr_uint8.shape[0]
    perm = jnp.asarray(_PERMS)[jax.random.randint(kp, (B,), 0, 6)]          # [B, 3]
    inv = jax.random.bernoulli(ki, invert_prob, (B,))

    def f(x):
        x = jnp.take_along_axis(x, perm[:, None, None, :], axis=-1)
        return jnp.where(inv[:, None, None, None], jnp.uint8(255) - x, x)
    return f(jnp.asarray(hr_uint8, jnp.uint8)), f(jnp.asarray(lr_uint8, jnp.uint8))


def sample_sigmas(rng, n: int):
    """[n] float32 noise levels in (0, 1): half uniform, half logit-normal(0, 1) (SD3)."""
    k1, k2, k3 = jax.random.split(rng, 3)
    u = jax.random.uniform(k1, (n,), minval=1e-3, maxval=1.0 - 1e-3)
    ln = jax.nn.sigmoid(jax.random.normal(k2, (n,)))
    return jnp.where(jax.random.bernoulli(k3, 0.5, (n,)), u, ln)


# optax.tree.norm where it exists (optax.global_norm is deprecated there), else the older name
_global_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm

LOSSES = ("mse", "charbonnier")
CHARBONNIER_EPS = 1e-3


def pointwise_loss(err, kind: str = "mse"):
    """Mean over all elements of err**2 ("mse") or sqrt(err**2 + eps**2) ("charbonnier", a smooth L1 with
    eps = CHARBONNIER_EPS, the loss of many PSNR-oriented SR networks); float32 scalar."""
    if kind == "mse":
        return jnp.mean(jnp.square(err))
    if kind == "charbonnier":
        return jnp.mean(jnp.sqrt(jnp.square(err) + CHARBONNIER_EPS ** 2))
    raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")


def flow_loss(params, cfg: ModelConfig, hr_uint8, lr_uint8, rng, sigmas=None, start_sigmas=None,
              bridge_frac: float = 0.0, bridge_sigma: float = 1.0, loss: str = "mse", bridge_exact: float = 0.25,
              start_noise: float = 1.0):
    """Mean squared velocity error over the batch (float32 scalar); with cfg.prediction "lr_residual" the
    mean squared error of F against (z_lr - x0) / cfg.residual_scale instead (x0 error / residual_scale).
    loss: "mse" (default; also every validation figure) or "charbonnier" (`pointwise_loss`) of the same error.

    Each sample follows the straight path from its start x_s0 = (1 - s0) z_lr + s0 eps (s0 = 1: pure
    noise, plain flow matching; s0 < 1: the noised LR latent the sampler starts from with start="lr",
    start_sigma=s0) to x0: x_s = x0 + (s / s0) (x_s0 - x0), velocity v = (x_s0 - x0) / s0 = (x_s - x0) / s,
    which is what the sampler's Euler step x <- x + (s' - s) v integrates exactly for a perfect model.
    `sigmas` / `start_sigmas` [B] fix s and s0; otherwise s is drawn by `sample_sigmas` with s0 = 1,
    except for a `bridge_frac` share of the batch that gets s0 = bridge_sigma and s uniform in
    (0, bridge_sigma], a `bridge_exact` share of those (default a quarter) exactly at bridge_sigma, the
    sampler's first step. `start_noise` scales eps in the LR starts (s0 < 1) as `ModelConfig.start_noise` does
    in the sampler (0: the path from (1 - s0) z_lr, the deterministic start); pure-noise starts keep eps.
    """
    x0 = hr_latent(cfg, hr_uint8)
    zlr = lr_condition(cfg, lr_uint8)
    B = x0.shape[0]
    kn, ks, kb, ku, kf = jax.random.split(rng, 5)
    s = sample_sigmas(ks, B) if sigmas is None else jnp.asarray(sigmas, jnp.float32)
    s0 = jnp.ones((B,), jnp.float32) if start_sigmas is None else jnp.asarray(start_sigmas, jnp.float32)
    if sigmas is None and bridge_frac > 0:
        use = jax.random.bernoulli(kb, bridge_frac, (B,))
        sb = bridge_sigma * jax.random.uniform(ku, (B,), minval=1e-3, maxval=1.0)
        sb = jnp.where(jax.random.bernoulli(kf, bridge_exact, (B,)), bridge_sigma, sb)
        s, s0 = jnp.where(use, sb, s), jnp.where(use, bridge_sigma, s0)
    eps = jax.random.normal(kn, x0.shape, jnp.float32)
    e = lambda a: a[:, None, None, None]  # noqa: E731
    scale = jnp.where(s0 < 1.0, jnp.asarray(start_noise, jnp.float32), 1.0)
    start = (1.0 - e(s0)) * zlr + e(s0 * scale) * eps
    xt = x0 + e(s / s0) * (start - x0)
    out = DiT4SRTransformer(cfg).apply({"params": params}, xt, zlr, 1000.0 * s).astype(jnp.float32)
    if cfg.prediction == "lr_residual":     # out = F, x0_hat = z_lr - c F: target (z_lr - x0) / c (x0 error / c)
        return pointwise_loss(out - (zlr - x0) / cfg.residual_scale, loss)
    return pointwise_loss(out - (start - x0) / e(s0), loss)


# ----------------------------------------------------------------------------- init / optimizer

ZERO_INIT = ("norm1/linear", "norm1_context/linear", "norm_out/linear", "proj_out")


@functools.lru_cache(maxsize=8)
def _jitted_init(cfg: ModelConfig):
    """`init_params` of `cfg` under jax.jit, built once per config: a second state of the same config (another
    seed; the tests start many) reuses the compiled init instead of compiling it again (~4 s on CPU)."""
    return jax.jit(lambda k: init_params(cfg, k))


def init_train_params(cfg: ModelConfig, seed: int = 0):
    """Random float32 params with adaLN-zero (DiT): every modulation linear and proj_out start at zero,
    so each block starts as the identity and the output as 0."""
    p = _jitted_init(cfg)(jax.random.PRNGKey(seed))
    flat = _flatten(p)
    for k in flat:
        if any(k.endswith(z + "/kernel") or k.endswith(z + "/bias") for z in ZERO_INIT):
            flat[k] = jnp.zeros_like(flat[k])
    return _unflatten(flat)


def reinit_head(params):
    """params with proj_out's kernel and bias set to zero (the adaLN-zero output init)."""
    flat = _flatten(params)
    for k in flat:
        if k.startswith("proj_out/"):
            flat[k] = jnp.zeros_like(flat[k])
    return _unflatten(flat)


def _cosine(prog, final_frac: float, cos):
    """final_frac + (1 - final_frac) (1 + cos(pi prog)) / 2 with `cos` = jnp.cos (traced) or math.cos (host)."""
    return final_frac + (1 - final_frac) * 0.5 * (1 + cos(math.pi * prog))


def lr_schedule(peak: float, total_steps: int, warmup: int, final_frac: float = 0.05):
    """Linear warmup to `peak`, cosine decay to peak * final_frac at `total_steps`."""
    def f(step):
        step = jnp.asarray(step, jnp.float32)
        w = jnp.minimum(1.0, (step + 1) / max(warmup, 1))
        prog = jnp.clip((step - warmup) / max(total_steps - warmup, 1), 0.0, 1.0)
        return peak * w * _cosine(prog, final_frac, jnp.cos)
    return f


def make_optimizer(peak_lr: float, total_steps: int, warmup: int, start_step: int, rewarm: int,
                   weight_decay: float = 0.01, clip: float = 1.0):
    """AdamW with global-norm clipping. The optimizer's own count starts at 0 at each (re)start: the
    learning rate at count c is schedule(start_step + c) * min(1, (c + 1) / rewarm) (rewarm only when
    resuming, since Adam's moments are re-initialised)."""
    sched = lr_schedule(peak_lr, total_steps, warmup)

    def lr(count):
        ramp = jnp.minimum(1.0, (count + 1.0) / rewarm) if (start_step > 0 and rewarm > 0) else 1.0
        return sched(start_step + count) * ramp

    return optax.chain(optax.clip_by_global_norm(clip),
                       optax.adamw(lr, b1=0.9, b2=0.99, weight_decay=weight_decay)), sched


def time_cosine(progress: float, final_frac: float = 0.05) -> float:
    """Cosine factor in [final_frac, 1] of a schedule at `progress` in [0, 1] (clipped): the decay part
    of `lr_schedule`, for a schedule driven by wall-clock time instead of the step count (host floats)."""
    return _cosine(min(max(float(progress), 0.0), 1.0), final_frac, math.cos)


def make_train_step(cfg: ModelConfig, opt, bridge_frac: float = 0.0, bridge_sigma: float = 1.0,
                    color_aug: bool = False, invert_prob: float = 0.0, ema: float = 0.0, loss: str = "mse",
                    bridge_exact: float = 0.25, start_noise: float = 1.0):
    """jit step (params, opt_state, hr uint8, lr uint8, rng[, lr_mult[, ema_params, ema_decay]]) ->
    (params, opt_state, loss, grad norm[, ema_params]).

    With `color_aug` each pair first gets `color_augment` (channel permutation, negative with
    `invert_prob`). `lr_mult` (float32 scalar, default 1) scales the optimizer's update, i.e. its learning
    rate (AdamW's decoupled weight decay included): the host can drive the schedule (`--schedule time`).
    With `ema` > 0 the step also takes and returns an exponential moving average of the params,
    ema <- d ema + (1 - d) params with d = the traced `ema_decay` argument. loss: `LOSSES` (training only).
    bridge_exact: `flow_loss`'s share of LR-start samples at exactly the start sigma; start_noise: its scale of
    the LR starts' noise.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if not 0.0 <= bridge_exact <= 1.0:
        raise ValueError(f"bridge_exact (--bridge-exact) is a share: it must be in [0, 1], got {bridge_exact!r}")
    if not 0.0 <= start_noise <= 1.0:
        raise ValueError(f"start_noise (--start-noise) must be in [0, 1], got {start_noise!r}")

    def step_fn(params, opt_state, hr, lr, rng, lr_mult=1.0, ema_params=None, ema_decay=0.0):
        if color_aug:
            rng, ka = jax.random.split(rng)
            hr, lr = color_augment(hr, lr, ka, invert_prob)
        value, grads = jax.value_and_grad(flow_loss)(params, cfg, hr, lr, rng, bridge_frac=bridge_frac,
                                                     bridge_sigma=bridge_sigma, loss=loss,
                                                     bridge_exact=bridge_exact, start_noise=start_noise)
        updates, opt_state = opt.update(grads, opt_state, params)
        updates = jax.tree_util.tree_map(lambda u: u * jnp.asarray(lr_mult, u.dtype), updates)
        gnorm = _global_norm(grads)
        params = optax.apply_updates(params, updates)
        if ema:
            ema_params = jax.tree_util.tree_map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p,
                                                ema_params, params)
            return params, opt_state, value, gnorm, ema_params
        return params, opt_state, value, gnorm
    return jax.jit(step_fn, donate_argnums=(0, 1, 6) if ema else (0, 1))


# ----------------------------------------------------------------------------- state files

def _flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else k
        if isinstance(v, dict) or hasattr(v, "items"):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _unflatten(flat):
    tree: dict = {}
    for k, v in flat.items():
        node = tree
        parts = k.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return tree


def config_to_dict(cfg: ModelConfig) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict) -> ModelConfig:
    d = dict(d)
    vae = VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.pop("vae").items()})
    return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}, vae=vae)


def save_state(out_dir: str, params, meta: dict):
    """Write float32 params as npz shards (< SHARD_BYTES each) + state.json, atomically (temp + rename)."""
    os.makedirs(out_dir, exist_ok=True)
    flat = {k: np.asarray(jax.device_get(v), np.float32) for k, v in _flatten(params).items()}
    shards, cur, size = [], {}, 0
    for k in sorted(flat):
        if cur and size + flat[k].nbytes > SHARD_BYTES:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = flat[k]
        size += flat[k].nbytes
    shards.append(cur)
    names = []
    for i, sh in enumerate(shards):
        name = f"params-{i:02d}-of-{len(shards):02d}.npz"
        tmp = os.path.join(out_dir, name + ".tmp.npz")
        np.savez(tmp, **{k.replace("/", "|"): v for k, v in sh.items()})
        os.replace(tmp, os.path.join(out_dir, name))
        names.append(name)
    for f in os.listdir(out_dir):   # shards of an older layout
        if f.startswith("params-") and f.endswith(".npz") and f not in names:
            os.remove(os.path.join(out_dir, f))
    meta = dict(meta, shards=names)
    tmp = os.path.join(out_dir, "state.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, "state.json"))


def load_state(out_dir: str):
    """-> (params float32 tree (numpy), meta dict). Clear errors for a missing or incomplete state."""
    p = os.path.join(out_dir, "state.json")
    if not os.path.exists(p):
        raise FileNotFoundError(f"no training state in {out_dir!r} (state.json missing)")
    with open(p) as f:
        meta = json.load(f)
    flat = {}
    for name in meta["shards"]:
        sp = os.path.join(out_dir, name)
        if not os.path.exists(sp):
            raise FileNotFoundError(f"training state {out_dir!r} is incomplete: shard {name} missing")
        with np.load(sp) as z:
            flat.update({k.replace("|", "/"): z[k] for k in z.files})
    return _unflatten(flat), meta


SAMPLER_FIELDS = ("num_steps", "shift", "start", "start_sigma", "start_noise", "color_fix")


def export_model(state_dir: str, out_path: str, dtype: str = "bfloat16", **cfg_overrides):
    """Write the trained params as a float model file ({"transformer": params} cast to `dtype`, the config
    with float32 compute and any sampler overrides) through `qdit4sr_jax.io.modelfile.save_model`."""
    import ml_dtypes
    from qdit4sr_jax.io.modelfile import save_model
    params, meta = load_state(state_dir)
    cfg = config_from_dict(meta["config"]).replace(dtype="float32", attention_impl=None, **cfg_overrides)
    np_dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    cast = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32).astype(np_dt), params)
    save_model(out_path, cfg, {"transformer": cast})
    return cfg


def param_count(tree) -> int:
    """Number of parameters (array elements) in a params tree."""
    return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree))


def import_model(model_path: str, out_dir: str, *, step: int = 0, peak_lr: float = 2e-4, warmup: int = 500,
                 data_seed: int = 10**9 + 7):
    """Start a training state in `out_dir` from a model file (the inverse of `export_model`): its transformer
    params as float32 and its ModelConfig, at `step` with a fresh wall-clock schedule (no training seconds,
    peak `peak_lr`), so that `train` resumes from it (fine-tuning the shipped demo model, say). `data_seed`
    selects a pair stream different from the original run's. Refuses a directory that already holds a state."""
    from qdit4sr_jax.io.modelfile import load_model
    if os.path.exists(os.path.join(out_dir, "state.json")):
        raise FileExistsError(f"{out_dir!r} already holds a training state; import into an empty directory")
    cfg, tree = load_model(model_path, check=True)
    if "transformer" not in tree:
        raise ValueError(f"{model_path!r} holds no transformer params")
    params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), tree["transformer"])
    n_params = param_count(params)
    meta = dict(config=config_to_dict(cfg), step=int(step), total_steps=1_000_000, warmup=int(warmup),
                peak_lr=float(peak_lr), train_seconds=0.0, schedule="time", data_seed=int(data_seed), log=[],
                runs=[], val_loss={}, n_params=n_params, best={}, imported_from=os.path.basename(model_path))
    save_state(out_dir, params, meta)
    return cfg, meta


# ----------------------------------------------------------------------------- validation

_val_loss_fn = jax.jit(flow_loss, static_argnums=(1,), static_argnames=("start_noise",))


def val_loss(params, cfg, val_hr, val_lr, sigmas=(0.1, 0.3, 0.5, 0.7, 0.9), seed=1234, bridge_sigma=None):
    """Velocity loss on the validation crops at fixed noise levels and noise: {name: loss}; names are the
    sigmas of plain flow matching, and "b<s0>@<s>" for the LR-start path of `bridge_sigma` (s = s0, s0/2), started
    as the model's sampler starts (`cfg.start_noise`), so that the start PSNR measures the deployed first step."""
    n = val_hr.shape[0]
    out = {}
    # one compiled loss for both kinds: the same static start_noise (it only scales the LR starts, s0 < 1, so
    # the pure-noise starts, s0 = 1, get the same value with it) and float32 (not weak-typed) sigma arrays
    noise = float(cfg.start_noise)
    full = lambda v: jnp.full((n,), v, jnp.float32)  # noqa: E731
    for s in sigmas:
        out[str(s)] = float(_val_loss_fn(params, cfg, val_hr, val_lr, jax.random.PRNGKey(seed), full(s), full(1.0),
                                         start_noise=noise))
    if bridge_sigma:
        for s in (bridge_sigma, bridge_sigma / 2):
            out[f"b{bridge_sigma:g}@{s:g}"] = float(_val_loss_fn(
                params, cfg, val_hr, val_lr, jax.random.PRNGKey(seed), full(s), full(bridge_sigma),
                start_noise=noise))
    return out


def start_psnr(vl: dict, cfg: ModelConfig, bridge_sigma) -> Optional[float]:
    """PSNR (dB, [-1, 1] pixel range) of the x0 estimate at the sampler's first step, from `val_loss`'s
    "b<s0>@<s0>" entry (None without it): the loss is |x0_hat - x0|^2 / c^2 with c = residual_scale
    ("lr_residual") or s0 ("velocity"); the space-to-depth latent holds the pixels themselves."""
    key = f"b{bridge_sigma:g}@{bridge_sigma:g}" if bridge_sigma else None
    if key not in vl:
        return None
    c = cfg.residual_scale if cfg.prediction == "lr_residual" else bridge_sigma
    return float(10 * np.log10(4.0 / max(vl[key] * c * c, 1e-20)))


# ----------------------------------------------------------------------------- one training run

@dataclasses.dataclass
class RunStart:
    """Where a run starts: the float32 params (numpy or jax), the model config, the stored meta of the state it
    resumes ({} on a fresh start), the learning-rate schedule (total steps, warmup, peak) and the step count."""
    params: Any
    cfg: ModelConfig
    meta: dict
    total: int
    warmup: int
    peak: float
    start_step: int
    log: list
    resumed: bool


def start_or_resume(args, cfg: Optional[ModelConfig] = None) -> RunStart:
    """Resume the state in `args.out` if there is one (its config wins over `cfg`; `--total-steps` replaces the
    stored schedule length; `--prediction` switches the output parametrisation, restarting the head at zero),
    else start fresh from `cfg` or `args.preset` with `init_train_params`."""
    if os.path.exists(os.path.join(args.out, "state.json")):
        params, meta = load_state(args.out)
        cfg = config_from_dict(meta["config"])
        total, warmup, peak = meta["total_steps"], meta["warmup"], meta["peak_lr"]
        if args.total_steps:     # lengthen / shorten the schedule of a resumed run
            total = args.total_steps
        start = RunStart(params, cfg, meta, total, warmup, peak, meta["step"], meta.get("log", []), True)
        print(f"resuming {args.out} at step {start.start_step}/{total}")
        if args.prediction and args.prediction != cfg.prediction:
            # switch the output parametrisation: the trunk is kept, the output head restarts at zero
            # (with "lr_residual" the model then returns the bicubic-upsampled input exactly)
            start.cfg = cfg.replace(prediction=args.prediction, residual_scale=args.residual_scale)
            start.params = reinit_head(params)
            print(f"prediction -> {start.cfg.prediction} (residual_scale {start.cfg.residual_scale}); "
                  "proj_out reset to 0")
        return start
    cfg = cfg or ModelConfig.preset(args.preset)
    if args.prediction:
        cfg = cfg.replace(prediction=args.prediction, residual_scale=args.residual_scale)
    return RunStart(init_train_params(cfg, args.seed), cfg, {}, args.total_steps or 20000, args.warmup, args.lr,
                    0, [], False)


def compute_config(args, cfg: ModelConfig):
    """-> (the config the step computes with: `--dtype` and the attention kernel, attention name). "auto"
    attention: cuDNN flash attention on GPU in 16-bit compute, else XLA's."""
    attn = args.attention
    if attn == "auto":
        attn = "cudnn" if jax.default_backend() == "gpu" and args.dtype in ("bfloat16", "float16") else "xla"
    return cfg.replace(dtype=args.dtype, attention_impl=None if attn == "xla" else attn), attn


def dihedral(hr, lr, k: int):
    """The same one of the 8 dihedral transforms (k in [0, 8): bit 2 flips, bits 0-1 rotate) of an HR and an LR
    batch [B, H, W, 3], as contiguous arrays."""
    if k & 4:
        hr, lr = hr[:, :, ::-1], lr[:, :, ::-1]
    hr, lr = np.rot90(hr, k & 3, axes=(1, 2)), np.rot90(lr, k & 3, axes=(1, 2))
    return np.ascontiguousarray(hr), np.ascontiguousarray(lr)


class TrainingRun:
    """One run of `train` between a start (fresh or resumed) and a save: the optimizer and its schedule, the EMA,
    the jitted step, the validation crops, the pair bank, the step / log counters and the files it writes
    (`args.out`, `args.out`/ema, `args.out`/best). Methods: `step_once` (one optimizer step), `run_steps` (the
    loop until the step limit or the time budget), `validate`, `save`, `summary`."""

    def __init__(self, args, start: RunStart, t_start: float):
        self.args, self.t_start = args, t_start
        self.cfg, self.meta, self.log = start.cfg, start.meta, start.log
        self.total, self.warmup, self.peak = start.total, start.warmup, start.peak
        self.start_step = self.step = start.start_step
        self.resumed = start.resumed
        self.tcfg, self.attention = compute_config(args, self.cfg)
        self.params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), start.params)
        self.n_params = param_count(self.params)
        self.by_time = getattr(args, "schedule", "steps") == "time"
        self.ema_decay = float(getattr(args, "ema", 0.0) or 0.0)
        self.ema_dir = os.path.join(args.out, "ema")
        self.best_dir = os.path.join(args.out, "best")
        self.best = dict(self.meta.get("best") or {})   # {"step", "psnr"}: the best start-PSNR state (--keep-best)
        self.bsig = args.bridge_frac and args.bridge_sigma
        self.deadline = t_start + 60 * args.max_minutes
        self.t_train0, self.t_train_end = None, self.deadline - args.save_margin
        self.prev_seconds = float(self.meta.get("train_seconds", 0.0))     # training seconds of earlier runs
        self.anneal_s = 60.0 * float(getattr(args, "anneal_minutes", 0.0) or 0.0)

    # -- setup
    def build_optimizer(self):
        """The optimizer, its state, the EMA params (resumed from OUT/ema when there) and the jitted step.
        --schedule time: warmup / rewarm by step as usual, the cosine decay by wall-clock progress through this
        run's budget (fed to the step as lr_mult); the step schedule then only holds the warmup."""
        a = self.args
        self.opt, self.sched = make_optimizer(self.peak, 1 << 30 if self.by_time else self.total, self.warmup,
                                              self.start_step, a.rewarm, a.weight_decay)
        self.opt_state = self.opt.init(self.params)
        self.ema_params = None
        if self.ema_decay:
            ema = (load_state(self.ema_dir)[0]
                   if self.resumed and os.path.exists(os.path.join(self.ema_dir, "state.json")) else self.params)
            self.ema_params = jax.tree_util.tree_map(lambda x: jnp.array(x, jnp.float32), ema)
        self.step_options = dict(
            bridge_frac=a.bridge_frac, bridge_sigma=a.bridge_sigma, color_aug=getattr(a, "color_aug", False),
            invert_prob=getattr(a, "invert_prob", 0.0), ema=self.ema_decay, loss=getattr(a, "loss", "mse"),
            bridge_exact=getattr(a, "bridge_exact", 0.25), start_noise=getattr(a, "start_noise", 1.0))
        self.step_fn = make_train_step(self.tcfg, self.opt, **self.step_options)

    def open_data(self):
        """The validation crops (`--val-count`) and the pair bank, seeded afresh for every run of a state."""
        from qdit4sr_jax.data.datasets import PairBank, validation_set
        a = self.args
        val = validation_set(a.data, self.cfg.scale)[:a.val_count or None]
        self.val_hr = np.stack([h for _, h, _ in val])
        self.val_lr = np.stack([l for _, _, l in val])
        t_bank = time.time()
        seed0 = self.data_seed + 10**7 * len(self.meta.get("runs", []))  # fresh pairs per run
        self.bank = PairBank(a.data, capacity=a.bank, size=a.crop, scale=self.cfg.scale, workers=a.workers,
                             seed=seed0)
        print(f"[{time.time() - self.t_start:.1f}s] pair bank: {a.bank} pairs filled in {time.time() - t_bank:.1f}s",
              flush=True)
        self.rng = np.random.default_rng(a.seed + self.start_step)
        self.key = jax.random.PRNGKey(a.seed * 7919 + self.start_step)

    @property
    def data_seed(self) -> int:
        return self.meta.get("data_seed", self.args.seed * 10**9)

    # -- the wall-clock schedule
    def train_seconds(self) -> float:
        return self.prev_seconds + (0.0 if self.t_train0 is None else time.time() - self.t_train0)

    def progress(self) -> float:
        """Time-schedule progress in [0, 1]: training seconds so far over `--anneal-minutes` (all runs), or
        by default over the seconds that end this run's budget."""
        if self.t_train0 is None:
            return 0.0
        total_s = self.anneal_s or self.prev_seconds + max(self.t_train_end - self.t_train0, 1e-6)
        return min(1.0, self.train_seconds() / total_s)

    def lr_mult(self) -> float:
        return time_cosine(self.progress()) if self.by_time else 1.0

    # -- checkpoint
    def state_meta(self, at: int, vl=None) -> dict:
        """state.json of this run's state at step `at` (with the validation losses `vl`)."""
        a, o = self.args, self.step_options
        runs = self.meta.get("runs", []) + [dict(
            start=self.start_step, end=at, seconds=round(time.time() - self.t_start, 1),
            device=str(jax.devices()[0].device_kind), batch=a.batch, bridge_frac=a.bridge_frac,
            bridge_sigma=a.bridge_sigma, loss=o["loss"], bridge_exact=o["bridge_exact"],
            start_noise=o["start_noise"])]
        return dict(config=config_to_dict(self.cfg), step=at, total_steps=self.total, warmup=self.warmup,
                    peak_lr=self.peak, train_seconds=round(self.train_seconds(), 1),
                    schedule="time" if self.by_time else "steps", batch=a.batch, crop=a.crop,
                    data_seed=self.data_seed, log=self.log, runs=runs, val_loss=dict(vl or {}),
                    n_params=self.n_params, best=dict(self.best))

    def save(self, at: int, vl=None):
        """Write the params (and the EMA params in OUT/ema) with `state_meta(at, vl)`."""
        save_state(self.args.out, self.params, self.state_meta(at, vl))
        if self.ema_decay:
            save_state(self.ema_dir, self.ema_params, dict(self.state_meta(at, vl), ema=self.ema_decay))

    # -- validation
    def validate(self, at: int):
        """Validation losses at step `at` (of the EMA params with --ema) and the start PSNR; with --keep-best
        also saves OUT/best when the start PSNR improves. -> (losses {name: loss}, PSNR or None)."""
        shipped = self.ema_params if self.ema_decay else self.params
        vl = val_loss(shipped, self.tcfg, self.val_hr, self.val_lr, bridge_sigma=self.bsig)
        ps = start_psnr(vl, self.cfg, self.bsig)
        if getattr(self.args, "keep_best", False) and ps is not None and ps > self.best.get("psnr", -np.inf):
            self.best.update(step=at, psnr=round(ps, 4))
            save_state(self.best_dir, shipped, self.state_meta(at, vl))
        return vl, ps

    # -- steps
    def step_once(self, hr, lr, sk):
        """One optimizer step; updates params / opt_state / ema_params; -> (loss, grad norm)."""
        mult = jnp.float32(self.lr_mult())
        if self.ema_decay:
            k = self.step - self.start_step
            d = jnp.float32(min(self.ema_decay, (1.0 + k) / (10.0 + k)))
            self.params, self.opt_state, loss, gnorm, self.ema_params = self.step_fn(
                self.params, self.opt_state, hr, lr, sk, mult, self.ema_params, d)
        else:
            self.params, self.opt_state, loss, gnorm = self.step_fn(self.params, self.opt_state, hr, lr, sk, mult)
        return loss, gnorm

    def first_step(self, hr, lr, sk):
        """The run's first step (it compiles): falls back to XLA attention if cuDNN refuses the shapes."""
        if self.tcfg.attention_impl is None:
            return self.step_once(hr, lr, sk)
        try:
            loss, gnorm = self.step_once(hr, lr, sk)
            jax.block_until_ready(loss)
            return loss, gnorm
        except Exception as e:  # noqa: BLE001
            print(f"attention {self.tcfg.attention_impl!r} failed ({type(e).__name__}: "
                  f"{str(e)[:300]}); using XLA attention", flush=True)
            self.tcfg = self.tcfg.replace(attention_impl=None)
            self.step_fn = make_train_step(self.tcfg, self.opt, **self.step_options)
            return self.step_once(hr, lr, sk)

    def next_batch(self):
        """(hr, lr, key) of the next step: a batch from the bank under one random dihedral transform."""
        hr, lr = self.bank.batch(self.args.batch, self.rng)
        k = int(self.rng.integers(0, 8))     # one random dihedral transform per batch
        self.key, sk = jax.random.split(self.key)
        hr, lr = dihedral(hr, lr, k)
        return hr, lr, sk

    def log_entry(self, losses, gnorm, rate: float, end: int) -> dict:
        """The log line of the current step (mean loss since the last one), validated every `--val-every`."""
        a = self.args
        entry = dict(step=self.step, loss=round(float(np.mean(jax.device_get(losses))), 5),
                     gnorm=round(float(gnorm), 3), lr=float(self.sched(self.step)) * self.lr_mult(),
                     samples_per_s=round(rate, 1), pairs_made=self.bank.produced,
                     minutes=round((time.time() - self.t_start) / 60, 2))
        if a.val_every and (self.step % a.val_every == 0 or self.step == end):
            vl, ps = self.validate(self.step)
            entry["val"] = round(float(np.mean(list(vl.values()))), 5)
            if ps is not None:
                entry["val_psnr"] = round(ps, 3)
        return entry

    def stop_reason(self) -> Optional[str]:
        """Why the loop stops after this step (time budget, end of the time schedule), or None."""
        if time.time() > self.deadline - self.args.save_margin:
            return f"time budget reached at step {self.step}"
        if self.by_time and self.anneal_s and self.progress() >= 1.0:
            return f"end of the time schedule (--anneal-minutes) at step {self.step}"
        return None

    def run_steps(self):
        """Step until `--steps` / the schedule's total, the time budget or the end of the time schedule; log every
        `--log-every` steps, save every `--save-every-minutes`. Closes the pair bank."""
        from tqdm import tqdm
        a = self.args
        next_save = time.time() + 60 * a.save_every_minutes if a.save_every_minutes else float("inf")
        losses, t_last, s_last = [], time.time(), self.start_step
        end = min(self.total, self.start_step + a.steps) if a.steps else self.total
        pbar = tqdm(total=end - self.start_step, desc="train", mininterval=5, file=sys.stdout)
        try:
            while self.step < end:
                hr, lr, sk = self.next_batch()
                first = self.step == self.start_step
                loss, gnorm = self.first_step(hr, lr, sk) if first else self.step_once(hr, lr, sk)
                self.step += 1
                losses.append(loss)
                if self.step % a.log_every == 0 or self.step == end:
                    rate = (self.step - s_last) * a.batch / (time.time() - t_last)
                    t_last, s_last = time.time(), self.step
                    entry = self.log_entry(losses, gnorm, rate, end)
                    losses = []
                    self.log.append(entry)
                    pbar.set_postfix(loss=f"{entry['loss']:.4f}", val=entry.get("val", "-"), sps=f"{rate:.0f}")
                pbar.update(1)
                if first:
                    jax.block_until_ready(loss)
                    self.t_train0 = time.time()
                    print(f"\n[{time.time() - self.t_start:.1f}s] first step done (compiled)", flush=True)
                if time.time() > next_save:
                    self.save(self.step)
                    next_save = time.time() + 60 * a.save_every_minutes
                reason = self.stop_reason()
                if reason:
                    print(f"\n{reason}", flush=True)
                    break
        finally:
            pbar.close()
            self.bank.close()

    def summary(self, vl: dict, ps: Optional[float], elapsed: float):
        """Print the end of the run (`elapsed` seconds): where it saved, peak device memory, the validation and
        the last log lines."""
        print(f"\nsaved {self.args.out} at step {self.step}/{self.total} after {elapsed / 60:.1f} min")
        try:
            print(f"peak device memory {jax.devices()[0].memory_stats()['peak_bytes_in_use'] / 2**30:.1f} GiB")
        except Exception:   # noqa: BLE001  (CPU backends have no memory stats)
            pass
        print("val loss by sigma: " + ", ".join(f"{k}: {v:.4f}" for k, v in vl.items()))
        if ps is not None:
            print(f"val start PSNR {ps:.3f} dB; best {self.best.get('psnr', float('nan'))} dB at step "
                  f"{self.best.get('step')}")
        print(f"{'step':>7} {'loss':>8} {'val':>8} {'psnr':>7} {'gnorm':>7} {'lr':>9} {'samp/s':>7} {'min':>6}")
        for e in self.log[-24:]:
            print(f"{e['step']:>7} {e['loss']:>8.4f} {e.get('val', float('nan')):>8.4f} "
                  f"{e.get('val_psnr', float('nan')):>7.3f} {e['gnorm']:>7.3f} {e['lr']:>9.2e} "
                  f"{e['samples_per_s']:>7.0f} {e['minutes']:>6.2f}")


# ----------------------------------------------------------------------------- main

def train(args, cfg: Optional[ModelConfig] = None):
    """Run (or resume) training with the parsed CLI `args`; `cfg` overrides `args.preset` on a fresh start.
    -> (float32 params, ModelConfig) at the end of the run, saved in `args.out`."""
    t_start = time.time()
    if getattr(args, "compile_cache", None):
        from qdit4sr_jax.quant.api import enable_compilation_cache
        print(f"compilation cache {enable_compilation_cache(args.compile_cache, min_compile_time_s=1.0)}")
    start = start_or_resume(args, cfg)
    print(f"[{time.time() - t_start:.1f}s] params ready", flush=True)
    run = TrainingRun(args, start, t_start)
    print(f"config {run.cfg.name}: {run.n_params:,} params, hidden {run.cfg.hidden_size}, {run.cfg.num_layers} "
          f"blocks; devices {jax.devices()}; compute {args.dtype}; attention {run.attention}", flush=True)
    if run.step >= run.total:
        print("already trained to total_steps; nothing to do")
        return run.params, run.cfg
    run.build_optimizer()
    run.open_data()
    run.run_steps()
    vl, ps = run.validate(run.step)
    elapsed = time.time() - t_start
    run.save(run.step, vl)
    run.summary(vl, ps, elapsed)
    return run.params, run.cfg


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "export":
        ap = argparse.ArgumentParser(prog="python -m qdit4sr_jax.train export")
        ap.add_argument("--state", required=True)
        ap.add_argument("--out", required=True)
        ap.add_argument("--num-steps", type=int, default=None)
        ap.add_argument("--shift", type=float, default=None)
        ap.add_argument("--start", default=None)
        ap.add_argument("--start-sigma", type=float, default=None)
        ap.add_argument("--start-noise", type=float, default=None)
        ap.add_argument("--color-fix", default=None, choices=["adain", "wavelet", "none"])
        ap.add_argument("--sampler-from", default=None, metavar="PRESET",
                        help="take the sampler defaults (steps, shift, start, start sigma / noise, colour fix) "
                             "from this model preset, e.g. demo; the options above override them")
        a = ap.parse_args(argv[1:])
        over = {}
        if a.sampler_from:
            pre = ModelConfig.preset(a.sampler_from)
            over = {k: getattr(pre, k) for k in SAMPLER_FIELDS}
        over.update({k: v for k, v in dict(num_steps=a.num_steps, shift=a.shift, start=a.start,
                                           start_sigma=a.start_sigma, start_noise=a.start_noise,
                                           color_fix=a.color_fix).items() if v is not None})
        cfg = export_model(a.state, a.out, **over)
        print(f"wrote {a.out} ({os.path.getsize(a.out) / 2**20:.2f} MiB): {cfg.name}, steps {cfg.num_steps}, "
              f"shift {cfg.shift}, start {cfg.start} (sigma {cfg.start_sigma}, noise {cfg.start_noise}), "
              f"colour fix {cfg.color_fix}")
        return
    if argv and argv[0] == "import":
        ap = argparse.ArgumentParser(prog="python -m qdit4sr_jax.train import",
                                     description="Start a training state from a model file (fine-tuning).")
        ap.add_argument("--model", required=True, help="a qdit4sr-jax model file (e.g. the shipped demo model)")
        ap.add_argument("--out", required=True, help="empty directory for the new training state")
        ap.add_argument("--step", type=int, default=0, help="step count the state starts at (> 0: LR re-warm)")
        ap.add_argument("--lr", type=float, default=2e-4, help="peak learning rate of the resumed run")
        ap.add_argument("--data-seed", type=int, default=10**9 + 7)
        a = ap.parse_args(argv[1:])
        cfg, meta = import_model(a.model, a.out, step=a.step, peak_lr=a.lr, data_seed=a.data_seed)
        print(f"imported {a.model} -> {a.out}: {cfg.name}, {meta['n_params']:,} params, step {a.step}, "
              f"peak lr {a.lr}")
        return
    ap = argparse.ArgumentParser(description="Train the demo DiT4SR model (flow matching, AdamW).")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--data", default="data")
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--total-steps", type=int, default=0,
                    help="length of the LR schedule (default 20000; given on a resume, it replaces the stored one)")
    ap.add_argument("--steps", type=int, default=0, help="stop this run after this many steps (0: no limit)")
    ap.add_argument("--max-minutes", type=float, default=8.5, help="wall-clock budget of this run")
    ap.add_argument("--save-margin", type=float, default=20.0, help="seconds kept for validation + saving")
    ap.add_argument("--save-every-minutes", type=float, default=3.0, help="also save the state this often")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--rewarm", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--dtype", default="bfloat16" if jax.default_backend() == "gpu" else "float32")
    ap.add_argument("--bridge-frac", type=float, default=0.0,
                    help="share of each batch trained on the LR-start path (s0 = --bridge-sigma)")
    ap.add_argument("--bridge-sigma", type=float, default=0.3, help="start sigma of the LR-start path")
    ap.add_argument("--bridge-exact", type=float, default=0.25,
                    help="share of the LR-start samples taken exactly at --bridge-sigma (the sampler's first step, "
                         "which does most of the work: the demo's 3-step schedule is [0.1, 0.0505, 0.001, 0])")
    ap.add_argument("--start-noise", type=float, default=1.0,
                    help="scale of the noise in the LR-start training paths: 1 (default) DiT4SR's noised LR latent; "
                         "0 the deterministic start the demo's sampler uses (ModelConfig.start_noise; validation "
                         "always starts as the model's sampler does)")
    ap.add_argument("--attention", default="auto", choices=["auto", "cudnn", "xla"])
    ap.add_argument("--prediction", default=None, choices=["velocity", "lr_residual"],
                    help="output parametrisation (ModelConfig.prediction); switching it on a resumed run resets "
                         "proj_out to zero")
    ap.add_argument("--residual-scale", type=float, default=0.1, help="ModelConfig.residual_scale (lr_residual)")
    ap.add_argument("--color-aug", action="store_true",
                    help="random channel permutation (and negative, --invert-prob) of each HR/LR pair")
    ap.add_argument("--invert-prob", type=float, default=0.0, help="with --color-aug: probability of the negative")
    ap.add_argument("--keep-best", action="store_true",
                    help="save OUT/best whenever the validation PSNR at the sampler's first step improves "
                         "(needs --bridge-frac > 0)")
    ap.add_argument("--schedule", default="steps", choices=["steps", "time"],
                    help="cosine decay over --total-steps (steps) or over this run's wall-clock budget "
                         "--max-minutes from its first compiled step (time; --total-steps then only caps the run)")
    ap.add_argument("--anneal-minutes", type=float, default=0.0,
                    help="with --schedule time: training minutes, summed over resumed runs, at which the cosine "
                         "reaches its end (0: the end of this run's budget)")
    ap.add_argument("--ema", type=float, default=0.0,
                    help="keep an exponential moving average of the params with this decay (0: off) in OUT/ema; "
                         "validation and --keep-best then use the EMA params")
    ap.add_argument("--bank", type=int, default=8192)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--val-every", type=int, default=500)
    ap.add_argument("--val-count", type=int, default=0, help="use only the first N validation crops (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--loss", default="mse", choices=LOSSES,
                    help="training loss of the same error (validation always reports the MSE)")
    ap.add_argument("--compile-cache", default=None,
                    help="directory of JAX's persistent compilation cache (a later run skips the compile)")
    train(ap.parse_args(argv))


if __name__ == "__main__":
    main()
