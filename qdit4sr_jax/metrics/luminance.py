"""Luminance of an RGB image, the input of NIQE and the spectral texture measure."""
from __future__ import annotations

import numpy as np

RGB2GRAY = np.array([0.298936021293775, 0.587043074451121, 0.114020904255103])


def to_luminance(img, name: str = "niqe") -> np.ndarray:
    """uint8 (or float on 0..255) [H, W, 3] RGB or [H, W] gray -> float64 [H, W] luminance (checked)."""
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] != 3):
        raise ValueError(f"{name}: expected an [H, W, 3] RGB or [H, W] gray image, got shape {a.shape}")
    if a.dtype == np.uint8:
        x = a.astype(np.float64)
    elif np.issubdtype(a.dtype, np.floating):
        x = a.astype(np.float64)
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{name}: image has NaN or inf values")
        if x.size and (x.min() < 0 or x.max() > 255):
            raise ValueError(f"{name}: float image values must lie in [0, 255], got [{x.min():.3g}, {x.max():.3g}]")
        if x.size and 0 < x.max() <= 1.0:
            raise ValueError(f"{name}: float image looks like it is on a 0..1 scale (max {x.max():.3g}); "
                             f"pass uint8 or values on 0..255")
    else:
        raise ValueError(f"{name}: expected a uint8 (or float 0..255) image, got dtype {a.dtype}")
    return x @ RGB2GRAY if x.ndim == 3 else x
