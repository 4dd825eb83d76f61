"""Opt-in wall-clock phase timing of `quantize` (diagnostics for benchmarks/quantize_time.py).

`Phases(out)` with `out` a dict records, for each named phase, the wall seconds since the previous
`lap` (accumulated over repeated laps of the same name) and the XLA compile seconds that JAX reported
inside it (backend-compile events); `lap(name, *trees)` first waits for the arrays of `trees`
(block_until_ready), so device work is charged to the phase that dispatched it. With `out=None`
every method returns at once: no synchronisation, no listener, no clock reads (zero cost).

Result layout (filled in place, seconds, float): out["phases"] = {name: wall s}, out["compile_s"] =
{name: XLA compile s} (phases that compiled), out["compiles"] = {name: programs compiled},
out["total_s"] = wall s from construction to `close()`.
"""
from __future__ import annotations

import time
from typing import Optional

import jax

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class Phases:
    """Phase laps into `out` (a dict, filled in place), or nothing when `out` is None."""

    def __init__(self, out: Optional[dict]):
        if out is not None and not isinstance(out, dict):
            raise TypeError(f"timings must be a dict (filled in place) or None, got {type(out).__name__}")
        self.on = out is not None
        self.out = out
        if not self.on:
            return
        out.setdefault("phases", {})
        out.setdefault("compile_s", {})
        out.setdefault("compiles", {})
        self._pending = [0.0, 0]
        self._t0 = self._t = time.perf_counter()
        self._closed = False
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event, duration, **kw):
        if event == _COMPILE_EVENT:
            self._pending[0] += float(duration)
            self._pending[1] += 1

    def lap(self, name: str, *trees) -> None:
        """Charge the time since the previous lap (after waiting for `trees`' arrays) to `name`."""
        if not self.on:
            return
        if trees:
            jax.block_until_ready(trees)
        now = time.perf_counter()
        ph = self.out["phases"]
        ph[name] = ph.get(name, 0.0) + (now - self._t)
        self._t = now
        if self._pending[1]:
            cs, cn = self.out["compile_s"], self.out["compiles"]
            cs[name] = cs.get(name, 0.0) + self._pending[0]
            cn[name] = cn.get(name, 0) + self._pending[1]
            self._pending = [0.0, 0]

    def close(self) -> None:
        """Stop listening; out["total_s"] = wall seconds since construction. Idempotent."""
        if not self.on or self._closed:
            return
        self._closed = True
        self.out["total_s"] = self.out.get("total_s", 0.0) + (time.perf_counter() - self._t0)
        try:
            from jax._src import monitoring as _mon
            _mon.unregister_event_duration_listener(self._on_event)
        except Exception:                    # a JAX without the (private) unregister: the listener stays, inert
            self._pending = [0.0, 0]
            self.on = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def format_phases(t: dict, top: Optional[int] = None) -> str:
    """Markdown table of a filled timings dict: phase | wall s | of it XLA compile s (programs)."""
    rows = sorted(t.get("phases", {}).items(), key=lambda kv: -kv[1])
    if top:
        rows = rows[:top]
    lines = ["| phase | wall s | XLA compile s (programs) |", "|---|---|---|"]
    for name, s in rows:
        c = t.get("compile_s", {}).get(name)
        lines.append(f"| {name} | {s:.3f} | " + ("" if c is None else f"{c:.3f} ({t['compiles'][name]})") + " |")
    if "total_s" in t:
        lines.append(f"| total | {t['total_s']:.3f} | {sum(t.get('compile_s', {}).values()):.3f} "
                     f"({sum(t.get('compiles', {}).values())}) |")
    return "\n".join(lines)


__all__ = ["Phases", "format_phases"]
