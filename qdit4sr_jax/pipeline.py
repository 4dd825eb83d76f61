"""Super-resolution pipeline: image in, image out.

  upscale(cfg, params, image, *, seed=0, ...) -> image (PIL in -> PIL out; numpy in -> np.uint8 [H*s, W*s, 3])
  calibrate_images(cfg, params, images, ...)  -> per-layer, per-step activation stats (as upscale runs)
  bicubic(image, scale), read_images(path), save_image(image, path), load_prompts / save_prompts

Steps (DiT4SR's pipeline): bicubic upsample of the LR image by cfg.scale (then to a multiple of
vae.downsample * patch_size), VAE encode (a sample), flow-matching sampling conditioned on the LR
latent (tiles of cfg.tile_latent with Gaussian blending when the latent is larger), decode, colour fix
towards the upsampled LR image (AdaIN by default, wavelet optional), resize back to exactly H*s x W*s.
`params` is the model bundle {"transformer": ..., "vae": ... ({} for space_to_depth), "prompt": {...}}.

Prompt embeddings (what `converters/prompts.py` exports from SD3's text encoders) are a dict / .npz:
  prompt_embeds [B, L, joint_attention_dim] (SD3: L = 333 = 77 CLIP + 256 T5 tokens, D = 4096),
  pooled_prompt_embeds [B, pooled_projection_dim] (SD3: 2048),
  negative_prompt_embeds, negative_pooled_prompt_embeds (same shapes; needed for guidance_scale != 1),
  optional strings prompt / negative_prompt. SD3's empty prompt "" gives [1, 333, 4096] and [1, 2048].
"""
from __future__ import annotations

import os
import warnings
import zipfile
from typing import Any, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from qdit4sr_jax import sampling
from qdit4sr_jax import colorfix as _colorfix
from qdit4sr_jax.colorfix import color_fix as _color_fix
from qdit4sr_jax.config import ModelConfig
from qdit4sr_jax.model import vae as _vae

PROMPT_FORMAT = "qdit4sr-jax/prompt-embeddings"
PROMPT_KEYS = ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds")


# ----------------------------------------------------------------------------- prompt embeddings

def validate_prompts(d: Mapping[str, Any], cfg: Optional[ModelConfig] = None) -> dict:
    """Check a prompt-embedding dict (shapes, finiteness, pairs) -> dict of float32 numpy arrays."""
    unknown = sorted(set(d) - set(PROMPT_KEYS) - {"prompt", "negative_prompt", "format"})
    if unknown:
        raise ValueError(f"prompt embeddings: unknown keys {unknown}; expected {list(PROMPT_KEYS)}")
    if "prompt_embeds" not in d or "pooled_prompt_embeds" not in d:
        raise ValueError("prompt embeddings need 'prompt_embeds' [B, L, D] and 'pooled_prompt_embeds' [B, P]")
    out = {}
    for k in PROMPT_KEYS:
        if k in d:
            a = np.asarray(d[k])
            if not np.issubdtype(a.dtype, np.floating):
                raise ValueError(f"prompt embeddings: {k} must be floating point, got {a.dtype}")
            a = a.astype(np.float32)
            if not np.isfinite(a).all():
                raise ValueError(f"prompt embeddings: {k} contains NaN or Inf")
            out[k] = a
    for k in ("prompt_embeds", "negative_prompt_embeds"):
        if k in out and out[k].ndim != 3:
            raise ValueError(f"prompt embeddings: {k} must be [B, L, D], got shape {out[k].shape}")
    for k in ("pooled_prompt_embeds", "negative_pooled_prompt_embeds"):
        if k in out and out[k].ndim != 2:
            raise ValueError(f"prompt embeddings: {k} must be [B, P], got shape {out[k].shape}")
    if ("negative_prompt_embeds" in out) != ("negative_pooled_prompt_embeds" in out):
        raise ValueError("prompt embeddings: give both negative_prompt_embeds and negative_pooled_prompt_embeds, "
                         "or neither")
    B = out["prompt_embeds"].shape[0]
    if out["pooled_prompt_embeds"].shape[0] != B:
        raise ValueError(f"prompt embeddings: pooled_prompt_embeds batch {out['pooled_prompt_embeds'].shape[0]} "
                         f"!= prompt_embeds batch {B}")
    if "negative_prompt_embeds" in out:
        for k, ref in (("negative_prompt_embeds", "prompt_embeds"),
                       ("negative_pooled_prompt_embeds", "pooled_prompt_embeds")):
            if out[k].shape[1:] != out[ref].shape[1:] or out[k].shape[0] not in (1, B):
                raise ValueError(f"prompt embeddings: {k} shape {out[k].shape} does not match {ref} "
                                 f"{out[ref].shape} (batch 1 or {B}, same other dims)")
    if cfg is not None:
        D, P = cfg.joint_attention_dim, cfg.pooled_projection_dim
        for k in ("prompt_embeds", "negative_prompt_embeds"):
            if k in out and out[k].shape[-1] != D:
                raise ValueError(f"prompt embeddings: {k} has width {out[k].shape[-1]}, the model expects "
                                 f"joint_attention_dim {D}")
        for k in ("pooled_prompt_embeds", "negative_pooled_prompt_embeds"):
            if k in out and out[k].shape[-1] != P:
                raise ValueError(f"prompt embeddings: {k} has width {out[k].shape[-1]}, the model expects "
                                 f"pooled_projection_dim {P}")
    for k in ("prompt", "negative_prompt"):
        if k in d:
            out[k] = np.asarray(d[k]).astype(str)
    return out


def save_prompts(path: str, embeddings: Mapping[str, Any]) -> None:
    """Validate and write prompt embeddings as .npz (atomically: temp file + rename)."""
    d = validate_prompts(embeddings)
    d["format"] = np.asarray(PROMPT_FORMAT)
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    try:
        np.savez(tmp, **d)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_prompts(path: str, cfg: Optional[ModelConfig] = None) -> dict:
    """Read and validate a prompt-embedding .npz written by `save_prompts` / converters.prompts."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"prompt embeddings file {path!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path!r} is not a readable .npz of prompt embeddings ({type(e).__name__}: {e}); "
                         f"re-export it with `python -m converters prompts`") from None
    fmt = str(d.pop("format", ""))
    if fmt != PROMPT_FORMAT:
        raise ValueError(f"{path!r} is not a prompt-embeddings file (format {fmt!r}, expected {PROMPT_FORMAT!r})")
    return validate_prompts(d, cfg)


def _resolve_prompt(cfg: ModelConfig, params, prompt, index: int):
    """-> (context, pooled, neg_context, neg_pooled) jnp arrays with batch 1, or Nones (learned context)."""
    if prompt is None:
        prompt = params.get("prompt") or None
    if prompt is None:
        if cfg.context_mode == "learned":
            return None, None, None, None
        raise ValueError("no prompt embeddings: pass prompt=<.npz path or dict> (export them with "
                         "`python -m converters prompts`) or include params['prompt']")
    if isinstance(prompt, str):
        if not prompt.endswith(".npz") or not os.path.exists(prompt):
            raise ValueError(f"prompt must be a prompt-embeddings .npz path or dict, got {prompt!r}; text captions "
                             "need SD3's text encoders: export them with `python -m converters prompts`")
        d = load_prompts(prompt, cfg)
    else:
        d = validate_prompts(prompt, cfg)
    B = d["prompt_embeds"].shape[0]
    if not 0 <= index < B:
        raise ValueError(f"prompt_index {index} out of range for {B} prompt(s)")
    pick = lambda a: jnp.asarray(a[index if a.shape[0] > 1 else 0][None])  # noqa: E731
    neg = (pick(d["negative_prompt_embeds"]), pick(d["negative_pooled_prompt_embeds"])) \
        if "negative_prompt_embeds" in d else (None, None)
    return pick(d["prompt_embeds"]), pick(d["pooled_prompt_embeds"]), neg[0], neg[1]


# ----------------------------------------------------------------------------- images

def min_input_size(cfg: ModelConfig) -> int:
    """Smallest LR side (pixels) `upscale` accepts: the upsampled side must hold one latent patch."""
    m = cfg.vae.downsample * cfg.patch_size
    return -(-m // cfg.scale)


def to_rgb_uint8(image) -> np.ndarray:
    """PIL image or numpy array -> np.uint8 [H, W, 3].

    PIL modes other than RGB are converted (L/LA/RGBA/P/I;16/I/F/...; alpha is dropped, 16-bit scaled
    to 8 bits) with a warning naming the conversion. numpy: uint8 or uint16 [H,W], [H,W,1], [H,W,3],
    [H,W,4], or floating point in [0, 1]; NaN/Inf rejected.
    """
    if isinstance(image, Image.Image):
        mode = image.mode
        if mode == "RGB":
            return np.asarray(image, np.uint8).copy()
        if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            a = np.asarray(image)
            if mode in ("F", "I"):
                a = a.astype(np.float64)
                if not np.isfinite(a).all():
                    raise ValueError(f"PIL mode {mode} image contains NaN or Inf")
                hi = 1.0 if (mode == "F" and a.max() <= 1.0) else 65535.0 if a.max() > 255 else 255.0
                a = np.clip(a, 0, hi) / hi * 255.0        # F in [0, 1], or 8- / 16-bit value ranges
            else:
                a = a.astype(np.float64) / 257.0
            warnings.warn(f"converted {mode} (single-channel, {'16-bit' if mode.startswith('I;16') else mode}) "
                          "image to 8-bit RGB", stacklevel=3)
            g = np.round(a).astype(np.uint8)
            return np.stack([g] * 3, axis=-1)
        if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
            warnings.warn(f"converted {mode} image to RGB: the alpha channel is dropped", stacklevel=3)
        elif mode != "RGB":
            warnings.warn(f"converted {mode} image to RGB", stacklevel=3)
        return np.asarray(image.convert("RGB"), np.uint8).copy()
    a = np.asarray(image)
    if a.dtype == object or a.size == 0:
        raise ValueError(f"image must be a PIL image or a non-empty numeric array, got {type(image).__name__}")
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    elif a.ndim == 3 and a.shape[-1] == 4:
        warnings.warn("image has 4 channels (RGBA): the alpha channel is dropped", stacklevel=3)
        a = a[..., :3]
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"image array must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got shape {a.shape}")
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if a.dtype == np.uint16:
        warnings.warn("converted a uint16 image to 8 bits", stacklevel=3)
        return np.round(a / 257.0).astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ValueError("image array contains NaN or Inf values")
        if a.min() < -1e-3 or a.max() > 1 + 1e-3:
            raise ValueError(f"floating-point images must be in [0, 1], got range [{a.min():.4g}, {a.max():.4g}]")
        return np.round(np.clip(a, 0, 1) * 255.0).astype(np.uint8)
    raise ValueError(f"unsupported image dtype {a.dtype}: use uint8, uint16 or float in [0, 1]")


def _resize(a: np.ndarray, w: int, h: int) -> np.ndarray:
    if a.shape[1] == w and a.shape[0] == h:
        return a
    return np.asarray(Image.fromarray(a).resize((w, h), Image.BICUBIC), np.uint8)


def _to_uint8(x) -> np.ndarray:
    return np.round(np.clip(np.asarray(x, np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


# ----------------------------------------------------------------------------- upscale

def bicubic(image, scale: int):
    """Plain bicubic upsampling by `scale` (the baseline): same kind out as in (PIL or np.uint8)."""
    a = to_rgb_uint8(image)
    out = _resize(a, a.shape[1] * scale, a.shape[0] * scale)
    return Image.fromarray(out, "RGB") if isinstance(image, Image.Image) else out


def check_bundle(cfg: ModelConfig, params: Mapping[str, Any]) -> None:
    """Raise ValueError unless `params` is a model bundle {'transformer', 'vae', ...} usable with `cfg`."""
    if "transformer" not in params:
        raise ValueError("params must be the model bundle {'transformer': ..., 'vae': ..., 'prompt': ...}; "
                         "'transformer' is missing")
    if cfg.vae.kind == "sd3" and not params.get("vae"):
        raise ValueError("params['vae'] is missing or empty but cfg.vae.kind is 'sd3': convert the VAE "
                         "(python -m converters vae) or use a space_to_depth model")


def _prepare(cfg: ModelConfig, params, image, seed, prompt, prompt_index, guidance_scale, process_size=None):
    """Validate, upsample and encode -> dict(up, lr_lat, noise, ctx, pool, nctx, npool, g, size)."""
    check_bundle(cfg, params)
    lr = to_rgb_uint8(image)
    H0, W0 = lr.shape[:2]
    mn = min_input_size(cfg)
    if min(H0, W0) < mn:
        raise ValueError(f"image {W0}x{H0} is too small: the minimum side is {mn} pixels for scale {cfg.scale}")
    s, m = cfg.scale, cfg.vae.downsample * cfg.patch_size
    Wt, Ht = W0 * s, H0 * s                                    # the output size
    if process_size and min(H0, W0) < process_size // s:      # DiT4SR: small inputs are processed larger
        r = (process_size // s) / min(H0, W0)
        lr = _resize(lr, int(r * W0), int(r * H0))
    up = _resize(lr, lr.shape[1] * s, lr.shape[0] * s)         # bicubic x scale
    up = _resize(up, up.shape[1] // m * m, up.shape[0] // m * m)   # to a latent-patch multiple (DiT4SR: //8*8)

    ctx, pool, nctx, npool = _resolve_prompt(cfg, params, prompt, prompt_index)
    g = float(cfg.guidance_scale if guidance_scale is None else guidance_scale)
    if g != 1.0 and ctx is not None and nctx is None:
        raise ValueError(f"guidance_scale={g} needs negative prompt embeddings; the prompt has none "
                         "(pass guidance_scale=1.0 or export a negative prompt)")
    k_enc, k_noise = jax.random.split(jax.random.PRNGKey(int(seed)))
    x = jnp.asarray(up, jnp.float32)[None] / 127.5 - 1.0
    lr_lat = _vae.encode_jit(cfg.vae, params.get("vae", {}), x, k_enc)
    noise = jax.random.normal(k_noise, lr_lat.shape, jnp.float32)
    return dict(up=up, lr_lat=lr_lat, noise=noise, ctx=ctx, pool=pool, nctx=nctx, npool=npool, g=g,
                size=(Wt, Ht))


def finish_image(img, up, size, color_fix: Optional[str]) -> np.ndarray:
    """A decoded image [H, W, 3] in [-1, 1] -> uint8 [size[1], size[0], 3], as `upscale` finishes: to 8 bits,
    the colour fix (resolved by `colorfix.resolve`: 'adain' | 'wavelet' | None) towards `up` (the
    bicubic-upsampled input, uint8 [H, W, 3]), resized to size = (width, height)."""
    out = _to_uint8(img * 0.5 + 0.5)
    if color_fix is not None:
        out = _to_uint8(_color_fix(color_fix, out.astype(np.float32) / 255.0, up.astype(np.float32) / 255.0))
    return _resize(out, *size)


def upscale(cfg: ModelConfig, params: Mapping[str, Any], image, *, seed: int = 0,
            num_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
            color_fix: Optional[str] = "model", prompt: Union[None, str, Mapping[str, Any]] = None,
            prompt_index: int = 0, start: Optional[str] = None, start_sigma: Optional[float] = None,
            tile_latent: Optional[int] = -1, tile_overlap: Optional[int] = None,
            tile_batch: Optional[int] = None, force_tiling: bool = False, process_size: Optional[int] = None,
            return_latents: bool = False, prepare_weights: Optional[str] = None):
    """Super-resolve one image by cfg.scale.

    image: PIL image or numpy array (see `to_rgb_uint8`). Returns the same kind (PIL RGB image or
    np.uint8 [H*s, W*s, 3]); with ``return_latents`` also the final latents [1, h, w, C].
    prompt: None (params['prompt'], or the learned context), a dict or a .npz path of prompt embeddings.
    Defaults (num_steps, guidance_scale, start, start_sigma, tile_latent, tile_overlap) come from cfg, and so
    does the colour fix (color_fix="model": cfg.color_fix; or 'adain' | 'wavelet' | None);
    tile_latent=None or 0 disables tiling; ``force_tiling`` tiles even a latent no larger than one tile
    (testing/diagnostics). ``process_size`` (DiT4SR's test scripts: 512): an input whose short side is
    below process_size // scale is first enlarged (bicubic) so that it is, and the result resized back
    to H*s x W*s. Deterministic for a given seed. ``prepare_weights`` (None or a
    `quant.kernels.prepared.SAMPLER_MODES` key): see `sampling.sample` (fused quantized layers' weight-side operands
    once per run).
    """
    color_fix = _colorfix.resolve(color_fix, cfg)
    d = _prepare(cfg, params, image, seed, prompt, prompt_index, guidance_scale, process_size)
    lat = sampling.sample(cfg, params["transformer"], d["lr_lat"], d["noise"], context=d["ctx"], pooled=d["pool"],
                          neg_context=d["nctx"], neg_pooled=d["npool"], num_steps=num_steps,
                          guidance_scale=d["g"], start=start, start_sigma=start_sigma, tile_latent=tile_latent,
                          tile_overlap=tile_overlap, tile_batch=tile_batch, force_tiling=force_tiling,
                          prepare_weights=prepare_weights)
    out = finish_image(_vae.decode_jit(cfg.vae, params.get("vae", {}), lat)[0], d["up"], d["size"], color_fix)
    result = Image.fromarray(out, "RGB") if isinstance(image, Image.Image) else out
    return (result, lat) if return_latents else result


def calibrate_images(cfg: ModelConfig, params: Mapping[str, Any], images, *, seed: int = 0,
                     num_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                     prompt=None, process_size: Optional[int] = None, progress: bool = False,
                     step_gains: bool = False, probes: int = 2, **sample_kwargs):
    """Activation statistics of every transformer `Linear` over all sampling steps, for each image run
    exactly as `upscale` runs it (same preprocessing, seed, prompt, tiling), merged over the images.

    Returns {module path: {"var": [T], "absmax": [T], "ch_absmax": [T, d_in], "tok_var": [T]}}
    (`qdit4sr_jax.quant.stats` form), T = num_steps. With ``step_gains`` every layer's stats also hold
    "step_gain" [T]: the sampler's step sensitivities (`quant.stepgain.step_sensitivity`, `probes` reverse
    passes per image), which QuantConfig.vatmp_step_weights="sensitivity" uses.
    """
    from qdit4sr_jax.quant.calibrate import calibrate_sampler
    from qdit4sr_jax.quant.stats import merge_stats
    images = list(images)
    if not images:
        raise ValueError("calibrate_images needs at least one image")
    runs = []
    for i, image in enumerate(images):
        d = _prepare(cfg, params, image, seed, prompt, 0, guidance_scale, process_size)
        kw = dict(context=d["ctx"], pooled=d["pool"], neg_context=d["nctx"], neg_pooled=d["npool"],
                  num_steps=num_steps, guidance_scale=d["g"], **sample_kwargs)
        run = calibrate_sampler(cfg, params["transformer"], d["lr_lat"], d["noise"], **kw)
        if step_gains:
            from qdit4sr_jax.quant.stepgain import step_sensitivity
            g = step_sensitivity(cfg, params["transformer"], d["lr_lat"], d["noise"], probes=probes, seed=seed + i,
                                 **kw)
            run = {k: dict(v, step_gain=np.asarray(g, np.float32)) for k, v in run.items()}
        runs.append(run)
        if progress:
            print(f"calibration image {i + 1}/{len(images)}", flush=True)
    return merge_stats(*runs)


# ----------------------------------------------------------------------------- files

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def read_images(path: str):
    """An image file or a folder of images (sorted by name) -> list of np.uint8 [H, W, 3]."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTS))
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) in folder {path!r}")
    elif os.path.exists(path):
        files = [path]
    else:
        raise FileNotFoundError(f"no image or folder at {path!r}")
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                out.append(to_rgb_uint8(im))
        except (OSError, SyntaxError) as e:         # PIL: UnidentifiedImageError, truncated data
            raise ValueError(f"cannot read image {f!r} ({type(e).__name__}: {e}): the file is corrupt or not "
                             f"an image; re-save it as PNG/JPEG or remove it from the folder") from None
    return out


def save_image(image, path: str) -> None:
    """Write a PIL image or np.uint8 [H, W, 3] array; atomic (temp file + rename); format from the extension."""
    im = image if isinstance(image, Image.Image) else Image.fromarray(to_rgb_uint8(image), "RGB")
    ext = os.path.splitext(path)[1].lower()
    if ext not in IMAGE_EXTS:
        raise ValueError(f"unknown image extension {ext!r} for {path!r}; use one of {IMAGE_EXTS}")
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp-{os.getpid()}{ext}")
    try:
        im.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
