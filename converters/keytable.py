"""Declarative PyTorch -> Flax key tables.

A table is a list of `Rule(pattern, target, transform)`:
  pattern:   regex, full-matched against a PyTorch state-dict key ('transformer_blocks.3.attn.to_q.weight');
  target:    '/'-joined Flax tree path template using the regex groups (`re.Match.expand` syntax,
             e.g. r'transformer_blocks_\\1/attn/to_q/kernel'), or None to drop the key on purpose;
  transform: a `Transform` (shape function + array function), e.g. `LINEAR` (transpose [out,in] ->
             [in,out]), `CONV_HWIO` ([O,I,kh,kw] -> [kh,kw,I,O]), `IDENTITY`, `reshape(...)`.
The first matching rule wins.

`plan(src_shapes, table, abstract)` checks the whole mapping against an abstract params tree (leaves with
`.shape`/`.dtype`, e.g. from `jax.eval_shape(model.init, ...)`) without touching any tensor data, and
raises ONE `ConversionError` listing every problem: source keys no rule matches, rule targets that are
not in the model, model leaves nothing fills, shape mismatches (naming the key and both shapes), and
targets filled twice. `convert(...)` then reads each tensor once (through a getter, so large checkpoints
are streamed) and returns the nested params dict in the target dtypes.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from qdit4sr_jax.io.modelfile import flatten_tree

Shape = Tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Transform:
    """A tensor transform with its shape function (so a plan can be checked on shapes alone)."""
    name: str
    fn: Callable[[np.ndarray], np.ndarray]
    shape: Callable[[Shape], Shape]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.fn(x)


def transpose(*perm: int) -> Transform:
    def shape(s):
        if len(s) != len(perm):
            raise ValueError(f"transpose{perm} needs a rank-{len(perm)} tensor, got shape {tuple(s)}")
        return tuple(s[p] for p in perm)
    return Transform(f"transpose{perm}", lambda x: np.ascontiguousarray(np.transpose(x, perm)), shape)


def reshape(new_shape: Sequence[int]) -> Transform:
    new_shape = tuple(new_shape)

    def shape(s):
        if int(np.prod(s)) != int(np.prod(new_shape)):
            raise ValueError(f"cannot reshape {tuple(s)} to {new_shape}")
        return new_shape
    return Transform(f"reshape{new_shape}", lambda x: x.reshape(new_shape), shape)


IDENTITY = Transform("identity", lambda x: x, lambda s: tuple(s))
LINEAR = transpose(1, 0)                 # nn.Linear.weight [out, in] -> kernel [in, out]
CONV_HWIO = transpose(2, 3, 1, 0)        # nn.Conv2d.weight [O, I/g, kh, kw] -> [kh, kw, I/g, O]


@dataclasses.dataclass(frozen=True)
class Rule:
    pattern: str
    target: Optional[str]                # None: drop this key on purpose
    transform: Transform = IDENTITY
    # optional validation of a (dropped or kept) source tensor, run by `convert` before anything is
    # returned: check(key, array) -> None if fine, else a message naming the problem
    check: Optional[Callable[[str, np.ndarray], Optional[str]]] = None

    def match(self, key: str):
        return re.fullmatch(self.pattern, key)


class ConversionError(ValueError):
    """Every problem found while mapping a checkpoint onto a model, listed together."""

    def __init__(self, problems: List[str], what: str = "checkpoint"):
        self.problems = list(problems)
        head = f"{what} does not map onto the model: {len(problems)} problem(s)"
        shown = self.problems[:200]
        more = [f"... and {len(self.problems) - 200} more"] if len(self.problems) > 200 else []
        super().__init__("\n  ".join([head] + shown + more))


@dataclasses.dataclass(frozen=True)
class Step:
    src: str
    target: str
    transform: Transform


def unflatten_tree(flat: Mapping[str, Any]) -> Dict[str, Any]:
    """{'a/b/c': leaf} -> nested dict."""
    out: Dict[str, Any] = {}
    for path, v in flat.items():
        node = out
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = v
    return out


def plan(src_shapes: Mapping[str, Shape], table: Sequence[Rule], abstract: Mapping[str, Any],
         what: str = "checkpoint") -> List[Step]:
    """Match every source key to a target leaf; raise one ConversionError listing all problems."""
    targets = flatten_tree(abstract)
    problems: List[str] = []
    steps: List[Step] = []
    filled: Dict[str, str] = {}
    reported = set()                      # targets already named in a problem
    for key in sorted(src_shapes):
        shape = tuple(int(d) for d in src_shapes[key])
        rule = m = None
        for r in table:
            m = r.match(key)
            if m:
                rule = r
                break
        if rule is None:
            problems.append(f"unexpected source key {key!r} {shape}: no rule matches it")
            continue
        if rule.target is None:
            continue
        target = m.expand(rule.target)
        if target not in targets:
            problems.append(f"source key {key!r} {shape} maps to {target!r}, which the model does not have")
            continue
        if target in filled:
            problems.append(f"target {target!r} filled twice: from {filled[target]!r} and {key!r}")
            continue
        try:
            got = tuple(rule.transform.shape(shape))
        except ValueError as e:
            problems.append(f"source key {key!r} {shape} -> {target!r}: {e}")
            reported.add(target)
            continue
        want = tuple(targets[target].shape)
        if got != want:
            problems.append(f"shape mismatch: source key {key!r} has shape {shape} ({rule.transform.name} -> "
                            f"{got}) but model param {target!r} has shape {want}")
            reported.add(target)
            continue
        filled[target] = key
        steps.append(Step(key, target, rule.transform))
    for t in sorted(set(targets) - set(filled) - reported):
        problems.append(f"missing: model param {t!r} {tuple(targets[t].shape)} is not in the {what}")
    if problems:
        raise ConversionError(problems, what)
    return steps


def convert(src_shapes: Mapping[str, Shape], get: Callable[[str], np.ndarray], table: Sequence[Rule],
            abstract: Mapping[str, Any], what: str = "checkpoint", lazy: bool = False) -> Dict[str, Any]:
    """Plan (all-or-nothing), run the rules' checks, then read each source tensor via `get(key)`,
    transform it and cast it to the abstract leaf's dtype. Returns the nested params dict of numpy
    arrays (owned copies, never views of the source); with lazy=True, of `LazyTensor`s that do the read
    and transform when written (`save_model` streams them, so a large checkpoint never sits in memory)."""
    from qdit4sr_jax.io.safetensors import LazyTensor
    steps = plan(src_shapes, table, abstract, what)
    problems = []
    for key in sorted(src_shapes):
        rule = next((r for r in table if r.match(key)), None)
        if rule is not None and rule.check is not None:
            msg = rule.check(key, get(key))
            if msg:
                problems.append(msg)
    if problems:
        raise ConversionError(problems, what)
    targets = flatten_tree(abstract)

    def load(s: Step) -> np.ndarray:
        x = np.asarray(s.transform(np.asarray(get(s.src))), dtype=np.dtype(targets[s.target].dtype))
        return x if x.flags.owndata and x.flags.writeable else np.array(x)

    out = {}
    for s in steps:
        t = targets[s.target]
        out[s.target] = LazyTensor(t.shape, t.dtype, lambda s=s: load(s)) if lazy else load(s)
    return unflatten_tree(out)


def convert_state_dict(state_dict: Mapping[str, Any], table: Sequence[Rule], abstract: Mapping[str, Any],
                       what: str = "checkpoint") -> Dict[str, Any]:
    """`convert` for an in-memory {key: array-like (numpy or torch tensor)} mapping."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    return convert(shapes, lambda k: to_numpy(state_dict[k]), table, abstract, what)


def to_numpy(x) -> np.ndarray:
    """numpy array from a numpy array or a (CPU) torch tensor; bf16 tensors become ml_dtypes.bfloat16."""
    if isinstance(x, np.ndarray):
        return x
    if type(x).__module__.startswith("torch"):
        import torch
        t = x.detach().cpu()
        if t.dtype == torch.bfloat16:
            import ml_dtypes
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    return np.asarray(x)
