"""Notebooks: quickstart executed end to end on CPU (nbclient); the DiT4SR conversion notebook (which needs the
real weights) is checked statically: valid notebook, every code cell compiles, every project name it
imports exists, every converter command it runs is accepted by the converters' argument parser."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NB = os.path.join(ROOT, "notebooks")

nbformat = pytest.importorskip("nbformat")


def _code_cells(nb):
    return [c.source for c in nb.cells if c.cell_type == "code"]


@pytest.mark.slow
def test_quickstart_runs_on_cpu(tmp_path):
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(os.path.join(NB, "quickstart.ipynb"), as_version=4)
    out = tmp_path / "out"
    env_before = dict(os.environ)
    os.environ.update(QDIT4SR_NOTEBOOK_OUT=str(out), JAX_PLATFORMS="cpu",
                      PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                         resources={"metadata": {"path": str(tmp_path)}})
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                     if o.get("output_type") == "stream")
    assert "reloaded checkpoint reproduces the quantized output bit-exactly" in text
    assert "quantized linears" in text
    shipped = os.path.exists(os.path.join(ROOT, "qdit4sr_jax", "assets", "demo.safetensors"))
    markdown = " ".join(str(o.get("data", {}).get("text/markdown", "")) for c in nb.cells if c.cell_type == "code"
                        for o in c.get("outputs", []))
    assert ("RANDOM weights" in markdown) == (not shipped)   # the trained demo model is used when shipped
    images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                 if "image/png" in o.get("data", {}))
    assert images >= 3                                  # two allocation plots + the side-by-side figure
    made = sorted(os.listdir(out))
    assert {"weight_bits.png", "activation_schedule.png", "float_vs_w4a4.png", "qdit4sr_w4a4_demo"} <= set(made)
    assert not [f for f in made if ".tmp" in f]         # atomic writes left no temp files
    assert sorted(os.listdir(tmp_path)) == ["out"]      # nothing written outside OUT


def _project_imports(src):
    tree = ast.parse(src)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("qdit4sr_jax", "converters"):
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in ("qdit4sr_jax", "converters"):
                    yield a.name, []


@pytest.mark.parametrize("name", ["quickstart.ipynb", "convert_dit4sr.ipynb"])
def test_notebook_code_is_real(name):
    import importlib
    nb = nbformat.read(os.path.join(NB, name), as_version=4)
    nbformat.validate(nb)
    for src in _code_cells(nb):
        compile(src, name, "exec")
        for module, names in _project_imports(src):
            mod = importlib.import_module(module)
            for n in names:
                assert hasattr(mod, n) or importlib.util.find_spec(f"{module}.{n}"), f"{name}: {module}.{n} missing"


def test_conversion_commands_parse(monkeypatch):
    """Every converter command the conversion notebook runs (`converter("transformer", "--src", ...)`) is
    accepted by the real `python -m converters` parser (the work functions are replaced by recorders)."""
    import converters.__main__ as cm
    import converters.prompts
    import converters.vae

    nb = nbformat.read(os.path.join(NB, "convert_dit4sr.ipynb"), as_version=4)
    cmds = []
    for src in _code_cells(nb):
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "converter":
                cmds.append([a.value if isinstance(a, ast.Constant) else "PATH" for a in node.args])
    assert {c[0] for c in cmds} >= {"transformer", "vae", "prompts"}, cmds
    ran = []
    monkeypatch.setattr(cm, "_transformer", lambda a: ran.append(("transformer", a)))
    monkeypatch.setattr(converters.vae, "_cli", lambda a: ran.append(("vae", a)))
    monkeypatch.setattr(converters.prompts, "_cli", lambda a: ran.append(("prompts", a)))
    for c in cmds:
        assert cm.main([str(x) for x in c]) == 0, c
    assert [k for k, _ in ran] == [c[0] for c in cmds]
