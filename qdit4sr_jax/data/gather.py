"""Gather the demo model's photographs from Debian packages and scikit-image; split train / validation.

    python -m qdit4sr_jax.data.gather [--out data] [--debs DIR] [--samples qdit4sr_jax/assets/samples]

Sources (photographs only, nothing else, so that evaluation elsewhere stays clean):
  * `mate-backgrounds`: the 12 photos of `/usr/share/backgrounds/mate/nature/`;
  * `lomiri-wallpapers-20.04`: its one large photograph, `Kleiber_by_Lukas_Baubkus.jpg`;
  * scikit-image's bundled colour photos: astronaut, chelsea, coffee, rocket, motorcycle left/right.
The packages are fetched with `apt-get download` and unpacked with `dpkg -x` (never installed; needs
`apt-get update` to have run once). Licenses are read from each package's DEP-5 copyright file.

Written under `--out`:
  train/<name>.jpg|png   training photos (Debian JPEGs copied byte for byte; the 6028x3391 lomiri photo
                         downscaled 2x to JPEG q95; scikit-image photos as PNG)
  val/<name>_<k>.png     256x256 validation crops of the held-out photos (`HELD_OUT`): the 3 most textured
                         crops of a centred grid
  dev/<name>_<k>.png     the next (up to 5) crops of the same grid: a development set for choosing sampler
                         settings apart from the validation crops (no overlap with them)
  manifest.json          every file: source, package, copyright, license, size, split
`--samples DIR` also writes the bundled sample images (the first 256x256 validation crop of each of three
held-out photos).
"""
from __future__ import annotations

import argparse
import fnmatch
import io
import json
import os
import shutil
import subprocess
import tempfile
from typing import Dict, List, Optional

import numpy as np
from PIL import Image

MATE_NATURE = ["Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird", "RainDrops",
               "Storm", "TwoWings", "Wood", "YellowFlower"]

# name -> source description. `copyright_key`: the path as written in the package's copyright file.
SOURCES: Dict[str, dict] = {}
for _n in MATE_NATURE:
    SOURCES[f"mate_{_n}"] = dict(kind="deb", package="mate-backgrounds",
                                 path=f"usr/share/backgrounds/mate/nature/{_n}.jpg",
                                 copyright_key=f"nature/{_n}.jpg")
SOURCES["lomiri_Kleiber"] = dict(kind="deb", package="lomiri-wallpapers-20.04",
                                 path="usr/share/backgrounds/Kleiber_by_Lukas_Baubkus.jpg",
                                 copyright_key="20.04/Kleiber_by_Lukas_Baubkus.jpg", downscale=2)
# scikit-image photos: licenses as stated in each function's docstring (skimage.data); the motorcycle
# pair (Middlebury 2014 stereo, downsampled by scikit-image) carries the package's BSD-3-Clause.
_SK = {
    "astronaut": ("NASA (Eileen Collins), via scikit-image", "public domain (no known copyright restrictions)"),
    "chelsea": ("Stefan van der Walt, via scikit-image", "CC0"),
    "coffee": ("Rachel Michetti (Pikolo Espresso Bar), via scikit-image", "CC0"),
    "rocket": ("SpaceX (DSCOVR launch), via scikit-image", "public domain"),
    "motorcycle_left": ("Middlebury 2014 stereo (Scharstein et al.), via scikit-image", "BSD-3-Clause (scikit-image)"),
    "motorcycle_right": ("Middlebury 2014 stereo (Scharstein et al.), via scikit-image", "BSD-3-Clause (scikit-image)"),
}
for _n, (_c, _l) in _SK.items():
    SOURCES[f"skimage_{_n}"] = dict(kind="skimage", package="scikit-image", path=f"skimage.data.{_n}",
                                    copyright=_c, license=_l)

# Held out from training: validation crops and the bundled samples come from these.
HELD_OUT = ["skimage_chelsea", "skimage_rocket", "mate_LadyBird", "mate_Dune"]
SAMPLE_FROM = ["skimage_chelsea", "skimage_rocket", "mate_LadyBird"]
VAL_CROP = 256
VAL_MAX_SIDE = 1024          # held-out photos are downscaled (Lanczos) to at most this long side first
VAL_CROPS_PER_PHOTO = 3
DEV_CROPS_PER_PHOTO = 5      # dev/: the grid crops after the validation ones (Dune, LadyBird; chelsea and rocket
                             # have no more than their validation crops)
SAMPLE_SIZE = 256            # bundled samples: the first validation crop whole (the demo model's training size:
                             # it degrades on smaller token grids, e.g. 2-3 dB lower PSNR at 192x192)


def parse_dep5(text: str) -> List[dict]:
    """Parse a machine-readable (DEP-5) copyright file into stanzas {files: [...], copyright, license}."""
    stanzas, cur, key = [], {}, None
    for line in text.splitlines() + [""]:
        if not line.strip():
            if cur:
                stanzas.append(cur)
            cur, key = {}, None
            continue
        if line[0] in " \t" and key:
            cur[key] += "\n" + line.strip()
            continue
        if ":" in line:
            key, val = line.split(":", 1)
            key = key.strip().lower()
            cur[key] = val.strip()
    out = []
    for s in stanzas:
        if "files" in s:
            out.append(dict(files=s["files"].split(), copyright=s.get("copyright", ""),
                            license=s.get("license", "").split("\n")[0].strip()))
    return out


def license_for(stanzas: List[dict], path: str) -> dict:
    """The stanza governing `path` (DEP-5: the last matching Files pattern wins)."""
    found = None
    for s in stanzas:
        if any(fnmatch.fnmatchcase(path, pat) for pat in s["files"]):
            found = s
    if found is None:
        raise KeyError(f"no Files stanza of the copyright file covers {path!r}")
    return found


def fetch_debs(workdir: str, packages: List[str]) -> str:
    """`apt-get download` the packages into `workdir` and `dpkg -x` them into `workdir/root`."""
    root = os.path.join(workdir, "root")
    os.makedirs(root, exist_ok=True)
    for pkg in packages:
        if not any(f.startswith(pkg + "_") and f.endswith(".deb") for f in os.listdir(workdir)):
            r = subprocess.run(["apt-get", "download", pkg], cwd=workdir, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"apt-get download {pkg} failed (run `apt-get update` first?):\n{r.stderr}")
    for f in sorted(os.listdir(workdir)):
        if f.endswith(".deb"):
            subprocess.run(["dpkg", "-x", os.path.join(workdir, f), root], check=True)
    return root


def _skimage_photo(name: str) -> np.ndarray:
    import skimage.data as skd
    if name.startswith("motorcycle_"):
        left, right, _ = skd.stereo_motorcycle()
        return left if name.endswith("left") else right
    return getattr(skd, name)()


def _grad_energy(a: np.ndarray) -> float:
    g = a.astype(np.float32).mean(-1)
    return float(np.abs(np.diff(g, axis=0)).mean() + np.abs(np.diff(g, axis=1)).mean())


def val_crops(img: np.ndarray, size: int = VAL_CROP, k: Optional[int] = VAL_CROPS_PER_PHOTO) -> List[np.ndarray]:
    """Up to `k` (None: all) non-overlapping `size` crops of a centred grid, most textured (mean |gradient|)
    first."""
    H, W = img.shape[:2]
    ny, nx = H // size, W // size
    if ny == 0 or nx == 0:
        raise ValueError(f"photo {img.shape} is smaller than a {size}x{size} crop")
    y0, x0 = (H - ny * size) // 2, (W - nx * size) // 2
    crops = [img[y0 + i * size:y0 + (i + 1) * size, x0 + j * size:x0 + (j + 1) * size]
             for i in range(ny) for j in range(nx)]
    crops.sort(key=_grad_energy, reverse=True)
    return crops if k is None else crops[:k]


def _load_source(name: str, src: dict, root: Optional[str]) -> tuple:
    """-> (uint8 image [H,W,3], original bytes or None, meta)."""
    if src["kind"] == "skimage":
        return _skimage_photo(src["path"].rsplit(".", 1)[1]), None, dict(copyright=src["copyright"],
                                                                        license=src["license"])
    p = os.path.join(root, src["path"])
    with open(p, "rb") as f:
        raw = f.read()
    cp = os.path.join(root, "usr/share/doc", src["package"], "copyright")
    with open(cp, encoding="utf-8", errors="replace") as f:
        st = license_for(parse_dep5(f.read()), src["copyright_key"])
    img = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
    # (one line of mate-backgrounds' copyright file ends in a stray acute accent; it is dropped)
    holders = " / ".join(c.strip().rstrip("\u00b4").strip() for c in st["copyright"].split("\n"))
    return img, raw, dict(copyright=holders, license=st["license"])


def gather(out: str, debs: Optional[str] = None, samples: Optional[str] = None) -> dict:
    """Write train/, val/ and manifest.json under `out` (see module doc); returns the manifest."""
    tmp = None
    if debs is None:
        tmp = tempfile.mkdtemp(prefix="qdit4sr_debs_")
        debs = tmp
    os.makedirs(debs, exist_ok=True)
    try:
        root = fetch_debs(debs, sorted({s["package"] for s in SOURCES.values() if s["kind"] == "deb"}))
        versions = {f.split("_")[0]: f.split("_")[1] for f in os.listdir(debs) if f.endswith(".deb")}
        import skimage
        versions["scikit-image"] = skimage.__version__
        for sub in ("train", "val", "dev"):
            shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
            os.makedirs(os.path.join(out, sub))
        if samples:
            os.makedirs(samples, exist_ok=True)
        manifest = {"files": [], "held_out": HELD_OUT, "val_crop": VAL_CROP, "val_max_side": VAL_MAX_SIDE}
        for name, src in SOURCES.items():
            img, raw, meta = _load_source(name, src, root)
            entry = dict(name=name, package=src["package"], version=versions.get(src["package"], ""),
                         source=src["path"], original_size=list(img.shape[1::-1]), **meta)
            if name in HELD_OUT:
                pil = Image.fromarray(img)
                s = min(1.0, VAL_MAX_SIDE / max(pil.size))
                if s < 1.0:
                    pil = pil.resize((round(pil.width * s), round(pil.height * s)), Image.LANCZOS)
                for k, c in enumerate(val_crops(np.asarray(pil), k=VAL_CROPS_PER_PHOTO + DEV_CROPS_PER_PHOTO)):
                    split = "val" if k < VAL_CROPS_PER_PHOTO else "dev"
                    fn = f"{split}/{name}_{k}.png"
                    Image.fromarray(c).save(os.path.join(out, fn))
                    manifest["files"].append(dict(entry, file=fn, split=split, size=[VAL_CROP, VAL_CROP]))
                    if samples and k == 0 and name in SAMPLE_FROM:
                        o = (VAL_CROP - SAMPLE_SIZE) // 2
                        Image.fromarray(c[o:o + SAMPLE_SIZE, o:o + SAMPLE_SIZE]).save(
                            os.path.join(samples, f"{name.split('_', 1)[1].lower()}.png"))
                continue
            if raw is not None and src.get("downscale", 1) == 1:
                fn = f"train/{name}.jpg"
                with open(os.path.join(out, fn), "wb") as f:
                    f.write(raw)
                size = img.shape[1::-1]
            elif raw is not None:
                d = src["downscale"]
                pil = Image.fromarray(img)
                pil = pil.resize((pil.width // d, pil.height // d), Image.LANCZOS)
                fn = f"train/{name}.jpg"
                pil.save(os.path.join(out, fn), quality=95)
                size = pil.size
            else:
                fn = f"train/{name}.png"
                Image.fromarray(img).save(os.path.join(out, fn), optimize=True)
                size = img.shape[1::-1]
            manifest["files"].append(dict(entry, file=fn, split="train", size=list(size)))
        with open(os.path.join(out, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
        return manifest
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="data", help="output folder (git-ignored data/)")
    ap.add_argument("--debs", default=None, help="folder for the downloaded .deb files (kept); default: a temp dir")
    ap.add_argument("--samples", default=None, help="also write the bundled sample images here")
    a = ap.parse_args(argv)
    m = gather(a.out, a.debs, a.samples)
    n_tr = sum(f["split"] == "train" for f in m["files"])
    n_va = sum(f["split"] == "val" for f in m["files"])
    n_dev = sum(f["split"] == "dev" for f in m["files"])
    mb = sum(os.path.getsize(os.path.join(a.out, f["file"])) for f in m["files"]) / 2**20
    print(f"wrote {n_tr} training photos, {n_va} validation crops and {n_dev} development crops to {a.out}/ "
          f"({mb:.1f} MiB)")


if __name__ == "__main__":
    main()
