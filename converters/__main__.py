"""`python -m converters <kind> ...` - PyTorch checkpoints -> qdit4sr-jax float model files.

  python -m converters transformer --src X.safetensors|X.bin|diffusers_folder --config dit4sr --out model.safetensors

Other converter modules (converters/vae.py, converters/prompts.py) join the CLI by defining
`add_cli(subparsers)`, which registers a subparser whose `func(args)` does the work.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

import numpy as np

from qdit4sr_jax.config import ModelConfig


def model_config(spec: str, overrides=()) -> ModelConfig:
    """A preset name or a JSON file (as written in model-file metadata), then `key=value` overrides
    (values parsed as JSON when possible: lr_stream=false, dual_attention_layers=[0,1])."""
    if os.path.exists(spec):
        from qdit4sr_jax.io.modelfile import config_from_json
        with open(spec) as f:
            cfg = config_from_json(f.read())
    else:
        cfg = ModelConfig.preset(spec)
    kw = {}
    for o in overrides:
        if "=" not in o:
            raise SystemExit(f"--set expects key=value, got {o!r}")
        k, v = o.split("=", 1)
        if not hasattr(cfg, k):
            raise SystemExit(f"--set: ModelConfig has no field {k!r}")
        try:
            v = json.loads(v)
        except json.JSONDecodeError:
            pass
        kw[k] = tuple(v) if isinstance(v, list) else v
    return cfg.replace(**kw) if kw else cfg


def _transformer(args) -> None:
    from converters.sources import open_checkpoint
    from converters.transformer import convert_transformer_lazy
    from qdit4sr_jax.io.modelfile import save_model
    cfg = model_config(args.config, args.set)
    if args.param_dtype:
        cfg = cfg.replace(param_dtype=args.param_dtype)
    if cfg.context_mode == "learned":
        cfg = cfg.replace(context_mode="embeddings")
    shapes, get = open_checkpoint(args.src)
    params = convert_transformer_lazy(shapes, get, cfg)     # plan + checks raise before anything is written
    save_model(args.out, cfg, {"transformer": params})      # streams: one tensor in memory at a time
    n = sum(int(np.prod(v.shape)) for v in _leaves(params))
    print(f"wrote {args.out}: {n:,} transformer parameters ({cfg.param_dtype}), config {cfg.name!r}")


def _leaves(tree):
    for v in tree.values():
        if isinstance(v, dict):
            yield from _leaves(v)
        else:
            yield v


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m converters", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="kind", required=True)
    t = sub.add_parser("transformer", help="DiT4SR / SD3 transformer (diffusers layout)")
    t.add_argument("--src", required=True, help=".safetensors, .bin/.pt (torch.load weights_only), index.json "
                                                "or diffusers folder")
    t.add_argument("--config", default="dit4sr", help="ModelConfig preset name or JSON file")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="ModelConfig override")
    t.add_argument("--param-dtype", choices=["float32", "bfloat16"], default=None)
    t.add_argument("--out", required=True, help="output model file (.safetensors)")
    t.set_defaults(func=_transformer)
    for name in ("vae", "prompts"):
        try:
            mod = importlib.import_module(f"converters.{name}")
        except ImportError:
            continue
        if hasattr(mod, "add_cli"):
            mod.add_cli(sub)
    args = p.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
