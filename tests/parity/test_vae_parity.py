"""SD3 VAE parity: diffusers AutoencoderKL (tiny SD3-style config, random init, fp32) vs the Flax port."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from converters.keytable import ConversionError  # noqa: E402
from converters.vae import convert_vae, plan_vae, vae_config_from_diffusers  # noqa: E402
from qdit4sr_jax.config import VAEConfig  # noqa: E402
from qdit4sr_jax.model import vae  # noqa: E402

TINY = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            layers_per_block=1, norm_num_groups=4, scaling_factor=1.5305, shift_factor=0.0609,
            use_quant_conv=False, use_post_quant_conv=False)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():   # random norms/biases too, so every param matters
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.ndim > 1 else 0.5) + (1.0 if "norm" in name and name.endswith("weight") else 0.0))


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    tv = diffusers.AutoencoderKL(**TINY).eval()
    _randomize(tv, 0)
    cfg = vae_config_from_diffusers(dict(tv.config))
    params = jax.tree_util.tree_map(jnp.asarray, convert_vae(tv.state_dict(), cfg))
    return tv, cfg, params


def _nhwc(t):
    return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


def test_encode_decode_parity(models):
    tv, cfg, params = models
    assert cfg.latent_channels == 4 and cfg.downsample == 4
    x = torch.rand(2, 3, 24, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    xj = jnp.asarray(_nhwc(x))
    with torch.no_grad():
        dist = tv.encode(x).latent_dist
        noise = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(2))
        z_sample = dist.mean + dist.std * noise
        zs_t = (z_sample - tv.config.shift_factor) * tv.config.scaling_factor
        zm_t = (dist.mean - tv.config.shift_factor) * tv.config.scaling_factor
        dec_t = tv.decode(z_sample).sample
    mean, logvar = vae.encode_moments(cfg, params, xj)
    assert rel(mean, _nhwc(dist.mean)) <= 1e-5
    assert rel(logvar, _nhwc(dist.logvar)) <= 1e-5
    zm = vae.encode(cfg, params, xj, sample=False)
    assert rel(zm, _nhwc(zm_t)) <= 1e-5
    zs = vae.encode_jit(cfg, params, xj, noise=jnp.asarray(_nhwc(noise)))
    assert rel(zs, _nhwc(zs_t)) <= 1e-5
    dec = vae.decode_jit(cfg, params, jnp.asarray(_nhwc(zs_t)))
    assert dec.shape == (2, 24, 32, 3)
    assert rel(dec, _nhwc(dec_t)) <= 1e-5
    print("rel errors", rel(mean, _nhwc(dist.mean)), rel(zs, _nhwc(zs_t)), rel(dec, _nhwc(dec_t)))


def test_full_size_sd3_vae_maps_completely():
    """A full-size SD3 VAE built on the meta device maps through the key table with nothing left over."""
    cfg_full = dict(TINY, latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                    norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4)
    with torch.device("meta"):
        tv = diffusers.AutoencoderKL(**cfg_full)
    shapes = {k: tuple(v.shape) for k, v in tv.state_dict().items()}
    cfg = vae_config_from_diffusers(dict(tv.config))
    assert cfg == VAEConfig()   # the default VAEConfig is SD3's
    steps = plan_vae(shapes, cfg)
    assert len(steps) == len(shapes)
    n_torch = sum(int(np.prod(s)) for s in shapes.values())
    n_flax = sum(int(np.prod(l.shape)) for l in jax.tree_util.tree_leaves(
        jax.eval_shape(lambda: vae.init(cfg, jax.random.PRNGKey(0)))))
    assert n_torch == n_flax == 83_819_683


def test_bad_checkpoints_name_the_key(models):
    tv, cfg, _ = models
    sd = {k: v.numpy() for k, v in tv.state_dict().items()}
    missing = dict(sd)
    del missing["decoder.conv_out.weight"]
    with pytest.raises(ConversionError, match=r"decoder/conv_out/kernel"):
        convert_vae(missing, cfg)
    extra = dict(sd, **{"quant_conv.weight": np.zeros((8, 8, 1, 1), np.float32)})
    with pytest.raises(ConversionError, match=r"quant_conv\.weight"):
        convert_vae(extra, cfg)
    wrong = dict(sd, **{"encoder.conv_in.weight": np.zeros((8, 3, 1, 1), np.float32)})
    with pytest.raises(ConversionError, match=r"encoder\.conv_in\.weight.*\(8, 3, 1, 1\).*\(3, 3, 3, 8\)"):
        convert_vae(wrong, cfg)


def test_deprecated_attention_names(models):
    tv, cfg, params = models
    sd = {}
    for k, v in tv.state_dict().items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        sd[k] = v
    p2 = convert_vae(sd, cfg)
    np.testing.assert_array_equal(p2["decoder"]["mid_block"]["attentions_0"]["to_out_0"]["kernel"],
                                  params["decoder"]["mid_block"]["attentions_0"]["to_out_0"]["kernel"])


def test_non_sd3_config_rejected():
    with pytest.raises(ValueError, match="quant_conv"):
        vae_config_from_diffusers(dict(TINY, use_quant_conv=True))


def test_cli_writes_model_file_and_nothing_on_error(models, tmp_path, capsys):
    from converters.__main__ import main
    from qdit4sr_jax.io.modelfile import load_model
    tv, cfg, params = models
    src = tmp_path / "vae"
    tv.save_pretrained(str(src))
    out = tmp_path / "m.safetensors"
    assert main(["vae", "--src", str(src), "--out", str(out), "--config", "tiny"]) == 0
    mcfg, mp = load_model(str(out))
    assert mcfg.vae == cfg
    np.testing.assert_array_equal(mp["vae"]["decoder"]["conv_out"]["kernel"],
                                  np.asarray(params["decoder"]["conv_out"]["kernel"]))
    # a checkpoint with a missing key: error naming it, no file written
    from safetensors.torch import save_file
    sd = {k: v.contiguous() for k, v in tv.state_dict().items() if k != "encoder.conv_in.bias"}
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    from qdit4sr_jax.config import ModelConfig
    from qdit4sr_jax.io.modelfile import config_to_json
    conf = tmp_path / "model.json"
    conf.write_text(config_to_json(ModelConfig.preset("tiny").replace(vae=cfg)))
    out2 = tmp_path / "m2.safetensors"
    capsys.readouterr()
    assert main(["vae", "--src", str(bad), "--out", str(out2), "--config", str(conf)]) == 1
    err = capsys.readouterr().err
    assert "1 problem" in err and "encoder/conv_in/bias" in err
    assert not out2.exists()
