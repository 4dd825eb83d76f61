"""Image-quality metrics, one implementation each, shared by the demo, the fidelity study and `evaluate`.

Full-reference (`fullref.py`): PSNR, SSIM, the high band of an image and the PSNR of that band.
Inputs are uint8 RGB arrays [H, W, 3]; results are Python floats.

No-reference (`niqe.py`): NIQE (Mittal et al. 2013) against the shipped pristine model
(`qdit4sr_jax/assets/niqe_pristine.npz`, fitted on the training photos); lower is better.
Texture (`spectral.py`): `texture_ratio(out, ref)`, the high-band (0.25-0.5 cycles/pixel) energy of `out`
over that of `ref` (1 = same, < 1 smoother). See docs/METRICS.md.
"""
from qdit4sr_jax.metrics.fullref import high_band, hf_psnr, psnr, ssim  # noqa: F401
from qdit4sr_jax.metrics.niqe import fit_pristine, load_pristine, niqe  # noqa: F401
from qdit4sr_jax.metrics.spectral import band_energy, texture_ratio, texture_ratios  # noqa: F401
