"""Scale-out with JAX's own sharding: a 2-D device mesh ('data', 'model').

  mesh = make_mesh(model=1)                      # all devices on 'data' (pure data parallelism)
  mesh = make_mesh(model=8)                      # 8-way tensor parallelism (e.g. one v5e-8 slice)
  p = shard_params(params["transformer"], mesh)  # float or quantized tree -> placed on the mesh
  outs = upscale_batch(cfg, dict(params, transformer=p), images, mesh=mesh, seed=0)
  stats = calibrate_images(cfg, params, images, mesh=mesh)      # data-parallel calibration
  upscale_folder(cfg, params, "lr/", "sr/", mesh=mesh)          # a folder, batched by image size

Data parallelism: same-size LR images are stacked into one batch [B, H, W, 3] whose batch axis is
sharded over 'data' (padded to a multiple of the axis size with copies of the last image, dropped
afterwards). Every image i gets the keys of `pipeline.upscale(seed=seeds[i])` (VAE sample and initial
noise drawn per image under `vmap`), so the batched result equals the one-image-at-a-time pipeline.

Tensor parallelism (Megatron layout, placed with `NamedSharding`, partitioned by GSPMD): the
column-parallel linears (q/k/v of every stream incl. the LR `*_control` projections, `ff*/net_0/proj`,
the adaLN `norm1*/linear`, `context_embedder`) shard the output dim N of their kernel [K, N] (and
bias [N]) over 'model'; the row-parallel ones (`to_out_0`, `to_add_out`, `to_out_control`,
`ff*/net_2`) shard the input dim K. `ff/control_conv` shards its channels like `net_0`'s output.
`QuantizedWeight` nodes are sharded consistently: codes / scales / zero points along the same
logical dim in their stored layout ([N, K] "nk" or [G, N, g] "gnk"; a row-parallel "gnk" node shards
its group axis G), the low-rank factor on the sharded side (lr_b [r, N] for column, lr_a [K, r] for
row), the H-SVD block factors along their block-row (column) or block-column (row) axis, smoothing
[K] with row-parallel layers, the packed integer group factors of two-level scales (`gscale` [N, G/2])
along N with column-parallel layers; everything small (a_schedule, norms, embeddings; `gscale` of
row-parallel layers) is replicated. Any
dim not divisible by the 'model' size falls back to replication for that array, so every model
places on every mesh; results equal the single-device ones up to float summation order.
"""
from __future__ import annotations

import functools
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qdit4sr_jax.config import ModelConfig
from qdit4sr_jax.quant.qweight import QuantizedWeight

DATA, MODEL = "data", "model"

# Megatron roles of the linear modules, by '/'-joined module path (the path of the dict holding `kernel`).
COLUMN_PARALLEL = (
    r"/(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_q_control|to_k_control|to_v_control)$",
    r"(^|/)ff(_context)?/net_0/proj$",
    r"(^|/)norm1(_context)?/linear$",
    r"(^|/)context_embedder$",
)
ROW_PARALLEL = (
    r"/(to_out_0|to_add_out|to_out_control)$",
    r"(^|/)ff(_context)?/net_2$",
)
CHANNEL_PARALLEL = (r"(^|/)ff/control_conv$",)       # depthwise conv [3, 3, 1, C]: shard C with net_0


# ----------------------------------------------------------------------------- mesh

def make_mesh(model: int = 1, data: Optional[int] = None, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """Mesh of shape (data, model) with axis names ('data', 'model') over `devices` (default: all).

    data defaults to len(devices) // model. Raises ValueError when the sizes do not fit the devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if model < 1 or (data is not None and data < 1):
        raise ValueError(f"mesh sizes must be >= 1, got data={data}, model={model}")
    if data is None:
        if n % model:
            raise ValueError(f"model={model} does not divide the {n} available devices; pick a divisor of {n} "
                             f"or pass devices=")
        data = n // model
    if data * model > n:
        raise ValueError(f"a ({data} x {model}) mesh needs {data * model} devices but only {n} are available "
                         f"({jax.default_backend()}); on CPU set XLA_FLAGS=--xla_force_host_platform_device_count="
                         f"{data * model} before importing jax")
    return Mesh(np.asarray(devices[: data * model]).reshape(data, model), (DATA, MODEL))


def _size(mesh: Mesh, axis: str) -> int:
    return int(mesh.shape[axis]) if axis in mesh.shape else 1


# ----------------------------------------------------------------------------- parameter placement

def linear_role(path: str) -> Optional[str]:
    """'column' | 'row' | 'channel' | None (replicated) for a module path."""
    for role, pats in (("column", COLUMN_PARALLEL), ("row", ROW_PARALLEL), ("channel", CHANNEL_PARALLEL)):
        if any(re.search(p, path) for p in pats):
            return role
    return None


def _spec(shape: Tuple[int, ...], axis: Optional[int], m: int) -> P:
    """PartitionSpec sharding `axis` of `shape` over MODEL if divisible by m, else replicated."""
    if axis is None or m == 1 or not shape:
        return P()
    axis = axis % len(shape)
    if shape[axis] % m:
        return P()
    return P(*[MODEL if i == axis else None for i in range(len(shape))])


def _qweight_specs(w: QuantizedWeight, role: Optional[str], m: int) -> Dict[str, Optional[P]]:
    """PartitionSpec per array field of a QuantizedWeight (None for absent fields)."""
    col, row = role == "column", role == "row"
    nk = w.layout == "nk"
    axes = {
        # stored layouts: qvalue / scale / zero are [N, K'] ([N, G]) or [G, N, g'] ([N, G])
        "qvalue": (0 if nk else 1) if col else ((1 if nk else 0) if row else None),
        "scale": 0 if col else (None if nk else 1) if row else None,
        "zero": 0 if col else (None if nk else 1) if row else None,
        "smooth": 0 if row else None,
        "lr_a": 0 if row else None,                  # [K, r]
        "lr_b": 1 if col else None,                  # [r, N]
        "block_u": 0 if col else (1 if row else None),   # [n_bo, n_bi, b_out]
        "block_v": 0 if col else (1 if row else None),   # [n_bo, n_bi, b_in]
        "a_schedule": None,
        "gscale": 0 if col else None,                # [N, ceil(G/2)] packed integer group factors (small)
        # scales of int8 branch factors (QuantConfig.lowrank_bits=8): [1, r], [r, 1], [n_bo, n_bi, 1]: small
        "lr_a_scale": None, "lr_b_scale": None, "block_u_scale": None, "block_v_scale": None,
    }
    specs = {f: (None if getattr(w, f) is None else _spec(tuple(getattr(w, f).shape), ax, m))
             for f, ax in axes.items()}
    # keep the quantized codes and their scales consistent: if one of them could not be sharded, replicate all
    main = [specs[f] for f in ("qvalue", "scale", "zero") if specs[f] is not None and axes[f] is not None]
    if any(s == P() for s in main):
        for f in ("qvalue", "scale", "zero"):
            if specs[f] is not None:
                specs[f] = P()
    # block factors share their block grid: shard both or neither
    if specs["block_u"] is not None and (specs["block_u"] == P()) != (specs["block_v"] == P()):
        specs["block_u"] = specs["block_v"] = P()
    return specs


def param_specs(params, mesh: Mesh, *, tensor_parallel: bool = True):
    """A tree like `params` of PartitionSpecs (QuantizedWeight nodes become QuantizedWeight nodes whose
    array fields are PartitionSpecs). Works on concrete or abstract (`jax.eval_shape`) trees."""
    m = _size(mesh, MODEL) if tensor_parallel else 1

    def leaf_spec(path: str, key: str, x, role):
        shape = tuple(x.shape)
        if role in ("column", "channel"):
            return _spec(shape, -1, m)                   # kernel [K, N] / bias [N] / conv [3, 3, 1, C] / [C]
        if role == "row" and key == "kernel":
            return _spec(shape, 0, m)
        return P()

    def walk(node, path):
        if isinstance(node, QuantizedWeight):
            role = linear_role("/".join(path[:-1]))
            specs = _qweight_specs(node, role, m)
            return node.replace(**specs)
        if isinstance(node, Mapping):
            return {k: walk(v, path + (str(k),)) for k, v in node.items()}
        if node is None:
            return None
        return leaf_spec("/".join(path), path[-1] if path else "", node, linear_role("/".join(path[:-1])))

    return walk(params, ())


def param_shardings(params, mesh: Mesh, *, tensor_parallel: bool = True):
    """`param_specs` as NamedShardings on `mesh` (replicated over 'data')."""
    specs = param_specs(params, mesh, tensor_parallel=tensor_parallel)
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                  is_leaf=lambda x: isinstance(x, P))


def shard_params(params, mesh: Mesh, *, tensor_parallel: bool = True):
    """Place a (float or quantized) params tree on `mesh`: tensor-parallel over 'model' as described in
    the module docstring (tensor_parallel=False: replicated on every device). Returns the placed tree."""
    return jax.device_put(params, param_shardings(params, mesh, tensor_parallel=tensor_parallel))


def bytes_per_device(params, mesh: Mesh, *, tensor_parallel: bool = True) -> Dict[str, int]:
    """Memory of `params` (concrete or abstract) under `param_specs`: {"total": bytes of the whole tree,
    "per_device": bytes the largest device holds, "replicated": bytes every device holds in full}."""
    specs = param_specs(params, mesh, tensor_parallel=tensor_parallel)
    leaves = jax.tree_util.tree_leaves(params)
    spec_leaves = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P))
    if len(leaves) != len(spec_leaves):
        raise AssertionError("param_specs does not match the params tree")
    total = per_dev = repl = 0
    for x, s in zip(leaves, spec_leaves):
        nb = int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
        shard = NamedSharding(mesh, s).shard_shape(tuple(x.shape))
        sb = int(np.prod(shard)) * np.dtype(x.dtype).itemsize
        total += nb
        per_dev += sb
        repl += nb if sb == nb else 0
    return {"total": total, "per_device": per_dev, "replicated": repl}


# ----------------------------------------------------------------------------- data-parallel upscaling

def _prepare(cfg: ModelConfig, image) -> Tuple[np.ndarray, Tuple[int, int]]:
    """-> (bicubic-upsampled uint8 [Hm, Wm, 3] on the latent-patch grid, target (Ht, Wt)), as `upscale`."""
    from qdit4sr_jax import pipeline
    lr = pipeline.to_rgb_uint8(image)
    H0, W0 = lr.shape[:2]
    mn = pipeline.min_input_size(cfg)
    if min(H0, W0) < mn:
        raise ValueError(f"image {W0}x{H0} is too small: the minimum side is {mn} pixels for scale {cfg.scale}")
    s, m = cfg.scale, cfg.vae.downsample * cfg.patch_size
    Wt, Ht = W0 * s, H0 * s
    up = pipeline._resize(pipeline._resize(lr, Wt, Ht), Wt // m * m, Ht // m * m)
    return up, (Ht, Wt)


@functools.partial(jax.jit, static_argnames=("cfg", "sample_kw", "data_sharding"))
def _batch_core(cfg: ModelConfig, tparams, vparams, up, keys, ctx, pool, nctx, npool, *, sample_kw, data_sharding):
    """up uint8 [B, H, W, 3], keys [B, 2] -> (images float [B, H, W, 3] in ~[-1, 1], latents [B, h, w, C])."""
    from qdit4sr_jax import sampling
    from qdit4sr_jax.model import vae as _vae
    cons = (lambda a: a) if data_sharding is None else \
        (lambda a: jax.lax.with_sharding_constraint(a, data_sharding))
    x = cons(up.astype(jnp.float32) / 127.5 - 1.0)
    k = jax.vmap(jax.random.split)(keys)                                   # [B, 2, 2]
    lr_lat = jax.vmap(lambda xi, ki: _vae.encode(cfg.vae, vparams, xi[None], ki)[0])(x, k[:, 0])
    lr_lat = cons(lr_lat)
    noise = cons(jax.vmap(lambda ki: jax.random.normal(ki, (1,) + lr_lat.shape[1:], jnp.float32)[0])(k[:, 1]))
    lat = sampling.sample(cfg, tparams, lr_lat, noise, context=ctx, pooled=pool, neg_context=nctx,
                          neg_pooled=npool, **dict(sample_kw))
    lat = cons(lat)
    img = cons(_vae.decode(cfg.vae, vparams, lat))
    return img, lat


def _sample_kw(cfg: ModelConfig, num_steps, guidance_scale, start, start_sigma, tile_latent, tile_overlap,
               tile_batch, force_tiling) -> Tuple[Tuple[str, Any], ...]:
    return tuple(sorted(dict(num_steps=num_steps, guidance_scale=guidance_scale, start=start,
                             start_sigma=start_sigma, tile_latent=tile_latent, tile_overlap=tile_overlap,
                             tile_batch=tile_batch, force_tiling=force_tiling).items()))


def _pad_batch(a: np.ndarray, mult: int) -> np.ndarray:
    r = (-a.shape[0]) % mult
    return a if r == 0 else np.concatenate([a, np.repeat(a[-1:], r, axis=0)], axis=0)


def upscale_batch(cfg: ModelConfig, params: Mapping[str, Any], images: Sequence[Any], *,
                  mesh: Optional[Mesh] = None, seed: int = 0, seeds: Optional[Sequence[int]] = None,
                  num_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                  color_fix: Optional[str] = "model", prompt=None, prompt_index: int = 0,
                  start: Optional[str] = None, start_sigma: Optional[float] = None,
                  tile_latent: Optional[int] = -1, tile_overlap: Optional[int] = None,
                  tile_batch: Optional[int] = None, force_tiling: bool = False,
                  return_latents: bool = False):
    """Super-resolve same-size images in one batch, the batch axis sharded over the mesh's 'data' axis.

    images: list of PIL images / numpy arrays (as `pipeline.upscale` accepts), all of one size.
    seeds: per-image seeds (default `seed` for every image); image i equals
    `pipeline.upscale(cfg, params, images[i], seed=seeds[i], ...)`. mesh: None = the default device;
    params may already be placed with `shard_params` (tensor parallelism), else they are replicated.
    Returns a list of outputs of the input kind (PIL -> PIL RGB, numpy -> uint8 [H*s, W*s, 3]); with
    ``return_latents`` also the final latents [B, h, w, C] (numpy).
    """
    from PIL import Image

    from qdit4sr_jax import pipeline
    from qdit4sr_jax.colorfix import resolve
    images = list(images)
    if not images:
        raise ValueError("upscale_batch: no images given")
    pipeline.check_bundle(cfg, params)
    color_fix = resolve(color_fix, cfg)
    seeds = [int(seed)] * len(images) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != len(images):
        raise ValueError(f"got {len(seeds)} seeds for {len(images)} images")
    prepared = [_prepare(cfg, im) for im in images]
    sizes = {p[0].shape for p in prepared}
    if len(sizes) != 1:
        raise ValueError(f"upscale_batch needs images of one size, got upsampled sizes {sorted(sizes)}; "
                         f"use upscale_folder (groups by size) or call it once per size")
    ctx, pool, nctx, npool = pipeline._resolve_prompt(cfg, params, prompt, prompt_index)
    g = float(cfg.guidance_scale if guidance_scale is None else guidance_scale)
    if g != 1.0 and ctx is not None and nctx is None:
        raise ValueError(f"guidance_scale={g} needs negative prompt embeddings; the prompt has none "
                         "(pass guidance_scale=1.0 or export a negative prompt)")
    up = np.stack([p[0] for p in prepared])
    keys = np.stack([np.asarray(jax.random.key_data(jax.random.PRNGKey(s))) for s in seeds]).astype(np.uint32)
    B = up.shape[0]
    data_sharding = None
    if mesh is not None:
        d = _size(mesh, DATA)
        up, keys = _pad_batch(up, d), _pad_batch(keys, d)
        data_sharding = NamedSharding(mesh, P(DATA))
        up, keys = jax.device_put(up, data_sharding), jax.device_put(keys, data_sharding)
        repl = NamedSharding(mesh, P())
        place = lambda t: jax.tree_util.tree_map(  # noqa: E731  replicate anything not already on the mesh
            lambda a: a if isinstance(getattr(a, "sharding", None), NamedSharding) and a.sharding.mesh == mesh
            else jax.device_put(a, repl), t)
        tparams, vparams = place(params["transformer"]), place(params.get("vae", {}))
        ctx, pool, nctx, npool = (None if a is None else jax.device_put(a, repl) for a in (ctx, pool, nctx, npool))
    else:
        tparams, vparams = params["transformer"], params.get("vae", {})
    kw = _sample_kw(cfg, num_steps, g, start, start_sigma, tile_latent, tile_overlap, tile_batch, force_tiling)
    img, lat = _batch_core(cfg, tparams, vparams, up, jnp.asarray(keys), ctx, pool, nctx, npool,
                           sample_kw=kw, data_sharding=data_sharding)
    img = np.asarray(img)[:B]
    outs = []
    for i, (u, (Ht, Wt)) in enumerate(prepared):
        o = pipeline.finish_image(img[i], u, (Wt, Ht), color_fix)
        outs.append(Image.fromarray(o, "RGB") if isinstance(images[i], Image.Image) else o)
    return (outs, np.asarray(lat)[:B]) if return_latents else outs


# ----------------------------------------------------------------------------- data-parallel calibration

def calibrate_images(cfg: ModelConfig, params: Mapping[str, Any], images: Sequence[Any], *,
                     mesh: Optional[Mesh] = None, seed: int = 0, seeds: Optional[Sequence[int]] = None,
                     num_steps: Optional[int] = None, guidance_scale: Optional[float] = None, prompt=None,
                     batch_size: Optional[int] = None, tile_latent: Optional[int] = -1):
    """`pipeline.calibrate_images` over a batch sharded on the mesh's 'data' axis.

    Same-size images are stacked (up to `batch_size` per run, default all of one size); the sampler
    runs under `vmap` over the images (each one as `pipeline.upscale(image, seed=seeds[i])` runs it,
    default seeds: `seed` for every image, like `pipeline.calibrate_images`), so every image yields its
    own statistics, and they are merged with `quant.stats.merge_stats` (max of maxima, mean of
    variances): the result equals `pipeline.calibrate_images` up to float rounding, on any mesh.
    Returns {module path: {"var": [T], "absmax": [T], "ch_absmax": [T, K], "tok_var": [T]}}.
    """
    from qdit4sr_jax import pipeline
    from qdit4sr_jax.quant.stats import merge_stats, normalize_calib
    images = list(images)
    if not images:
        raise ValueError("calibration needs at least one image: pass a non-empty list of LR images "
                         "(e.g. the bundled samples: qdit4sr_jax.demo.bundled_samples)")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    seeds = [int(seed)] * len(images) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != len(images):
        raise ValueError(f"got {len(seeds)} seeds for {len(images)} images")
    groups: Dict[tuple, list] = {}
    for im, s in zip(images, seeds):
        up = _prepare(cfg, im)[0]
        groups.setdefault(up.shape, []).append((up, s))
    ctx, pool, nctx, npool = pipeline._resolve_prompt(cfg, params, prompt, 0)
    g = float(cfg.guidance_scale if guidance_scale is None else guidance_scale)
    if g != 1.0 and ctx is not None and nctx is None:
        raise ValueError(f"guidance_scale={g} needs negative prompt embeddings; the prompt has none "
                         "(pass guidance_scale=1.0 or export a negative prompt)")
    data_sharding = None if mesh is None else NamedSharding(mesh, P(DATA))
    tparams, vparams = params["transformer"], params.get("vae", {})
    if mesh is not None:
        repl = NamedSharding(mesh, P())
        put = lambda t: jax.tree_util.tree_map(  # noqa: E731
            lambda a: a if isinstance(getattr(a, "sharding", None), NamedSharding) and a.sharding.mesh == mesh
            else jax.device_put(a, repl), t)
        tparams, vparams = put(tparams), put(vparams)
        ctx, pool, nctx, npool = (None if a is None else jax.device_put(a, repl) for a in (ctx, pool, nctx, npool))
    kw = (("guidance_scale", g), ("num_steps", num_steps), ("tile_latent", tile_latent))
    runs = []
    for items in groups.values():
        bs = len(items) if batch_size is None else batch_size
        for i in range(0, len(items), bs):
            part = items[i:i + bs]
            up = np.stack([u for u, _ in part])
            keys = np.stack([np.asarray(jax.random.key_data(jax.random.PRNGKey(s))) for _, s in part])
            keys = keys.astype(np.uint32)
            n = up.shape[0]
            if data_sharding is not None:
                d = _size(mesh, DATA)
                up, keys = _pad_batch(up, d), _pad_batch(keys, d)   # padding: copies of the last image, dropped
                up, keys = jax.device_put(up, data_sharding), jax.device_put(keys, data_sharding)
            stats = _calib_core(cfg, tparams, vparams, up, jnp.asarray(keys), ctx, pool, nctx, npool,
                                sample_kw=kw, data_sharding=data_sharding)
            stats = jax.device_get(stats)
            runs += [normalize_calib(jax.tree_util.tree_map(lambda a, j=j: a[j], stats)) for j in range(n)]
    return runs[0] if len(runs) == 1 else merge_stats(*runs)


@functools.partial(jax.jit, static_argnames=("cfg", "sample_kw", "data_sharding"))
def _calib_core(cfg: ModelConfig, tparams, vparams, up, keys, ctx, pool, nctx, npool, *, sample_kw, data_sharding):
    """up uint8 [B, H, W, 3], keys [B, 2] -> the model's calib collection, every leaf [B, T, ...]."""
    from qdit4sr_jax import sampling
    from qdit4sr_jax.model import vae as _vae
    cons = (lambda a: a) if data_sharding is None else \
        (lambda a: jax.lax.with_sharding_constraint(a, data_sharding))
    x = cons(up.astype(jnp.float32) / 127.5 - 1.0)

    def one(xi, key):
        k_enc, k_noise = jax.random.split(key)
        lr_lat = _vae.encode(cfg.vae, vparams, xi[None], k_enc)
        noise = jax.random.normal(k_noise, lr_lat.shape, jnp.float32)
        _, stats = sampling.sample(cfg, tparams, lr_lat, noise, context=ctx, pooled=pool, neg_context=nctx,
                                   neg_pooled=npool, collect_stats=True, **dict(sample_kw))
        return stats

    return jax.vmap(one)(x, keys)


# ----------------------------------------------------------------------------- folders

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def list_images(folder: str) -> List[str]:
    """Sorted image files (by extension) directly inside `folder`."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"input folder {folder!r} does not exist")
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                   if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder!r}")
    return files


def upscale_folder(cfg: ModelConfig, params: Mapping[str, Any], in_dir: str, out_dir: str, *,
                   mesh: Optional[Mesh] = None, batch_size: Optional[int] = None, seed: int = 0,
                   ext: str = ".png", overwrite: bool = False, **upscale_kw) -> List[str]:
    """Upscale every image of `in_dir` into `out_dir` (same base name, `ext`), batching same-size images
    (`batch_size` per batch, default all images of one size) with the batch axis sharded over the
    mesh's 'data' axis. Every image uses `seed` (as `pipeline.upscale(image, seed=seed)`). Each output
    is written atomically (`pipeline.save_image`). Existing outputs raise FileExistsError unless overwrite. Returns the paths."""
    from PIL import Image

    from qdit4sr_jax import pipeline
    files = list_images(in_dir)
    outs = [os.path.join(out_dir, os.path.splitext(os.path.basename(f))[0] + ext) for f in files]
    if not overwrite:
        exist = [o for o in outs if os.path.exists(o)]
        if exist:
            raise FileExistsError(f"{len(exist)} output(s) exist, e.g. {exist[0]!r}; pass overwrite=True")
    if os.path.abspath(in_dir) == os.path.abspath(out_dir):
        raise ValueError("out_dir must differ from in_dir")
    groups: Dict[tuple, list] = {}
    for i, f in enumerate(files):
        with Image.open(f) as im:
            im.load()
            groups.setdefault(im.size, []).append((i, im.copy()))
    for items in groups.values():
        bs = len(items) if batch_size is None else int(batch_size)
        for j in range(0, len(items), bs):
            part = items[j:j + bs]
            res = upscale_batch(cfg, params, [im for _, im in part], mesh=mesh,
                                seed=seed, **upscale_kw)
            for (i, _), r in zip(part, res):
                pipeline.save_image(r, outs[i])
    return outs


__all__ = ["make_mesh", "param_specs", "param_shardings", "shard_params", "bytes_per_device",
           "upscale_batch", "calibrate_images", "upscale_folder", "list_images",
           "linear_role", "DATA", "MODEL"]
