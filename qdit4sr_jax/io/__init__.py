"""File formats: dependency-free safetensors, float model files (params + ModelConfig in one file)."""
from qdit4sr_jax.io.modelfile import load_model, load_pretrained, save_model  # noqa: F401
from qdit4sr_jax.io.safetensors import SafeTensorsError, SafeTensorsFile, load_file, save_file  # noqa: F401
