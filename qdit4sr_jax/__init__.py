"""qdit4sr-jax: Q-DiT4SR post-training quantization of DiT4SR in JAX/Flax."""
from qdit4sr_jax.config import ModelConfig, QuantConfig, VAEConfig  # noqa: F401

__version__ = "0.1.0"
