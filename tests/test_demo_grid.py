"""The demo's PNG grid names its columns and gives each tile's PSNR vs HR (tiny synthetic tiles, no model)."""
import numpy as np
import pytest
from PIL import Image

from qdit4sr_jax import demo
from qdit4sr_jax.metrics import psnr

TILE = 48


def _inputs(n_samples=2, methods=("fp", "rtn-w4a4", "qdit4sr-w4a4")):
    rng = np.random.default_rng(0)
    samples = [(f"s{i}", rng.integers(0, 256, (TILE, TILE, 3), dtype=np.uint8)) for i in range(n_samples)]
    noisy = lambda hr, s: np.clip(hr.astype(int) + rng.integers(-s, s + 1, hr.shape), 0, 255).astype(np.uint8)  # noqa: E731
    bic = [noisy(hr, 40) for _, hr in samples]
    outputs = {m: [noisy(hr, 10 + 10 * k) for _, hr in samples] for k, m in enumerate(methods)}
    return samples, bic, outputs


def _has_ink(strip):
    """True where a [h, w, 3] strip holds dark (text) pixels on its white background."""
    return bool((strip.min(axis=-1) < 128).any())


def test_grid_has_header_and_captions(tmp_path):
    samples, bic, outputs = _inputs()
    path = tmp_path / "grid.png"
    demo.write_grid(str(path), samples, bic, outputs)
    g = np.asarray(Image.open(path).convert("RGB"))
    n_cols = len(outputs) + 2
    assert g.shape == (demo.HEADER_PX + len(samples) * (TILE + demo.CAPTION_PX), n_cols * TILE, 3)
    header = g[:demo.HEADER_PX]
    # every column has its own label in the header strip, and every tile a caption under it
    for j in range(n_cols):
        assert _has_ink(header[:, j * TILE:(j + 1) * TILE]), f"column {j} has no header text"
        for i in range(len(samples)):
            y = demo.HEADER_PX + i * (TILE + demo.CAPTION_PX) + TILE
            assert _has_ink(g[y:y + demo.CAPTION_PX, j * TILE:(j + 1) * TILE]), f"tile ({i}, {j}) has no caption"
    # the tiles themselves are pasted unchanged below the header
    y0 = demo.HEADER_PX
    np.testing.assert_array_equal(g[y0:y0 + TILE, :TILE], bic[0])
    np.testing.assert_array_equal(g[y0:y0 + TILE, -TILE:], samples[0][1])
    np.testing.assert_array_equal(g[y0:y0 + TILE, TILE:2 * TILE], outputs["fp"][0])


def test_grid_captions_are_the_tiles_psnr(monkeypatch):
    samples, bic, outputs = _inputs(n_samples=1)
    written = []
    real = demo._draw_centered
    monkeypatch.setattr(demo, "_draw_centered", lambda d, text, *a: (written.append(text), real(d, text, *a)))
    demo.grid_image(samples, bic, outputs)
    hr = samples[0][1]
    assert written[:5] == ["bicubic", "FP", "rtn-w4a4", "qdit4sr-w4a4", "HR"]
    want = [f"{psnr(t, hr):.2f} dB" for t in [bic[0]] + [outputs[m][0] for m in outputs]] + ["reference"]
    assert written[5:] == want


def test_grid_rejects_a_short_column():
    samples, bic, outputs = _inputs()
    outputs["rtn-w4a4"] = outputs["rtn-w4a4"][:1]
    with pytest.raises(ValueError, match="rtn-w4a4"):
        demo.grid_image(samples, bic, outputs)
