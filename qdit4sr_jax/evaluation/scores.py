"""Per-image scores of an SR output, one implementation each (`qdit4sr_jax.metrics`), with the conventions named.

- `image_metrics(out, hr, fp)`: the fidelity study's four figures {psnr_hr, ssim_hr, psnr_fp, hf_fp}
  (RGB, no border crop).
- `Scorer(y_channel, border)`: evaluate's per-image figures: PSNR / SSIM vs HR under the chosen convention
  (RGB or the BT.601 Y channel of SR papers, `border` px cropped from every side), PSNR and HF-PSNR vs the FP
  output (RGB, whole image: the quantization error alone), NIQE (no reference), the spectral texture ratio
  vs HR and vs FP (1 = same high-band energy), and learned metrics when a package computing them is
  installed with its weights on disk (`learned_metrics`). NaN where a figure does not apply.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from qdit4sr_jax.metrics import hf_psnr, psnr, ssim

INF = float("inf")
NAN = float("nan")


def image_metrics(out: np.ndarray, hr: np.ndarray, fp: Optional[np.ndarray]) -> Dict[str, float]:
    """{psnr_hr, ssim_hr, psnr_fp, hf_fp} of one uint8 [H, W, 3] output (fp=None: the FP output itself -> inf)."""
    return dict(psnr_hr=psnr(out, hr), ssim_hr=ssim(out, hr),
                psnr_fp=INF if fp is None else psnr(out, fp),
                hf_fp=INF if fp is None else hf_psnr(out, fp))


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> float64 Y [H, W] in [16, 235] (ITU-R BT.601, MATLAB's rgb2ycbcr, as SR papers
    and BasicSR compute PSNR / SSIM on the Y channel; not rounded)."""
    x = img.astype(np.float64) / 255.0
    return 16.0 + x @ np.array([65.481, 128.553, 24.966])


def optional_metric(name: str) -> Optional[Callable]:
    """qdit4sr_jax.metrics.<name> when this version has it, else None (imported lazily)."""
    import qdit4sr_jax.metrics as M
    fn = getattr(M, name, None)
    if fn is None:
        try:
            import importlib
            fn = getattr(importlib.import_module(f"qdit4sr_jax.metrics.{name}"), name, None)
        except ImportError:
            fn = None
    return fn


def _optional_package(name: str):
    """The module `name` when installed, else None. Learned-metric packages are optional plugins, never
    dependencies (pyproject.toml declares none of them): they are looked up by name, not imported statically."""
    import importlib
    import importlib.util
    if importlib.util.find_spec(name) is None:
        return None
    try:
        return importlib.import_module(name)
    except Exception:  # noqa: BLE001  (a broken optional install counts as absent)
        return None


def _lpips_fn() -> Tuple[Optional[Callable], str]:
    lpips = _optional_package("lpips")
    torch = _optional_package("torch") if lpips is not None else None
    if lpips is None or torch is None:
        return None, "LPIPS: skipped (the `lpips` package is not installed)"
    hub = os.path.join(torch.hub.get_dir(), "checkpoints")
    if not (os.path.isdir(hub) and any(f.startswith("alexnet") for f in os.listdir(hub))):
        return None, (f"LPIPS: skipped (`lpips` is installed but the AlexNet weights are not in {hub}; nothing is "
                      f"downloaded)")
    try:
        net = lpips.LPIPS(net="alex", verbose=False)
    except Exception as e:  # noqa: BLE001  (any failure of an optional package: skip with its reason)
        return None, f"LPIPS: skipped ({type(e).__name__}: {e})"

    def fn(out, ref):
        t = lambda a: torch.from_numpy(a.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]  # noqa: E731
        with torch.no_grad():
            return float(net(t(out), t(ref)).item())
    return fn, "LPIPS (AlexNet, `lpips` package, weights found on disk): vs HR, lower is better"


def learned_metrics() -> Tuple[Dict[str, Callable], List[str]]:
    """({name: fn(out, hr) -> float}, notes): learned metrics usable offline. None is a dependency: each one is
    used only when its package is importable and its weights are already on disk, otherwise a note says
    why it was skipped. LPIPS (full reference, `lpips`); MUSIQ / MANIQA / CLIPIQA (`pyiqa`) are noted only."""
    fns, notes = {}, []
    fn, note = _lpips_fn()
    if fn is not None:
        fns["lpips"] = fn
    notes.append(note)
    if _optional_package("pyiqa") is not None:
        notes.append("MUSIQ / MANIQA / CLIPIQA: skipped (`pyiqa` is installed, but it downloads weights on first use; "
                     "evaluate downloads nothing)")
    else:
        notes.append("MUSIQ / MANIQA / CLIPIQA: skipped (the `pyiqa` package is not installed)")
    return fns, notes


class Scorer:
    """Per-image figures of outputs (uint8 [H, W, 3]) against HR (or None) and the FP output (or None)."""

    def __init__(self, y_channel: bool = False, border: int = 0, learned: bool = True,
                 niqe_patch: Optional[int] = None):
        """niqe_patch: NIQE's patch size (None: the metric's default; NIQE figures compare only at one size)."""
        if border < 0:
            raise ValueError(f"--border must be >= 0, got {border}")
        self.y_channel, self.border = bool(y_channel), int(border)
        self.niqe_patch = niqe_patch
        self.niqe = optional_metric("niqe")
        self.texture = optional_metric("texture_ratio")
        self.learned, self.notes = learned_metrics() if learned else ({}, [])
        if self.niqe is not None and niqe_patch is not None:
            load = optional_metric("load_pristine")
            if load is not None:
                try:
                    load(int(niqe_patch))              # the shipped pristine model for that patch size
                except ValueError as e:
                    raise ValueError(f"--niqe-patch {niqe_patch}: {e}") from None
        if self.niqe is None:
            self.notes.append("NIQE: skipped (qdit4sr_jax.metrics.niqe is not in this version)")
        if self.texture is None:
            self.notes.append("texture ratio: skipped (qdit4sr_jax.metrics.texture_ratio is not in this version)")
        self.errors: List[str] = []

    def keys(self, has_hr: bool) -> List[str]:
        """The figure names this scorer produces, in table order."""
        k = (["psnr_hr", "ssim_hr"] if has_hr else []) + ["psnr_fp", "hf_fp"]
        if self.niqe is not None:
            k.append("niqe")
        if self.texture is not None:
            k += (["texture_hr"] if has_hr else []) + ["texture_fp"]
        if has_hr:
            k += sorted(self.learned)
        return k

    def convention(self, has_hr: bool = True) -> str:
        """One line naming the PSNR / SSIM convention."""
        if not has_hr:
            return ("no HR: PSNR / SSIM vs HR not computed; PSNR / HF-PSNR vs FP on RGB, whole image (same seed: "
                    "the quantization error alone)")
        ch = "the Y channel (BT.601)" if self.y_channel else "RGB"
        bd = f"{self.border} px cropped from every side" if self.border else "no border crop"
        return (f"PSNR / SSIM vs HR on {ch}, {bd} (peak 255; SSIM: 7x7 window, scikit-image's conventions); "
                "PSNR / HF-PSNR vs FP on RGB, whole image (same seed: the quantization error alone)")

    def _ref_view(self, a: np.ndarray) -> np.ndarray:
        b = self.border
        if b:
            if min(a.shape[:2]) <= 2 * b + 6:
                raise ValueError(f"--border {b} leaves too little of a {a.shape[1]}x{a.shape[0]} image to score")
            a = a[b:-b, b:-b]
        return rgb_to_y(a) if self.y_channel else a

    def _safe(self, key: str, fn, *args) -> float:
        try:
            return float(fn(*args))
        except ValueError as e:                      # e.g. NIQE on an image below its patch size
            msg = str(e) if str(e).startswith(key) else f"{key}: {e}"
            msg += " (NaN in the table)"
            if msg not in self.errors:
                self.errors.append(msg)
            return NAN

    def score(self, out: np.ndarray, hr: Optional[np.ndarray], fp: Optional[np.ndarray], *,
              is_fp: bool = False) -> Dict[str, float]:
        """{figure: float} of one output; is_fp: `out` is the FP output itself (vs-FP figures inf / 1)."""
        r: Dict[str, float] = {}
        if hr is not None:
            o, h = self._ref_view(out), self._ref_view(hr)
            r["psnr_hr"], r["ssim_hr"] = psnr(o, h), ssim(o, h)
        if is_fp:
            r["psnr_fp"] = r["hf_fp"] = INF
        elif fp is not None:
            r["psnr_fp"], r["hf_fp"] = psnr(out, fp), hf_psnr(out, fp)
        else:
            r["psnr_fp"] = r["hf_fp"] = NAN
        if self.niqe is not None:
            r["niqe"] = self._safe("niqe", self.niqe, out, self.niqe_patch)
        if self.texture is not None:
            if hr is not None:
                r["texture_hr"] = self._safe("texture_ratio", self.texture, out, hr)
            r["texture_fp"] = 1.0 if is_fp else (self._safe("texture_ratio", self.texture, out, fp)
                                                 if fp is not None else NAN)
        if hr is not None:
            for k, fn in self.learned.items():
                r[k] = self._safe(k, fn, out, hr)
        return r
