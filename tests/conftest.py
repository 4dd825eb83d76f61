"""Session-wide test settings.

One persistent JAX compilation cache per test run: the tests compile many of the same programs (the demo model's
sampler in the CLI, notebook, pipeline and fidelity tests; the tiny configs' steps), each in its own `jax.jit`
wrapper, and JAX's in-memory cache is per wrapper and per process (2 xdist workers and the notebook's kernel). A
fresh folder per run, removed at its end, so no run reads another's programs. (Processes write entries without a
lock; one that reads an entry still being written gets JAX's "Error reading persistent compilation cache entry"
warning and compiles the program itself.) A cache set by the caller
(JAX_COMPILATION_CACHE_DIR) is used as it is and kept.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile

_OWN = "_qdit4sr_cache_dir"


def pytest_configure(config):
    if hasattr(config, "workerinput") or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return                            # an xdist worker inherits the controller's folder through its environment
    path = tempfile.mkdtemp(prefix="qdit4sr-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    setattr(config, _OWN, path)
    if "jax" in sys.modules:              # imported before this hook (a plugin): set it there too
        sys.modules["jax"].config.update("jax_compilation_cache_dir", path)


def pytest_unconfigure(config):
    path = getattr(config, _OWN, None)
    if path:
        shutil.rmtree(path, ignore_errors=True)
