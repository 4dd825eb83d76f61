"""Scale-out (qdit4sr_jax.parallel): data-parallel upscaling / calibration and tensor-parallel placement.

The 8-device checks run in a subprocess (tests/parallel_worker.py) with
XLA_FLAGS=--xla_force_host_platform_device_count=8, because the flag must be set before jax initialises;
this process keeps one device. Here: the one-device equivalences and the error messages.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from qdit4sr_jax import parallel, pipeline
from qdit4sr_jax.config import ModelConfig, VAEConfig
from qdit4sr_jax.model import vae
from qdit4sr_jax.quant.qweight import QuantizedWeight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig.preset("tiny")        # SD3-style VAE (sampled latents: the per-image keys matter)
S2D = CFG.replace(num_layers=2, in_channels=12, out_channels=12, vae=VAEConfig(kind="space_to_depth", s2d_factor=2))
CHECKS = ("data_parallel_upscale", "float_placement", "tensor_parallel_upscale_float",
          "data_parallel_calibration", "quantized_placement", "tensor_parallel_upscale_quantized",
          "full_size_tp8_bytes")


@pytest.fixture(scope="module")
def worker_results():
    # any XLA flags the caller set kept beside the device count
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f)
    env = dict(os.environ, XLA_FLAGS=(flags + " --xla_force_host_platform_device_count=8").strip(), JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "parallel_worker.py")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    rows = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            rows[row["check"]] = row
    if proc.returncode != 0:
        pytest.fail(f"parallel worker failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("check", CHECKS)
def test_eight_fake_devices(worker_results, check):
    """Sharded result == single-device result (data parallel, tensor parallel float and quantized,
    calibration), placements as documented, full-size DiT4SR fits ~1/8 per device under TP=8."""
    assert check in worker_results, f"worker did not report {check}: {sorted(worker_results)}"
    row = worker_results[check]
    assert row["ok"], row


def _random_transformer(cfg, rng):
    from converters.transformer import abstract_params
    return jax.tree_util.tree_map(lambda a: (rng.standard_normal(a.shape) * 0.05).astype(np.float32),
                                  abstract_params(cfg))


@pytest.fixture(scope="module")
def s2d_bundle():
    """Cheap to compile: two blocks over a parameter-free space-to-depth AE."""
    rng = np.random.default_rng(4)
    prompt = {"prompt_embeds": rng.standard_normal((1, 7, 24)).astype(np.float32),
              "pooled_prompt_embeds": rng.standard_normal((1, 20)).astype(np.float32)}
    return {"transformer": _random_transformer(S2D, rng), "vae": {}, "prompt": prompt}


@pytest.fixture(scope="module")
def bundle():
    rng = np.random.default_rng(0)
    tp = _random_transformer(CFG, rng)
    prompt = {"prompt_embeds": rng.standard_normal((1, 7, 24)).astype(np.float32),
              "pooled_prompt_embeds": rng.standard_normal((1, 20)).astype(np.float32)}
    vp = jax.tree_util.tree_map(lambda a: (rng.standard_normal(a.shape) * 0.1).astype(np.float32),
                                jax.eval_shape(lambda k: vae.init(CFG.vae, k, 16), jax.random.PRNGKey(1)))
    return {"transformer": tp, "vae": vp, "prompt": prompt}


def test_batch_equals_one_image_pipeline(bundle):
    """Batched upscale (no mesh) reproduces pipeline.upscale image by image, incl. the VAE sample keys;
    PIL in -> PIL out."""
    r = np.random.default_rng(1)
    imgs = [Image.fromarray(r.integers(0, 256, (4, 4, 3)).astype(np.uint8)) for _ in range(2)]
    imgs.append(imgs[0])
    outs = parallel.upscale_batch(CFG, bundle, imgs, seeds=[7, 3, 7])
    for im, s, o in zip(imgs, [7, 3, 7], outs):
        ref = pipeline.upscale(CFG, bundle, im, seed=s)
        assert isinstance(o, Image.Image) and o.size == (16, 16)
        assert np.abs(np.asarray(o, np.int32) - np.asarray(ref)).max() <= 1
    assert np.array_equal(np.asarray(outs[0]), np.asarray(outs[2]))       # same image, same seed


def test_calibration_stats_cover_every_linear(s2d_bundle):
    r = np.random.default_rng(2)
    imgs = [r.integers(0, 256, (4, 4, 3)).astype(np.uint8) for _ in range(2)]
    st = parallel.calibrate_images(S2D, s2d_bundle, imgs, num_steps=2, batch_size=1)   # two runs, merged
    from qdit4sr_jax.quant.rules import find_linears, path_str
    linears = {path_str(p) for p in find_linears(s2d_bundle["transformer"])}
    assert linears <= set(st)
    for s in st.values():
        assert s["var"].shape == (2,) and np.all(np.isfinite(np.asarray(s["ch_absmax"])))


def test_errors_name_the_problem(bundle):
    with pytest.raises(ValueError, match="at least one image"):
        parallel.calibrate_images(CFG, bundle, [])
    with pytest.raises(ValueError, match="no images"):
        parallel.upscale_batch(CFG, bundle, [])
    with pytest.raises(ValueError, match="one size"):
        parallel.upscale_batch(CFG, bundle, [np.zeros((4, 4, 3), np.uint8), np.zeros((8, 4, 3), np.uint8)])
    with pytest.raises(ValueError, match="too small"):
        parallel.upscale_batch(CFG.replace(scale=1), bundle, [np.zeros((3, 4, 3), np.uint8)])
    with pytest.raises(ValueError, match="seeds"):
        parallel.upscale_batch(CFG, bundle, [np.zeros((4, 4, 3), np.uint8)], seeds=[1, 2])
    with pytest.raises(ValueError, match="xla_force_host_platform_device_count"):
        parallel.make_mesh(model=1, data=jax.device_count() + 1)
    with pytest.raises(ValueError, match="does not divide"):
        parallel.make_mesh(model=jax.device_count() + 1)


def test_specs_fall_back_to_replication():
    """On a 1 x 1 mesh everything is replicated; indivisible dims replicate instead of failing."""
    mesh = parallel.make_mesh(model=1)
    k = jax.ShapeDtypeStruct((30, 90), jnp.float32)
    specs = parallel.param_specs({"transformer_blocks_0": {"attn": {"to_q": {"kernel": k}}}}, mesh)
    assert specs["transformer_blocks_0"]["attn"]["to_q"]["kernel"] == jax.sharding.PartitionSpec()
    assert parallel.linear_role("transformer_blocks_3/attn2/to_out_control") == "row"
    assert parallel.linear_role("transformer_blocks_3/ff_context/net_0/proj") == "column"
    assert parallel.linear_role("pos_embed/proj") is None
    # an indivisible quantized node under a 3-way 'model' axis: spec helper replicates its codes
    node = QuantizedWeight(qvalue=jnp.zeros((10, 8), jnp.int8), scale=jnp.zeros((10, 1)), shape=(8, 10))
    specs = parallel._qweight_specs(node, "column", 3)
    assert specs["qvalue"] == jax.sharding.PartitionSpec() and specs["scale"] == jax.sharding.PartitionSpec()
    specs = parallel._qweight_specs(node, "column", 2)
    assert specs["qvalue"] == jax.sharding.PartitionSpec("model", None)


def test_upscale_folder_atomic_outputs(s2d_bundle, tmp_path, monkeypatch):
    bundle = s2d_bundle
    src, dst = tmp_path / "lr", tmp_path / "sr"
    src.mkdir()
    r = np.random.default_rng(3)
    for i, shape in enumerate([(4, 4), (4, 4), (2, 4)]):
        Image.fromarray(r.integers(0, 256, shape + (3,)).astype(np.uint8)).save(src / f"im{i}.png")
    (src / "notes.txt").write_text("not an image")
    outs = parallel.upscale_folder(S2D, bundle, str(src), str(dst), seed=5)
    assert sorted(os.listdir(dst)) == ["im0.png", "im1.png", "im2.png"]
    assert Image.open(outs[2]).size == (16, 8)
    # the 4x4 group ran as one batch, every image with seed 5
    ref = parallel.upscale_batch(S2D, bundle, [Image.open(src / "im0.png"), Image.open(src / "im1.png")], seed=5)
    for o, r_ in zip(outs[:2], ref):
        assert np.array_equal(np.asarray(Image.open(o)), np.asarray(r_))
    with pytest.raises(FileExistsError, match="overwrite"):
        parallel.upscale_folder(S2D, bundle, str(src), str(dst))
    # a failure while writing leaves neither a partial output nor a temp file
    dst2 = tmp_path / "sr2"

    def broken_save(self, fp, *a, **k):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        parallel.upscale_folder(S2D, bundle, str(src), str(dst2))
    assert not dst2.exists() or os.listdir(dst2) == []
