"""Every module imports on a fresh install, and every third-party import is declared in pyproject.toml.

Two checks, so that an undeclared dependency fails here and not on a user's machine:
1. each module of `qdit4sr_jax`, `converters` and `benchmarks` imports (in one fresh interpreter);
2. every `import X` / `from X import` anywhere in those trees and in `tests/` (function-level imports too)
   names the standard library, the project itself, or a distribution that pyproject.toml declares
   (dependencies or an optional extra). The few GPU-only imports are listed with their reason.
"""
import ast
import importlib.metadata as md
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
TREES = ("qdit4sr_jax", "converters", "benchmarks")

# imports that only run on a GPU machine, each behind a guard that reports their absence
GPU_ONLY = {
    "qwix": "benchmarks/step_latency.py compares against qwix's PTQ when it is importable (a GPU study)",
    "triton": "Pallas Triton lowering is jax's own (jax.experimental.pallas.triton); never imported directly",
    "jax_triton": "as triton",
}
# import name -> distribution name, where they differ
ALIASES = {"PIL": "pillow", "skimage": "scikit-image", "orbax": "orbax-checkpoint", "yaml": "pyyaml"}
# distributions that a declared one brings by its own requirements (jax -> jaxlib, ml_dtypes, scipy...)
IMPLIED = {"jaxlib", "_pytest", "pytest", "pkg_resources", "setuptools"}


def _modules(tree: str):
    for p in sorted((ROOT / tree).rglob("*.py")):
        rel = p.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts[-1] == "__main__":
            continue
        yield ".".join(parts)


def _declared() -> set:
    text = (ROOT / "pyproject.toml").read_text()
    deps = set()
    for block in re.findall(r"(?:dependencies|^\w+)\s*=\s*\[(.*?)\]", text, flags=re.S | re.M):
        for d in re.findall(r'"([^"]+)"', block):
            deps.add(re.split(r"[<>=!~\[ ;]", d.strip())[0].lower().replace("_", "-"))
    return deps


def test_every_module_imports():
    mods = [m for t in TREES for m in _modules(t)]
    code = ("import importlib, sys, traceback\nbad = []\n"
            f"for m in {mods!r}:\n"
            "    try:\n        importlib.import_module(m)\n"
            "    except Exception as e:\n        bad.append(f'{m}: {type(e).__name__}: {e}')\n"
            "print('\\n'.join(bad)); sys.exit(1 if bad else 0)\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"modules that fail to import:\n{r.stdout}\n{r.stderr[-2000:]}"
    assert len(mods) > 60


def _third_party_imports():
    local = set(TREES) | {"tests"} | {p.stem for p in ROOT.rglob("*.py")}
    found = {}
    for tree in TREES + ("tests",):
        for p in (ROOT / tree).rglob("*.py"):
            for node in ast.walk(ast.parse(p.read_text(), str(p))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in sys.stdlib_module_names or top in local or top.startswith("_"):
                        continue
                    found.setdefault(top, str(p.relative_to(ROOT)))
    return found


def test_third_party_imports_are_declared():
    declared = _declared()
    closure = set(declared)
    for d in declared:                       # what the declared distributions require, when installed
        try:
            reqs = md.requires(d) or []
        except md.PackageNotFoundError:
            continue
        closure |= {re.split(r"[<>=!~\[ ;(]", r)[0].lower().replace("_", "-") for r in reqs if "extra ==" not in r}
    missing = {}
    for top, where in _third_party_imports().items():
        if top in GPU_ONLY:
            continue
        dist = ALIASES.get(top, top).lower().replace("_", "-")
        if dist in declared or dist in IMPLIED or dist in closure:
            continue
        missing[top] = where
    assert not missing, (f"imports whose distribution pyproject.toml does not declare (add them to the "
                         f"dependencies or an extra): {missing}")


def test_gpu_only_imports_are_guarded():
    """A GPU-only import sits inside a function (behind a guard), never at module level."""
    for tree in TREES:
        for p in (ROOT / tree).rglob("*.py"):
            for node in ast.parse(p.read_text()).body:
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                assert not any(n.split(".")[0] in GPU_ONLY for n in names), f"{p}: module-level GPU-only import"


def test_ci_runs_the_readme_commands_in_its_own_venv():
    """.ci/run creates a fresh venv and runs README.md's test command verbatim."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    test_cmd = next(b.strip() for b in blocks if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines(), f".ci/run does not run README's test command {test_cmd!r}"
    assert "python3 -m venv" in ci and ". \"$venv/bin/activate\"" in ci
    assert any("qdit4sr-jax demo" in b for b in blocks), "README's first command (the demo job) is missing"
