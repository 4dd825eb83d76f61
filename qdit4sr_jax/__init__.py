"""qdit4sr-jax: Q-DiT4SR post-training quantization of DiT4SR in JAX/Flax."""
from qdit4sr_jax.config import ModelConfig, QuantConfig, VAEConfig  # noqa: F401

__version__ = "0.1.0"

from qdit4sr_jax.quant.api import quantize  # noqa: E402,F401
from qdit4sr_jax.quant.calibrate import calibrate  # noqa: E402,F401
from qdit4sr_jax.checkpoint import load, save  # noqa: E402,F401
from qdit4sr_jax.io.modelfile import load_model, load_pretrained, save_model  # noqa: E402,F401
from qdit4sr_jax.pipeline import calibrate_images, upscale  # noqa: E402,F401
