"""Test-session settings, loaded by pytest before any test module (and so before JAX starts a backend).

XLA's CPU backend compiles with LLVM at its lowest optimisation level in the test suite: the suite is dominated by
compiles of small programs, and on the 2-core CI machine of 2026-12-07 this cut its slowest tests by 25-50 % (in
the full suite: the fidelity ordering 167 -> 122 s, the demo job 113 -> 59 s; the whole suite 1,257 -> 922 s:
docs/PERFORMANCE.md, "Test suite time"); every test passes with it. A run that sets its own XLA_FLAGS keeps them
(the flag is appended, not replacing them)."""
import os

_FLAG = "--xla_backend_optimization_level=0"
if _FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
