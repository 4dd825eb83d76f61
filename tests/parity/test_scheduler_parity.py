"""Flow-matching schedule and Euler loop vs diffusers' FlowMatchEulerDiscreteScheduler (shift 3.0)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax.numpy as jnp  # noqa: E402

from qdit4sr_jax import sampling  # noqa: E402
from qdit4sr_jax.config import ModelConfig  # noqa: E402


@pytest.mark.parametrize("shift", [3.0, 1.0, 6.0])
@pytest.mark.parametrize("steps", [1, 2, 4, 20, 28, 40, 50])
def test_sigmas_and_timesteps_match_diffusers(steps, shift):
    s = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    s.set_timesteps(steps)
    sig, ts = sampling.flow_schedule(steps, shift)
    assert sig.dtype == np.float32 and ts.dtype == np.float32
    assert sig.shape == (steps + 1,) and ts.shape == (steps,)
    np.testing.assert_allclose(sig, s.sigmas.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(ts, s.timesteps.numpy(), rtol=0, atol=1e-6)   # (bit-exact in practice)


def test_euler_loop_matches_diffusers_step():
    """Same analytic velocity field through diffusers' scheduler.step loop and our jitted scan."""
    steps, B, h, w, C = 6, 2, 4, 6, 3
    rng = np.random.default_rng(0)
    a = rng.standard_normal((C,)).astype(np.float32) * 0.3
    noise = rng.standard_normal((B, h, w, C)).astype(np.float32)
    lr = rng.standard_normal((B, h, w, C)).astype(np.float32)

    def model_fn(params, x, lr_, t, ctx, pooled, step, collect):
        return jnp.tanh(x * params["a"]) - lr_ + 0.001 * t[:, None, None, None], {}

    s = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    s.set_timesteps(steps)
    x = torch.from_numpy(noise)
    for t in s.timesteps:
        v = torch.tanh(x * torch.from_numpy(a)) - torch.from_numpy(lr) + 0.001 * t
        x = s.step(v, t, x, return_dict=False)[0]
    cfg = ModelConfig.preset("tiny").replace(shift=3.0)
    out = sampling.sample(cfg, {"a": jnp.asarray(a)}, lr, noise, num_steps=steps, guidance_scale=1.0,
                          start="noise", tile_latent=0, model_fn=model_fn)
    np.testing.assert_allclose(np.asarray(out), x.numpy(), rtol=1e-5, atol=1e-5)
