"""Validation of the FP demo model on the held-out photos: PSNR vs bicubic, sharpness, PNG grids.

    python -m qdit4sr_jax.data.gather --out data          # once: the held-out validation crops
    python benchmarks/demo_validation.py [--model demo|PATH|runs/demo] [--steps 4] [--out out/demo_validation]
    python benchmarks/demo_validation.py --set dev --sweep     # choose sampler settings (development set)

For every 256x256 validation crop (data/val, photos never used in training), the LR input is
`degrade(hr, val_seed(name))` (x4, the training degradation with a fixed seed per image). Compared:
bicubic upsampling (Pillow) and the demo model through `pipeline.upscale` (seed 0, its default
colour fix unless --color-fix is given). Reported per image and on average: PSNR (dB, RGB, all pixels,
peak 255) and sharpness = mean |gradient| of the output / that of the HR crop (1.0 = as sharp as
the ground truth). `--sweep` also tries several step counts / samplers (start, shift) on the same
crops; `--set dev` runs on the development set instead (`datasets.development_set`: other crops of the
held-out photos and the validation crops under other degradation seeds), where sampler settings are chosen
so that the validation figures do not select them. Writes `grid.png` (rows: images; columns: LR (nearest), bicubic, model, HR) and `results.json`.
`--model` may also be a training-state folder (runs/demo): its float32 params are used directly.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from qdit4sr_jax import pipeline  # noqa: E402
from qdit4sr_jax.data.datasets import development_set, texture, validation_set  # noqa: E402
from qdit4sr_jax.metrics import psnr  # noqa: E402


def load(spec: str):
    """-> (cfg, params bundle) from "demo", a model file, or a training-state folder."""
    if os.path.isdir(spec) and os.path.exists(os.path.join(spec, "state.json")):
        from qdit4sr_jax.train import config_from_dict, load_state
        params, meta = load_state(spec)
        return config_from_dict(meta["config"]).replace(dtype="float32"), {"transformer": params, "vae": {}}
    from qdit4sr_jax.io.modelfile import load_pretrained
    return load_pretrained(spec)


def ensemble_views(kind: str):
    """[(forward, inverse)] image transforms of a self-ensemble: "none" (identity), "geometric" (the 8
    rotations / flips, the x8 self-ensemble of SR papers) or "color" (the 6 channel orders x identity /
    negative: the colour augmentation the demo model was trained with)."""
    if kind == "none":
        return [(lambda a: a, lambda a: a)]
    if kind == "geometric":
        return [(lambda a, k=k, f=f: np.rot90(a, k)[:, ::-1] if f else np.rot90(a, k),
                 lambda a, k=k, f=f: np.rot90(a[:, ::-1] if f else a, -k)) for k in range(4) for f in (0, 1)]
    if kind == "color":
        import itertools
        views = []
        for perm in itertools.permutations(range(3)):
            inv = list(np.argsort(perm))
            for neg in (False, True):
                views.append((lambda a, p=list(perm), n=neg: 255 - a[..., p] if n else a[..., p],
                              lambda a, i=inv, n=neg: (255.0 - a if n else a)[..., i]))
        return views
    raise ValueError(f"ensemble must be none, geometric or color, got {kind!r}")


def ensemble_upscale(upscale, lr, kind: str = "none"):
    """Mean of upscale(view(lr)) mapped back, over `ensemble_views(kind)` -> uint8 [H, W, 3]."""
    acc = None
    views = ensemble_views(kind)
    for fwd, inv in views:
        y = inv(np.asarray(upscale(np.ascontiguousarray(fwd(lr)))).astype(np.float64))
        acc = y if acc is None else acc + y
    return np.clip(np.round(acc / len(views)), 0, 255).astype(np.uint8)


def evaluate(cfg, params, val, ensemble: str = "none", **kw):
    """-> (outputs list of uint8 images, psnrs, sharpness, seconds). ensemble: `ensemble_views` kind."""
    outs, t0 = [], time.time()
    for _, _, lr in val:
        outs.append(ensemble_upscale(lambda a: pipeline.upscale(cfg, params, a, seed=0, **kw), lr, ensemble))
    dt = time.time() - t0
    ps = [psnr(o, hr) for o, (_, hr, _) in zip(outs, val)]
    sh = [texture(o) / texture(hr) for o, (_, hr, _) in zip(outs, val)]
    return outs, ps, sh, dt


def output_name(name: str) -> str:
    """PNG file name of an image's output: "val/x_0.png" -> "x_0.png", "val/x_0.png~1" -> "x_0_seed1.png"."""
    base, _, reseed = os.path.basename(name).partition("~")
    stem = os.path.splitext(base)[0]
    return f"{stem}_seed{reseed}.png" if reseed else f"{stem}.png"


def sweep_grid(cfg):
    """[(steps, start_noise, color_fix)] that `--sweep` tries (at the model's start and start sigma): step counts
    1-4 with and without the start noise under the model's colour fix, then the colour fixes at its step count."""
    grid = [(st, noise, cfg.color_fix) for noise in (1.0, 0.5, 0.0) for st in (1, 2, 3, 4)]
    return grid + [(cfg.num_steps, cfg.start_noise, cf) for cf in ("adain", "wavelet", "none") if cf != cfg.color_fix]


def write_grid(path, val, bic, outs):
    n, s = len(val), val[0][1].shape[0]
    g = Image.new("RGB", (4 * s, n * s))
    for i, ((_, hr, lr), b, o) in enumerate(zip(val, bic, outs)):
        cols = [np.asarray(Image.fromarray(lr).resize((s, s), Image.NEAREST)), b, o, hr]
        for j, c in enumerate(cols):
            g.paste(Image.fromarray(c), (j * s, i * s))
    g.save(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--data", default="data")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    ap.add_argument("--start", default=None, help="override the model's sampler start (noise | lr)")
    ap.add_argument("--start-sigma", type=float, default=None, help="override the model's start sigma")
    ap.add_argument("--shift", type=float, default=None, help="override the model's schedule shift")
    ap.add_argument("--start-noise", type=float, default=None,
                    help="override the model's start noise scale (0: the LR start without its noise)")
    ap.add_argument("--color-fix", default=None, help="adain | wavelet | none (default: the model's)")
    ap.add_argument("--set", default="val", choices=("val", "dev"),
                    help="validation crops (the reported figures) or the development set (choosing settings)")
    ap.add_argument("--sweep", action="store_true", help="also try other step counts and samplers")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N validation crops")
    ap.add_argument("--every", type=int, default=1, help="use every k-th validation crop (quick looks)")
    ap.add_argument("--ensemble", default="none", choices=("none", "geometric", "color"),
                    help="self-ensemble: average the outputs of 8 rotated / flipped or 12 recoloured inputs")
    ap.add_argument("--out", default="out/demo_validation")
    a = ap.parse_args(argv)

    cfg, params = load(a.model)
    over = {k: v for k, v in dict(start=a.start, start_sigma=a.start_sigma, shift=a.shift, start_noise=a.start_noise,
                                  color_fix=a.color_fix).items() if v is not None}
    cfg = cfg.replace(**over)
    images = validation_set if a.set == "val" else development_set
    val = images(a.data, cfg.scale)[::a.every][:a.limit or None]
    os.makedirs(a.out, exist_ok=True)
    bic = [pipeline.bicubic(lr, cfg.scale) for _, _, lr in val]
    b_ps = [psnr(b, hr) for b, (_, hr, _) in zip(bic, val)]
    b_sh = [texture(b) / texture(hr) for b, (_, hr, _) in zip(bic, val)]
    steps = a.steps or cfg.num_steps
    outs, ps, sh, dt = evaluate(cfg, params, val, num_steps=steps, ensemble=a.ensemble)
    write_grid(os.path.join(a.out, "grid.png"), val, bic, outs)
    for (name, _, _), o in zip(val, outs):
        Image.fromarray(o).save(os.path.join(a.out, output_name(name)))

    print(f"model {a.model} ({cfg.name}): {steps} steps, start {cfg.start} (sigma {cfg.start_sigma}, noise "
          f"{cfg.start_noise}), shift {cfg.shift}, colour fix {cfg.color_fix}; self-ensemble {a.ensemble}; "
          f"{len(val)} {'validation' if a.set == 'val' else 'development'} images, x{cfg.scale}")
    print(f"{'image':<28} {'bicubic dB':>10} {'model dB':>9} {'gain':>6} {'sharp bic':>9} {'sharp model':>11}")
    for (name, _, _), bp, p, bs, s in zip(val, b_ps, ps, b_sh, sh):
        print(f"{os.path.basename(name):<28} {bp:>10.2f} {p:>9.2f} {p - bp:>+6.2f} {bs:>9.2f} {s:>11.2f}")
    gain = float(np.mean(ps) - np.mean(b_ps))
    print(f"{'mean':<28} {np.mean(b_ps):>10.2f} {np.mean(ps):>9.2f} {gain:>+6.2f} {np.mean(b_sh):>9.2f} "
          f"{np.mean(sh):>11.2f}")
    print(f"model time {dt:.1f} s for {len(val)} images ({dt / len(val):.2f} s each, CPU/GPU as run)")
    res = dict(model=a.model, config=cfg.name, set=a.set, steps=steps, start=cfg.start, start_sigma=cfg.start_sigma,
               start_noise=cfg.start_noise, shift=cfg.shift, color_fix=cfg.color_fix, ensemble=a.ensemble,
               images=[os.path.basename(n) for n, _, _ in val], bicubic_psnr=b_ps, model_psnr=ps,
               bicubic_sharpness=b_sh, model_sharpness=sh, mean_gain_db=gain, seconds=dt, sweep=[])
    if a.sweep:
        print(f"\n{'steps':>5} {'sigma0':>6} {'noise':>5} {'colour':>7} {'dB':>6} {'gain':>6} {'sharp':>6}")
        for st, noise, cf in sweep_grid(cfg):
            c2 = cfg.replace(start_noise=noise, color_fix=cf)
            _, p2, s2, _ = evaluate(c2, params, val, num_steps=st)
            g2 = float(np.mean(p2) - np.mean(b_ps))
            print(f"{st:>5} {cfg.start_sigma:>6} {noise:>5} {cf:>7} {np.mean(p2):>6.2f} {g2:>+6.2f} {np.mean(s2):>6.2f}")
            res["sweep"].append(dict(steps=st, start=cfg.start, start_sigma=cfg.start_sigma, start_noise=noise,
                                     shift=cfg.shift, color_fix=cf, psnr=float(np.mean(p2)), gain_db=g2,
                                     sharpness=float(np.mean(s2))))
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
