"""Test-session settings, loaded by pytest before any test module (and so before JAX starts a backend).

XLA's CPU backend compiles with LLVM at its lowest optimisation level in the test suite: the suite is dominated by
compiles of small programs, and on the 2-core CI machine this cut its slowest tests by 25-50 % (the fidelity
ordering 127 -> 94 s, the demo job 113 -> 55 s: docs/PERFORMANCE.md, "Test suite time"). Float results are the same
IEEE operations; a run that sets its own XLA_FLAGS keeps them (appended to, not replaced)."""
import os

_FLAG = "--xla_backend_optimization_level=0"
if _FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
