"""Run by tests/test_parallel.py in a subprocess with 8 fake CPU devices (the XLA flag must be set before
jax initialises, so the rest of the suite keeps one device). Prints one JSON line per check:
{"check": name, "ok": bool, ...numbers}. Not collected by pytest (no test_ prefix)."""
import json
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from converters.transformer import abstract_params  # noqa: E402
from qdit4sr_jax import parallel, pipeline  # noqa: E402
from qdit4sr_jax.config import ModelConfig, VAEConfig  # noqa: E402
from qdit4sr_jax.quant.api import quantize  # noqa: E402
from qdit4sr_jax.quant.qweight import QuantizedWeight  # noqa: E402

# two-block tiny transformer (block 0 dual attention, block 1 context-pre-only) over a parameter-free x2 space-to-depth AE (12 latent channels): one 8x8 latent tile
CFG = ModelConfig.preset("tiny").replace(num_layers=2, in_channels=12, out_channels=12,
                                          vae=VAEConfig(kind="space_to_depth", s2d_factor=2))


_T0 = time.perf_counter()


def emit(name, ok, **kw):
    print(json.dumps(dict(check=name, ok=bool(ok), t=round(time.perf_counter() - _T0, 1), **kw)), flush=True)


def random_params(cfg, seed=0, scale=0.05):
    """Random float params of the model's abstract tree (no model compile; zero-initialised control
    layers get non-zero weights too, so every path is exercised)."""
    abstract = abstract_params(cfg)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda a: (rng.standard_normal(a.shape) * scale).astype(np.float32), abstract)


def main():
    assert jax.device_count() == 8, jax.devices()
    r = np.random.default_rng(0)
    prompt = {"prompt_embeds": r.standard_normal((1, 7, 24)).astype(np.float32),
              "pooled_prompt_embeds": r.standard_normal((1, 20)).astype(np.float32)}
    tp = random_params(CFG)
    bundle = {"transformer": tp, "vae": {}, "prompt": prompt}
    imgs = [r.integers(0, 256, (4, 4, 3)).astype(np.uint8) for _ in range(5)]   # 5: not a multiple of 8
    SEEDS = [10 + i for i in range(5)]
    ref = [pipeline.upscale(CFG, bundle, im, seed=10 + i, return_latents=True) for i, im in enumerate(imgs)]
    ref_img = [a for a, _ in ref]
    ref_lat = np.concatenate([np.asarray(b) for _, b in ref])
    emit("reference", True)

    def compare(name, outs, lat):
        d_img = max(int(np.abs(a.astype(np.int32) - b).max()) for a, b in zip(ref_img, outs))
        d_lat = float(np.abs(np.asarray(lat) - ref_lat).max())
        emit(name, d_img <= 1 and d_lat <= 1e-4, max_pixel_diff=d_img, max_latent_diff=d_lat)

    # 1. data parallel: batch of 5 sharded over 8 devices (padded to 8)
    mesh_dp = parallel.make_mesh(model=1)
    outs, lat = parallel.upscale_batch(CFG, bundle, imgs, mesh=mesh_dp, seeds=SEEDS, return_latents=True)
    compare("data_parallel_upscale", outs, lat)

    # 2. tensor parallel (2 x 4 mesh): float params sharded Megatron-style
    mesh_tp = parallel.make_mesh(model=4)
    sp = parallel.shard_params(tp, mesh_tp)
    q_sh = sp["transformer_blocks_0"]["attn"]["to_q"]["kernel"].sharding.spec
    o_sh = sp["transformer_blocks_0"]["ff"]["net_2"]["kernel"].sharding.spec
    shard_shape = sp["transformer_blocks_0"]["ff"]["net_0"]["proj"]["kernel"].addressable_shards[0].data.shape
    emit("float_placement", q_sh == jax.sharding.PartitionSpec(None, "model")
         and o_sh == jax.sharding.PartitionSpec("model", None) and tuple(shard_shape) == (32, 32),
         to_q=str(q_sh), net_2=str(o_sh), net_0_shard=list(shard_shape))
    outs, lat = parallel.upscale_batch(CFG, dict(bundle, transformer=sp), imgs, mesh=mesh_tp, seeds=SEEDS,
                                       return_latents=True)
    compare("tensor_parallel_upscale_float", outs, lat)

    # 3. data-parallel calibration == pipeline.calibrate_images (one device, one image at a time)
    st1 = pipeline.calibrate_images(CFG, bundle, imgs, seed=3)
    st8 = parallel.calibrate_images(CFG, bundle, imgs, mesh=mesh_dp, seed=3)
    worst = max(float(np.max(np.abs(np.asarray(st8[k][s]) - np.asarray(st1[k][s])) /
                             (np.abs(np.asarray(st1[k][s])) + 1e-6)))
                for k in st1 for s in st1[k])
    emit("data_parallel_calibration", set(st1) == set(st8) and worst <= 1e-4, layers=len(st1),
         steps=int(np.asarray(next(iter(st1.values()))["var"]).shape[0]), max_rel_diff=worst)

    # 4. quantized tree (smoothing + signed Hadamard rotation, H-SVD branches, VaTMP schedules, packed 4-bit,
    #    group-wise rows; the row-parallel net_2 rotates a d_in that is split over the model axis):
    #    tensor-parallel on a 4 x 2 mesh equals the unsharded quantized model
    from qdit4sr_jax.quant.config import QuantConfig
    # H-SVD branches + VaTMP schedules at W4 (packed, group-wise rows) with a few 8-bit layers (unpacked codes);
    # fixed per-layer bits instead of VaSMP keep the number of compilations small
    qc = QuantConfig.preset("qdit4sr-w4a4").replace(hsvd_block=(16, 16), lowrank_rank=8, w_group_size=64,
                                                    vasmp=False)
    qp = quantize(tp, qc, calib=st8, layer_w_bits={"transformer_blocks_0/attn/to_v": 8,
                                                   "transformer_blocks_1/ff/net_0/proj": 8})
    qbundle = dict(bundle, transformer=qp)
    qref = [pipeline.upscale(CFG, qbundle, im, seed=10 + i, return_latents=True) for i, im in enumerate(imgs)]
    mesh_q = parallel.make_mesh(model=2)
    sq = parallel.shard_params(qp, mesh_q)
    node = sq["transformer_blocks_0"]["ff"]["net_2"]["kernel"]
    col = sq["transformer_blocks_0"]["attn"]["to_q"]["kernel"]
    specs = {f: str(getattr(node, f).sharding.spec) for f in ("qvalue", "scale", "lr_a", "block_u")}
    cspecs = {f: str(getattr(col, f).sharding.spec) for f in ("qvalue", "scale", "lr_b", "block_u")}
    v8 = sq["transformer_blocks_0"]["attn"]["to_v"]["kernel"]
    ok = isinstance(node, QuantizedWeight) and node.layout == "gnk" and "model" in specs["qvalue"] \
        and "model" in cspecs["qvalue"] and "model" in cspecs["lr_b"] and "model" in specs["lr_a"] \
        and v8.w_bits == 8 and not v8.packed and v8.qvalue.sharding.spec == jax.sharding.PartitionSpec("model", None) \
        and node.rotate > 1 and col.rotate > 1
    emit("quantized_placement", ok, row_net_2=specs, column_to_q=cspecs, int8_to_v=str(v8.qvalue.sharding.spec),
         rotate_net_2=node.rotate, rotate_to_q=col.rotate)
    outs, lat = parallel.upscale_batch(CFG, dict(qbundle, transformer=sq), imgs, mesh=mesh_q, seeds=SEEDS,
                                       return_latents=True)
    d_img = max(int(np.abs(a.astype(np.int32) - b).max()) for (a, _), b in zip(qref, outs))
    d_lat = float(np.abs(np.asarray(lat) - np.concatenate([np.asarray(b) for _, b in qref])).max())
    emit("tensor_parallel_upscale_quantized", d_img <= 1 and d_lat <= 1e-3, max_pixel_diff=d_img,
         max_latent_diff=d_lat)

    # 5. full-size DiT4SR (abstract, no memory): per-device bytes under 8-way tensor parallelism
    full = abstract_params(ModelConfig.preset("dit4sr"))
    mesh8 = parallel.make_mesh(model=8)
    b = parallel.bytes_per_device(full, mesh8)
    emit("full_size_tp8_bytes", b["per_device"] < b["total"] / 6, **b, ratio=b["total"] / b["per_device"])


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # report and fail
        emit("worker", False, error=f"{type(e).__name__}: {e}")
        raise
    sys.exit(0)
