"""Prompt-embedding .npz: round trip, reader validation, bundling into a model file, pipeline use."""
import numpy as np
import pytest

from qdit4sr_jax import pipeline
from qdit4sr_jax.config import ModelConfig

CFG = ModelConfig.preset("tiny")


def _emb(B=2, L=7, D=24, P=20, neg=True, seed=0):
    r = np.random.default_rng(seed)
    d = {"prompt_embeds": r.standard_normal((B, L, D)).astype(np.float32),
         "pooled_prompt_embeds": r.standard_normal((B, P)).astype(np.float32),
         "prompt": np.asarray([f"caption {i}" for i in range(B)])}
    if neg:
        d["negative_prompt_embeds"] = r.standard_normal((1, L, D)).astype(np.float32)
        d["negative_pooled_prompt_embeds"] = r.standard_normal((1, P)).astype(np.float32)
    return d


def test_npz_round_trip(tmp_path):
    d = _emb()
    path = str(tmp_path / "p.npz")
    pipeline.save_prompts(path, d)
    back = pipeline.load_prompts(path, CFG)
    for k in pipeline.PROMPT_KEYS:
        np.testing.assert_array_equal(back[k], d[k])
    assert list(back["prompt"]) == ["caption 0", "caption 1"]
    ctx, pool, nctx, npool = pipeline._resolve_prompt(CFG, {}, path, 1)
    np.testing.assert_array_equal(np.asarray(ctx)[0], d["prompt_embeds"][1])
    assert ctx.shape == (1, 7, 24) and pool.shape == (1, 20) and nctx.shape == (1, 7, 24)
    assert list(tmp_path.iterdir()) == [tmp_path / "p.npz"]        # no temp file left behind


def test_sd3_shapes_documented():
    from converters.prompts import SD3_EMPTY_PROMPT_SHAPES
    full = ModelConfig()
    assert SD3_EMPTY_PROMPT_SHAPES["prompt_embeds"] == (1, 77 + 256, full.joint_attention_dim)
    assert SD3_EMPTY_PROMPT_SHAPES["pooled_prompt_embeds"] == (1, full.pooled_projection_dim)
    e = {k: np.zeros(s, np.float32) for k, s in SD3_EMPTY_PROMPT_SHAPES.items()}
    pipeline.validate_prompts(e, full)


@pytest.mark.parametrize("mutate, msg", [
    (lambda d: d.pop("pooled_prompt_embeds"), "need 'prompt_embeds'"),
    (lambda d: d.__setitem__("prompt_embeds", d["prompt_embeds"][0]), r"\[B, L, D\]"),
    (lambda d: d.__setitem__("pooled_prompt_embeds", d["pooled_prompt_embeds"][:1]), "batch"),
    (lambda d: d.pop("negative_pooled_prompt_embeds"), "both negative"),
    (lambda d: d.__setitem__("negative_prompt_embeds", np.zeros((1, 5, 24), np.float32)), "does not match"),
    (lambda d: d["prompt_embeds"].__setitem__((0, 0, 0), np.nan), "NaN"),
    (lambda d: d.__setitem__("prompt_embeds", np.zeros((2, 7, 24), np.int32)), "floating point"),
    (lambda d: d.__setitem__("extra", np.zeros(3)), "unknown keys"),
])
def test_validation_errors(mutate, msg):
    d = _emb()
    mutate(d)
    with pytest.raises(ValueError, match=msg):
        pipeline.validate_prompts(d, CFG)


def test_model_width_mismatch_and_bad_files(tmp_path):
    with pytest.raises(ValueError, match="joint_attention_dim 24"):
        pipeline.validate_prompts(_emb(D=16), CFG)
    with pytest.raises(ValueError, match="pooled_projection_dim 20"):
        pipeline.validate_prompts(_emb(P=8), CFG)
    other = tmp_path / "other.npz"
    np.savez(other, prompt_embeds=np.zeros((1, 7, 24), np.float32))
    with pytest.raises(ValueError, match="not a prompt-embeddings file"):
        pipeline.load_prompts(str(other))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pipeline.load_prompts(str(tmp_path / "missing.npz"))


def test_bundle_into_model_file(tmp_path):
    from converters.prompts import bundle_into_model
    from qdit4sr_jax.io.modelfile import load_model, save_model
    path = str(tmp_path / "m.safetensors")
    save_model(path, CFG, {"transformer": {"proj_out": {"bias": np.zeros(4, np.float32)}}})
    d = _emb()
    bundle_into_model(path, d, index=1)
    cfg, params = load_model(path)
    assert cfg == CFG
    np.testing.assert_array_equal(params["prompt"]["prompt_embeds"], d["prompt_embeds"][1:2])
    np.testing.assert_array_equal(params["prompt"]["negative_pooled_prompt_embeds"], d["negative_pooled_prompt_embeds"])
    np.testing.assert_array_equal(params["transformer"]["proj_out"]["bias"], np.zeros(4))
    with pytest.raises(ValueError, match="joint_attention_dim"):
        bundle_into_model(path, _emb(D=8))
