"""The per-method evaluation loop behind `qdit4sr-jax evaluate`, with a per-image result cache in --out.

For each method (always `bicubic` and `fp`, the references, then the requested quantization presets): quantize
once (calibrated when the preset needs it), upscale every image with `pipeline.upscale` (same seed and steps as
FP, so PSNR vs FP is the quantization error alone), score it (`scores.Scorer`) and store the output PNG and a
per-image JSON in --out. A rerun with the same settings loads what is there and computes only the rest.

--out layout: evaluate.json (the settings; a rerun must match them), images/<method>/<image>.png,
cache/<method>/<image>.json (figures + seconds), cache/<method>/_method.json (bits, size, ops, quantize
seconds), results.json, results.csv, grid.png. Every file is written atomically.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

from qdit4sr_jax import pipeline
from qdit4sr_jax.evaluation import data as D
from qdit4sr_jax.evaluation import output as O
from qdit4sr_jax.evaluation.scores import Scorer

REFERENCES = ("bicubic", "fp")
FORMAT = "qdit4sr-jax/evaluate v1"
_SAFE = re.compile(r"^[a-z0-9][a-z0-9._+-]*$")


# ----------------------------------------------------------------------------- methods and accounting

def resolve_methods(spec) -> List[Tuple[str, object]]:
    """"fp,svdquant-w4a4,..." (or a list) -> [(name, QuantConfig | None)]: bicubic and fp first (the references,
    always evaluated), then each quantization preset (`QuantConfig.preset`), duplicates dropped. ValueError
    naming every unknown name."""
    from qdit4sr_jax.quant.config import QuantConfig
    names = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    out: List[Tuple[str, object]] = [(r, None) for r in REFERENCES]
    bad, why = [], ""
    for n in names:
        if n in REFERENCES or n in [m for m, _ in out]:
            continue
        try:
            q = QuantConfig.preset(n)
        except ValueError as e:
            bad.append(n)
            why = why or str(e)
            continue
        if not _SAFE.match(n):
            raise ValueError(f"method name {n!r} cannot name a folder: use letters, digits, '-', '.', '_'")
        out.append((n, q))
    if bad:
        raise ValueError(f"unknown method(s) {bad}: methods are 'fp', 'bicubic' or quantization preset names such as "
                         f"rtn-w4a4, svdquant-w4a4, qdit4sr-w4a4, qdit4sr-w4a4-sens ({why})")
    return out


def effective_bits(model_cfg, qparams, hw, steps: Optional[int] = None) -> Tuple[float, float, float, float]:
    """(size-weighted weight bits, MAC-weighted activation bits, size M, ops G) over the quantized linears, at an
    output of hw = (H, W) pixels (`report.size_ops`, the paper's definitions; steps: default the model's)."""
    from qdit4sr_jax import report
    r = report.size_ops(model_cfg, qparams=qparams, height=hw[0], width=hw[1], steps=steps, count_unused=False)
    q = [p for p in r["per_layer"] if p["w_bits"] < 32]
    if not q:
        return 32.0, 32.0, r["size_M"], r["ops_G"]
    n = np.array([p["d_in"] * p["d_out"] for p in q], np.float64)
    macs = np.array([p["macs"] for p in q], np.float64)
    wb = float(np.sum(n * [p["w_bits"] for p in q]) / n.sum())
    ab = float(np.sum(macs * [p["a_bits"] for p in q]) / macs.sum())
    return wb, ab, r["size_M"], r["ops_G"]


@dataclasses.dataclass
class Result:
    """One evaluated config of the fidelity study: per-image figures, bits, size / ops, seconds, outputs."""
    label: str
    method: str
    bits: str
    per_image: List[Dict[str, float]]
    w_bits: float
    a_bits: float
    size_m: float
    ops_g: float
    quantize_s: float
    upscale_s: float
    outputs: List[np.ndarray]

    def mean(self, key: str) -> float:
        return float(np.mean([m[key] for m in self.per_image]))


# ----------------------------------------------------------------------------- options

@dataclasses.dataclass
class Options:
    """`qdit4sr-jax evaluate`'s settings (see cli.py for each flag)."""
    model: str = "demo"
    hr: Optional[str] = None
    lr: Optional[str] = None
    methods: str = "fp,rtn-w4a4,svdquant-w4a4,qdit4sr-w4a4"
    steps: Optional[int] = None
    seed: int = 0
    calib: str = "samples"              # "samples" | "train" | N (first N inputs) | a folder of LR images
    calib_on_eval: bool = False
    crop: Optional[int] = None
    border: int = 0
    y_channel: bool = False
    out: str = "qdit4sr-eval"
    limit: Optional[int] = None
    devices: Optional[int] = None
    grid_crop: int = 64
    niqe_patch: Optional[int] = None    # NIQE patch size (None: qdit4sr_jax.metrics.niqe's default)
    prompt: Optional[str] = None        # prompt-embeddings .npz (None: the model file's, or its learned context)
    progress: bool = True
    learned: bool = True


def _calib_plan(o: Options, items: List[D.Item], cfg) -> Tuple[List[D.Item], Optional[List[np.ndarray]], str]:
    """(scored items, calibration LR images or None when nothing to load, description), checked up front."""
    spec = str(o.calib).strip()
    if spec.isdigit():
        n = int(spec)
        if n < 1:
            raise ValueError("--calib N needs N >= 1")
        if o.calib_on_eval:
            if n > len(items):
                raise ValueError(f"--calib {n}: only {len(items)} input image(s)")
            return items, [it.lr for it in items[:n]], \
                f"the first {n} input(s) ({', '.join(i.name for i in items[:n])}), also scored (--calib-on-eval)"
        if n >= len(items):
            raise ValueError(f"--calib {n} holds out the first {n} input(s) for calibration but there are only "
                             f"{len(items)}: nothing would be left to score (use a smaller N, --calib DIR, or "
                             f"--calib-on-eval)")
        return items[n:], [it.lr for it in items[:n]], \
            f"the first {n} input(s) ({', '.join(i.name for i in items[:n])}), held out from scoring"
    names = [] if o.calib_on_eval else [D.match_key(it.name) for it in items]
    if spec == "samples" and not o.calib_on_eval:
        scored = {it.name for it in items}
        if all(os.path.splitext(f)[0] in scored for f in D.list_images(D.SAMPLES_DIR, "samples")):
            raise ValueError("--calib samples (the default): every bundled sample is scored, and calibration never "
                             "uses scored images; pass --calib N (hold out the first N inputs), --calib DIR (LR "
                             "images), --calib train (data/train) or --calib-on-eval")
    if spec in ("samples", "train"):
        size = max(max(it.lr.shape[:2]) for it in items) * cfg.scale
        lrs, desc = D.calibration_lrs(spec, 4, size, cfg.scale, exclude=[it.name for it in items]
                                      if not o.calib_on_eval else ())
        return items, lrs, desc + " (LR = seeded degradation), none of them scored"
    crop_lr = o.crop // cfg.scale if o.crop else None
    lrs, desc = D.lr_folder(spec, min_lr=pipeline.min_input_size(cfg), crop_lr=crop_lr, exclude=names)
    return items, lrs, desc + (" (scored images allowed: --calib-on-eval)" if o.calib_on_eval else
                               ", files named like a scored image skipped")


def _prepare_out(out: str, settings: dict) -> None:
    """Create --out (writing evaluate.json) or check that it holds a run with the same settings."""
    meta = os.path.join(out, "evaluate.json")
    if os.path.exists(meta):
        import json
        with open(meta) as f:
            old = json.load(f)
        diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v and k != "methods"]
        if diff:
            raise ValueError(f"--out {out!r} holds an evaluation with other settings ({'; '.join(diff)}): use another "
                             f"--out, or delete that folder to start over")
    elif os.path.isdir(out) and os.listdir(out):
        raise FileExistsError(f"--out {out!r} exists, is not empty and holds no evaluate.json: choose a new or empty "
                              f"folder (evaluate never mixes its files with others)")
    O.write_json(meta, dict(settings, format=FORMAT))


# ----------------------------------------------------------------------------- the run

class Evaluation:
    """One `evaluate` run: inputs checked and loaded in the constructor (nothing written), `run()` does the rest."""

    def __init__(self, o: Options, log=print):
        self.o, self.log = o, log
        if o.steps is not None and o.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {o.steps}")
        if o.devices is not None:
            import jax
            if not 1 <= o.devices <= len(jax.devices()):
                raise ValueError(f"--devices {o.devices}: this machine has {len(jax.devices())} JAX device(s)")
        self.methods = resolve_methods(o.methods)
        self.cfg, self.params = D.load_bundle(o.model)
        self.steps = int(o.steps or self.cfg.num_steps)
        self.prompt = pipeline.load_prompts(o.prompt, self.cfg) if o.prompt else None
        pipeline._resolve_prompt(self.cfg, self.params, self.prompt, 0)     # a missing prompt fails here, not mid-run
        self.notes: List[str] = []
        items, self.lr_desc = D.load_items(o.hr, o.lr, scale=self.cfg.scale, min_lr=pipeline.min_input_size(self.cfg),
                                           crop=o.crop, limit=o.limit, notes=self.notes)
        self.has_hr = items[0].hr is not None
        self.needs_calib = any(q is not None and q.needs_calibration for _, q in self.methods)
        self.gains = any(q is not None and q.needs_step_gains for _, q in self.methods)
        self.items, self._calib_lrs, self.calib_desc = _calib_plan(o, items, self.cfg) if self.needs_calib \
            else (items, None, "not needed by these methods")
        self.scorer = Scorer(o.y_channel, o.border, learned=o.learned, niqe_patch=o.niqe_patch)
        if o.border:
            small = min(min(it.lr.shape[:2]) * self.cfg.scale for it in self.items)
            if small <= 2 * o.border + 6:
                raise ValueError(f"--border {o.border} leaves too little of the smallest output ({small} px) to score")
        if o.grid_crop < 8:
            raise ValueError(f"--grid-crop must be >= 8 px, got {o.grid_crop}")
        self._calib = None
        self.fp_outputs: Dict[str, np.ndarray] = {}
        s = self.items[0].lr.shape
        self.hw = (s[0] * self.cfg.scale, s[1] * self.cfg.scale)

    # -- settings that decide the figures (a rerun into the same --out must match them)
    def settings(self) -> dict:
        o = self.o
        ab = lambda p: None if p is None else os.path.abspath(p)  # noqa: E731
        return dict(model=o.model if o.model == "demo" else os.path.abspath(o.model), model_config=self.cfg.name,
                    hr=ab(o.hr), lr=ab(o.lr), steps=self.steps, seed=o.seed, crop=o.crop, limit=o.limit,
                    calib=str(o.calib), calib_on_eval=o.calib_on_eval, y_channel=o.y_channel, border=o.border,
                    niqe_patch=o.niqe_patch, prompt=ab(o.prompt), images=[it.name for it in self.items],
                    methods=[m for m, _ in self.methods])

    def _path(self, *parts) -> str:
        return os.path.join(self.o.out, *parts)

    @property
    def calib(self):
        if self._calib is None:
            t0 = time.perf_counter()
            self._calib = pipeline.calibrate_images(self.cfg, self.params, self._calib_lrs, seed=self.o.seed,
                                                    num_steps=self.steps, step_gains=self.gains, prompt=self.prompt)
            self.log(f"calibrated on {self.calib_desc} x {self.steps} steps in {time.perf_counter() - t0:.1f} s")
        return self._calib

    def _model(self, name: str, q) -> Tuple[object, dict]:
        """(params bundle, method record) of a method: quantized once here."""
        if name == "bicubic":
            nan = float("nan")
            return None, dict(w_bits=nan, a_bits=nan, size_m=nan, ops_g=nan, quantize_s=0.0)
        if q is None:
            wb, ab, size, ops = effective_bits(self.cfg, None, self.hw, self.steps)
            return self.params, dict(w_bits=32.0, a_bits=32.0, size_m=size, ops_g=ops, quantize_s=0.0)
        from qdit4sr_jax.quant.api import quantize
        calib = self.calib if q.needs_calibration else None
        t0 = time.perf_counter()
        qt = quantize(self.params["transformer"], q, calib=calib)
        tq = time.perf_counter() - t0
        wb, ab, size, ops = effective_bits(self.cfg, qt, self.hw, self.steps)
        return dict(self.params, transformer=qt), dict(w_bits=wb, a_bits=ab, size_m=size, ops_g=ops, quantize_s=tq)

    def _upscale(self, name: str, params, pending: List[D.Item]):
        """Yield (item, output uint8 [H, W, 3], seconds) for the pending items."""
        if name == "bicubic":
            for it in pending:
                t0 = time.perf_counter()
                out = pipeline.bicubic(it.lr, self.cfg.scale)
                yield it, out, time.perf_counter() - t0
            return
        if not self.o.devices:
            for it in pending:
                t0 = time.perf_counter()
                out = pipeline.upscale(self.cfg, params, it.lr, seed=self.o.seed, num_steps=self.steps,
                                       prompt=self.prompt)
                yield it, out, time.perf_counter() - t0
            return
        import jax
        from qdit4sr_jax import parallel
        n = self.o.devices
        mesh = parallel.make_mesh(model=1, data=n, devices=jax.devices()[:n])
        groups: Dict[tuple, List[D.Item]] = {}
        for it in pending:
            groups.setdefault(it.lr.shape, []).append(it)
        for group in groups.values():
            for k in range(0, len(group), n):
                chunk = group[k:k + n]
                t0 = time.perf_counter()
                outs = parallel.upscale_batch(self.cfg, params, [it.lr for it in chunk], mesh=mesh, seed=self.o.seed,
                                              num_steps=self.steps, prompt=self.prompt)
                dt = (time.perf_counter() - t0) / len(chunk)
                for it, out in zip(chunk, outs):
                    yield it, out, dt

    def _done(self, method: str, name: str) -> bool:
        """Both the figures and the output PNG of (method, image) are in --out."""
        return os.path.exists(self._path("cache", method, f"{name}.json")) and \
            os.path.exists(self._path("images", method, f"{name}.png"))

    def _fp(self, name: str) -> np.ndarray:
        if name not in self.fp_outputs:
            self.fp_outputs[name] = O.read_png(self._path("images", "fp", f"{name}.png"))
        return self.fp_outputs[name]

    def run(self) -> dict:
        """Evaluate every method on every image (resuming from --out) -> the results.json object."""
        from tqdm import tqdm
        o = self.o
        _prepare_out(o.out, self.settings())
        total = len(self.methods) * len(self.items)
        bar = tqdm(total=total, desc="images x methods", unit="img", disable=not o.progress, file=sys.stderr,
                   dynamic_ncols=True)
        done_before = 0
        records = []
        try:
            order = sorted(self.methods, key=lambda m: m[0] != "fp")      # FP first: the others are scored against it
            for name, q in order:
                cdir = self._path("cache", name)
                pending = [it for it in self.items if not self._done(name, it.name)]
                done_before += len(self.items) - len(pending)
                bar.update(len(self.items) - len(pending))
                rec_path = os.path.join(cdir, "_method.json")
                if pending or not os.path.exists(rec_path):
                    bar.set_postfix_str(f"{name}: quantize" if q is not None else name)
                    params, rec = self._model(name, q)
                    O.write_json(rec_path, rec)
                    bar.set_postfix_str(name)
                    for it, out, dt in self._upscale(name, params, pending):
                        O.write_png(self._path("images", name, f"{it.name}.png"), out)
                        if name == "fp":
                            self.fp_outputs[it.name] = out
                        fp = out if name == "fp" else self._fp(it.name)
                        fig = self.scorer.score(out, it.hr, fp, is_fp=name == "fp")
                        O.write_json(os.path.join(cdir, f"{it.name}.json"), dict(fig, seconds=dt))
                        bar.update(1)
                records.append(self._record(name, rec_path))
        finally:
            bar.close()
        self.resumed = done_before
        rank = {m: i for i, (m, _) in enumerate(self.methods)}
        return self._finish(sorted(records, key=lambda r: rank[r["method"]]))

    def _record(self, name: str, rec_path: str) -> dict:
        import json
        with open(rec_path) as f:
            rec = json.load(f)
        per = []
        for it in self.items:
            with open(self._path("cache", name, f"{it.name}.json")) as f:
                per.append(dict(image=it.name, **json.load(f)))
        keys = [k for k in per[0] if k not in ("image", "seconds")]
        mean = {k: float(np.mean([p[k] for p in per])) for k in keys}
        secs = [p["seconds"] for p in per]
        secs = secs[1:] if len(secs) > 1 else secs          # the first image of a method includes compilation
        return dict(method=name, **rec, mean=mean, s_per_image=float(np.median(secs)), per_image=per)

    def _finish(self, records: List[dict]) -> dict:
        o = self.o
        keys = self.scorer.keys(self.has_hr)
        conv = [self.scorer.convention(self.has_hr),
                f"size (M) and ops (G): the paper's definitions (qdit4sr_jax.report.size_ops) at a {self.hw[1]}x"
                f"{self.hw[0]} output, {self.steps} steps; W/A bits: size-weighted weight / MAC-weighted activation "
                f"bits of the quantized linears",
                "s / image: median wall time of one upscale over the images after the first (the first of each "
                "method includes compilation; every image's seconds are in results.csv)",
                "NIQE: no reference, lower is better; texture / HR and / FP: high-band spectral energy of the output "
                "over the reference's (1 = same)"]
        seeds = {it.name: it.lr_seed for it in self.items if it.lr_seed is not None}
        res = dict(format=FORMAT, settings=self.settings(), inputs=self.lr_desc, degradation_seeds=seeds or None,
                   calibration=self.calib_desc,
                   conventions=conv, notes=self.scorer.notes + self.notes + self.scorer.errors,
                   resumed=self.resumed, methods=records)
        O.write_json(self._path("results.json"), O.strict_json(res))
        O.write_text(self._path("results.csv"), O.results_csv(records, keys))
        cols = [(("FP" if r["method"] == "fp" else r["method"]), [O.read_png(self._path("images", r["method"],
                                                                                        f"{it.name}.png"))
                                                                  for it in self.items[:4]]) for r in records]
        ref = "psnr_hr" if self.has_hr else "psnr_fp"
        scores = {("FP" if r["method"] == "fp" else r["method"]): [p[ref] for p in r["per_image"][:4]] for r in records}
        if self.has_hr:
            cols.append(("HR", [it.hr for it in self.items[:4]]))
        O.write_grid_png(self._path("grid.png"), cols, scores=scores, crop=o.grid_crop, max_images=4)
        res["keys"] = keys
        res["table"] = O.method_table(records, keys)
        return res

def report_text(res: dict, out: str) -> str:
    """What evaluate prints: the Markdown table, the conventions and notes, where the files are."""
    s = res["settings"]
    lines = [f"## qdit4sr-jax evaluate: {len(s['images'])} image(s), model `{s['model']}` ({s['model_config']}), "
             f"{s['steps']} steps, seed {s['seed']}", "", res["table"], "",
             f"Inputs: {res['inputs']}" + (f"; centre crop {s['crop']} px HR" if s["crop"] else "") + ".",
             f"Calibration: {res['calibration']}."]
    lines += [f"- {c}" for c in res["conventions"]]
    lines += [f"- {n}" for n in res["notes"]]
    if res["resumed"]:
        lines.append(f"Resumed: {res['resumed']} (method, image) result(s) were already in {out} and were not "
                     f"recomputed.")
    lines.append(f"Files: {os.path.join(out, 'results.csv')}, results.json, grid.png, images/<method>/")
    return "\n".join(lines)
