"""Per-kernel profile of one denoising step: where the device time of each execution mode goes.

Builds the same step as benchmarks/step_latency.py (full-size `dit4sr` transformer with random weights of the
real shapes, CFG batch doubled, the same quantized trees), runs `--warmup` steps, then `--iters` steps under
`jax.profiler.trace(create_perfetto_trace=True)` and reads the trace's device timeline back:

  lines      every timeline line of the traced device (GPU: "Stream #..." kernel lines, "XLA Ops", "XLA
             Modules"; CPU: the XLA thread pools) with its event count and time per step
  categories kernel time per step split into gemm (cuBLAS / cuBLASLt), attention (cuDNN), qlinear (our
             Pallas kernel), mosaic (our Mosaic GPU kernels), fusion (XLA fusions: elementwise, reductions, the prologues), copy, other
  top        the `--top` kernel kinds (names without numeric suffixes) by time per step (calls, us per step);
             top_kernels the same for single kernels

and, for each case, the difference of every category and kernel kind against the first mode given
(the question it answers: what does W4A4 run that W8A8 does not, and how long does it take).

  python benchmarks/gpu/step_profile.py --cases 512x1 --modes w8a8-fused w4a4s-fused --out $OUT/profile.json
  python benchmarks/gpu/step_profile.py --preset tiny --cases 32x1 --modes bf16 w8a8-fused --attention xla   # CPU
`--keep-trace DIR` also copies each perfetto trace (json.gz, open it in ui.perfetto.dev) to DIR.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))      # the repository root
sys.path.insert(0, os.path.dirname(_HERE))                       # benchmarks/ (common, step_latency)
sys.path.insert(0, _HERE)                                        # benchmarks/gpu/

import jax  # noqa: E402

from common import add_prologue_args, apply_prologue_args, environment, random_params, write_json  # noqa: E402
import step_latency as S  # noqa: E402

CATEGORIES = (
    ("qlinear", re.compile(r"qlinear", re.I)),
    ("mosaic", re.compile(r"mosaic|^body|_body", re.I)),     # Mosaic GPU kernels (named after their body)
    ("attention", re.compile(r"cudnn|fmha|flash|sdpa|attention", re.I)),
    ("gemm", re.compile(r"gemm|xmma|cutlass|nvjet|sm\d\d_|cublas|dot|matmul|ynn", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy", re.I)),
    ("fusion", re.compile(r"fusion|reduce|convert|transpose|broadcast|concatenate|slice|pad|select", re.I)),
)
_SKIP = re.compile(r"^end: |ThreadpoolListener|SlinkyThreadPool|^\$|PjitFunction|^Thunk", re.I)


def category(name: str) -> str:
    """Kernel / op name -> one of qlinear, mosaic, attention, gemm, copy, fusion, other (first matching pattern)."""
    for cat, pat in CATEGORIES:
        if pat.search(name):
            return cat
    return "other"


def kind(name: str) -> str:
    """Kernel name without its per-program numeric suffixes ("loop_add_fusion.23" -> "loop_add_fusion"), so that
    the same kind of kernel compares across the programs of two modes."""
    return re.sub(r"([._]\d+)+$", "", name)


def read_trace(path: str):
    """perfetto json(.gz) -> (events [(pid, tid, name, dur_us)], process names {pid}, thread names {(pid, tid)})."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        d = json.load(f)
    raw = d["traceEvents"] if isinstance(d, dict) else d
    procs, threads, events = {}, {}, []
    for e in raw:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e["pid"]] = e.get("args", {}).get("name", "")
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e.get("tid"))] = e.get("args", {}).get("name", "")
        elif e.get("ph") == "X" and e.get("dur") is not None:
            events.append((e["pid"], e.get("tid"), e.get("name", ""), float(e["dur"])))
    return events, procs, threads


def kernel_lines(procs, threads):
    """The (pid, tid) lines that hold kernel executions: a GPU device's "Stream" lines, else (CPU) the XLA
    thread-pool lines of the host."""
    gpu = {p for p, n in procs.items() if "/device:gpu" in n.lower()}
    if gpu:
        return {k for k, n in threads.items() if k[0] in gpu and n.lower().startswith("stream")}
    return {k for k, n in threads.items() if n.startswith("tf_XLA")}


def breakdown(path: str, iters: int, top: int = 25) -> dict:
    """Per-step summary of one trace of `iters` steps (see the module docstring); times in microseconds."""
    events, procs, threads = read_trace(path)
    lines = collections.defaultdict(lambda: [0, 0.0])
    for pid, tid, name, dur in events:
        key = f"{procs.get(pid, pid)} | {threads.get((pid, tid), tid)}"
        lines[key][0] += 1
        lines[key][1] += dur
    kl = kernel_lines(procs, threads)
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for pid, tid, name, dur in events:
        if (pid, tid) in kl and not _SKIP.search(name):
            by_name[name][0] += 1
            by_name[name][1] += dur
    cats = collections.defaultdict(float)
    by_kind = collections.defaultdict(lambda: [0, 0.0])
    for name, (n, us) in by_name.items():
        cats[category(name)] += us / iters
        by_kind[kind(name)][0] += n
        by_kind[kind(name)][1] += us
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])
    kinds = sorted(by_kind.items(), key=lambda kv: -kv[1][1])
    return {
        "iters": iters,
        "kernel_us_per_step": sum(us for _, us in by_name.values()) / iters,
        "kernels_per_step": sum(n for n, _ in by_name.values()) / iters,
        "categories_us": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
        "top": [{"name": n[:160], "calls": c / iters, "us": us / iters, "category": category(n)}
                for n, (c, us) in kinds[:top]],
        "top_kernels": [{"name": n[:160], "calls": c / iters, "us": us / iters} for n, (c, us) in ranked[:top]],
        "by_kind": {n[:160]: {"calls": c / iters, "us": us / iters} for n, (c, us) in kinds},
        "lines": {k: {"events": v[0] / iters, "us": v[1] / iters} for k, v in sorted(lines.items())},
    }


def profile_step(step, args, iters: int, warmup: int, keep: str = None, tag: str = "") -> dict:
    """Compile + warm `step(*args)`, trace `iters` runs, -> breakdown (with the trace copied to `keep`)."""
    for _ in range(max(1, warmup)):
        jax.block_until_ready(step(*args))
    tmp = tempfile.mkdtemp(prefix="step_profile_")
    try:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(iters):
                jax.block_until_ready(step(*args))
        found = glob.glob(os.path.join(tmp, "**", "perfetto_trace.json*"), recursive=True)
        if not found:
            raise RuntimeError(f"the profiler wrote no perfetto trace under {tmp}")
        res = breakdown(found[0], iters)
        if keep:
            os.makedirs(keep, exist_ok=True)
            shutil.copy(found[0], os.path.join(keep, f"{tag}.perfetto.json.gz"))
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_FUSION = re.compile(r"^\s*(?:ROOT )?%?([\w.-]+) = (\S+) fusion\(.*?kind=(\w+).*?calls=%?([\w.-]+)(.*)$")
_META = re.compile(r'op_name="([^"]*)"(?:.*?source_file="([^"]*)")?(?:.*?source_line=(\d+))?')
_FRAME = re.compile(r"stack_frame_id=(\d+)")


def _stack_tables(text: str):
    """The optimized HLO's FileNames / FunctionNames / FileLocations / StackFrames tables -> a function
    frame_id -> "file:line<file:line" of the innermost two frames in this project's files."""
    sec, files, locs, frames = None, {}, {}, {}
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            sec = line
            continue
        if not line or line.startswith(("HloModule", "ENTRY", "%", " ")):
            if line.startswith(("ENTRY", "%")):
                sec = None
            continue
        m = re.match(r"(\d+) (.*)$", line)
        if not m or sec is None:
            continue
        i, rest = int(m.group(1)), m.group(2)
        if sec == "FileNames":
            files[i] = rest.strip('"')
        elif sec == "FileLocations":
            f = re.search(r"file_name_id=(\d+).*?line=(\d+)", rest)
            locs[i] = (int(f.group(1)), int(f.group(2))) if f else (0, 0)
        elif sec == "StackFrames":
            f = re.search(r"file_location_id=(\d+).*?parent_frame_id=(\d+)", rest)
            if f:
                frames[i] = (int(f.group(1)), int(f.group(2)))

    def source(fid: int) -> str:
        out, seen = [], set()
        while fid in frames and fid not in seen and len(out) < 2:
            seen.add(fid)
            loc, parent = frames[fid]
            fn, ln = locs.get(loc, (0, 0))
            path = files.get(fn, "?")
            if "qdit4sr_jax" in path:
                out.append(f"{os.path.basename(path)}:{ln}")
            fid = parent
        return "<".join(out) or "?"
    return source


def hlo_fusions(text: str, top: int = 40) -> list:
    """Optimized HLO text -> the fusions of every computation grouped by kernel kind (the profile's name without
    its numeric suffix, e.g. input_concatenate_fusion), result shape and source (the jax op and file:line of XLA's
    metadata): [{kind, shape, op, source, count}], most frequent first (static counts; a scanned body counts
    once)."""
    groups = collections.Counter()
    source = _stack_tables(text)
    for line in text.splitlines():
        m = _FUSION.match(line)
        if not m:
            continue
        name, shape, rest = m.group(1), re.sub(r"\{[^}]*\}", "", m.group(2)), m.group(5)
        meta = _META.search(rest)
        op = src = "?"
        if meta:
            op = re.sub(r"^jit\([^)]*\)/", "", meta.group(1))
            op = re.sub(r"jit\(([^)]*)\)/", r"\1/", op)[-120:]
            if meta.group(2):
                src = f"{os.path.basename(meta.group(2))}:{meta.group(3)}"
        frame = _FRAME.search(rest)
        if frame:
            src = source(int(frame.group(1)))
        groups[(re.sub(r"[.\d]+$", "", name), shape[:48], op.split("/")[-1], src)] += 1
    return [{"kind": k, "shape": sh, "op": o, "source": s, "count": c}
            for (k, sh, o, s), c in groups.most_common(top)]


def short_lines(text: str, limit: int = 20000) -> str:
    """HLO text with every line over `limit` characters cut to its first 2,000 plus a note of its length: a Mosaic
    GPU custom call carries its kernel's serialized module in its backend config at every call site (~100 KB
    each, 1,488 of them in a 512-px W4A4 step), which made writing the HLO outlast its call. Fusion lines, which
    `hlo_fusions` reads, are far shorter."""
    return "\n".join(ln if len(ln) <= limit else f"{ln[:2000]} ...<{len(ln)} chars>" for ln in text.split("\n"))


def write_hlo(step, args, out_dir: str, tag: str):
    """Compile step(*args), write its optimized HLO to out_dir/tag.hlo.txt.gz -> ({path, fusions}, the compiled
    step: callable with the same args, so that the profile runs it instead of compiling it again)."""
    os.makedirs(out_dir, exist_ok=True)
    compiled = step.lower(*args).compile()
    text = short_lines(compiled.as_text())
    path = os.path.join(out_dir, f"{tag}.hlo.txt.gz")
    with gzip.open(path, "wt") as f:
        f.write(text)
    return {"path": path, "fusions": hlo_fusions(text)}, compiled


def diff(base: dict, other: dict, top: int = 15) -> dict:
    """Category and kernel-kind differences other - base (us and calls per step), the largest first."""
    cats = sorted(set(base["categories_us"]) | set(other["categories_us"]))
    dc = {c: other["categories_us"].get(c, 0.0) - base["categories_us"].get(c, 0.0) for c in cats}
    get = lambda r, n, f: r["by_kind"].get(n, {}).get(f, 0.0)
    names = set(base["by_kind"]) | set(other["by_kind"])
    dn = {n: {"us": get(other, n, "us") - get(base, n, "us"), "calls": get(other, n, "calls") - get(base, n, "calls")}
          for n in names}
    return {"total_us": other["kernel_us_per_step"] - base["kernel_us_per_step"],
            "categories_us": dict(sorted(dc.items(), key=lambda kv: -abs(kv[1]))),
            "kinds": dict(sorted(dn.items(), key=lambda kv: -abs(kv[1]["us"]))[:top])}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="dit4sr")
    ap.add_argument("--cases", nargs="+", default=["512x1"], metavar="SIZExBATCH")
    ap.add_argument("--modes", nargs="+", default=["w8a8-fused", "w4a4s-fused"],
                    type=S.mode_arg)
    ap.add_argument("--attention", default="cudnn", help="'cudnn' or 'xla' (cudnn is replaced by xla off GPU)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--calib-steps", type=int, default=40)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--keep-trace", default=None, help="directory for the perfetto traces")
    ap.add_argument("--hlo", default=None, metavar="DIR", help="also write each mode's optimized HLO (gzip) and "
                    "its fusions by source line (`hlo_fusions`) to DIR")
    ap.add_argument("--hadamard", default="auto", help="online Hadamard implementation (transforms.HADAMARD_IMPLS)")
    ap.add_argument("--analyze-hlo", default=None, metavar="FILE", help="only print the fusions of a written HLO "
                    "(.hlo.txt.gz from --hlo; no device needed) and exit")
    ap.add_argument("--deadline", type=float, default=None, help="skip remaining work after this many seconds")
    ap.add_argument("--out", default=None, help="JSON results file")
    add_prologue_args(ap)
    a = ap.parse_args(argv)
    apply_prologue_args(a)
    if a.analyze_hlo:
        with gzip.open(a.analyze_hlo, "rt") as f:
            fusions = hlo_fusions(f.read(), a.top)
        print_fusions(fusions)
        return {"fusions": fusions}
    cases = S.parse_cases(a.cases)
    t0 = time.perf_counter()
    log = lambda s: print(f"[{time.perf_counter() - t0:7.1f}s] {s}", flush=True)
    from qdit4sr_jax.config import ModelConfig
    from qdit4sr_jax.model.dit4sr import DiT4SRTransformer

    attn = None if a.attention == "xla" or jax.default_backend() != "gpu" else a.attention
    mcfg = ModelConfig.preset(a.preset).replace(dtype="bfloat16", param_dtype="bfloat16", attention_impl=attn)
    params = random_params(mcfg)
    trees, qinfo = S.quantized_trees(params, [m for m in a.modes if m != "bf16"], a.calib_steps, log)
    trees["bf16"] = params
    from qdit4sr_jax.quant.transforms import hadamard_impl
    model = DiT4SRTransformer(mcfg)
    steps = {}                            # one jit per Hadamard implementation (read when the step is traced)
    res = {"env": environment(), "args": vars(a), "model": a.preset, "attention": attn or "xla", "runs": [],
           "diffs": [], "notes": []}
    for size, b in cases:
        inp = S.inputs(mcfg, size, b)
        got = {}
        for mode in a.modes:
            if mode not in trees:
                res["notes"].append(f"{mode}: no tree ({qinfo.get(mode.split('-')[0], {}).get('error', '?')})")
                continue
            if a.deadline and time.perf_counter() - t0 > a.deadline:
                res["notes"].append(f"deadline: skipped {mode} at {size} batch {b}")
                continue
            had = S.mode_hadamard(mode, a.hadamard)
            step = steps.setdefault(had, S.make_step(model, mcfg.guidance_scale))
            tag = f"{mode}_{size}x{b}".replace(":", "_")
            with hadamard_impl(had):
                hlo, run = write_hlo(step, (trees[mode],) + inp, a.hlo, tag) if a.hlo else (None, step)
                prof = profile_step(run, (trees[mode],) + inp, a.iters, a.warmup, a.keep_trace, tag)
            if hlo:
                prof["hlo"] = hlo
            got[mode] = prof
            res["runs"].append({"mode": mode, "size": size, "batch": b, **prof})
            log(f"{mode:13s} {size}px b{b}: {prof['kernel_us_per_step'] / 1e3:.2f} ms of kernels per step, "
                f"{prof['kernels_per_step']:.0f} kernels; " + ", ".join(
                    f"{c} {us / 1e3:.2f}" for c, us in prof["categories_us"].items()))
            write_json(a.out, res)
        modes = [m for m in a.modes if m in got]
        for m in modes[1:]:
            d = diff(got[modes[0]], got[m])
            res["diffs"].append({"size": size, "batch": b, "base": modes[0], "mode": m, **d})
    write_json(a.out, res)
    print_report(res)
    return res


def print_fusions(fusions):
    print("| kind | shape | op | source | count |\n|---|---|---|---|---|")
    for f in fusions:
        print(f"| {f['kind']} | {f.get('shape', '')} | {f['op'][:60]} | {f['source']} | {f['count']} |")


def print_report(res):
    print(f"\n{res['env']['device']}  jax {res['env']['jax']}  model {res['model']}  attention {res['attention']}")
    for r in res["runs"]:
        print(f"\n## {r['mode']} {r['size']}px batch {r['batch']}: {r['kernel_us_per_step'] / 1e3:.2f} ms of kernels "
              f"per step ({r['kernels_per_step']:.0f} kernels)")
        print("| category | ms / step |\n|---|---|")
        for c, us in r["categories_us"].items():
            print(f"| {c} | {us / 1e3:.3f} |")
        print("| kernel | calls / step | ms / step | category |\n|---|---|---|---|")
        for t in r["top"]:
            print(f"| {t['name'][:90]} | {t['calls']:.0f} | {t['us'] / 1e3:.3f} | {t['category']} |")
        if r.get("hlo"):
            print(f"fusions in the optimized HLO ({r['hlo']['path']}):")
            print_fusions(r["hlo"]["fusions"])
    for d in res["diffs"]:
        print(f"\n## {d['mode']} - {d['base']} at {d['size']}px batch {d['batch']}: {d['total_us'] / 1e3:+.2f} ms")
        print("| category / kernel kind | calls / step | ms / step |\n|---|---|---|")
        for c, us in d["categories_us"].items():
            print(f"| {c} | | {us / 1e3:+.3f} |")
        for n, v in d["kinds"].items():
            print(f"| {n[:90]} | {v['calls']:+.0f} | {v['us'] / 1e3:+.3f} |")
    for n in res["notes"]:
        print("note:", n)


if __name__ == "__main__":
    main()
