"""Image-quality metrics, one implementation each, shared by the demo, the fidelity study and `evaluate`.

Full-reference (`fullref.py`): PSNR, SSIM, the high band of an image and the PSNR of that band.
Inputs are uint8 RGB arrays [H, W, 3]; results are Python floats.
"""
from qdit4sr_jax.metrics.fullref import high_band, hf_psnr, psnr, ssim  # noqa: F401
