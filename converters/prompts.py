"""Export prompt embeddings from SD3's text encoders (CLIP-L, CLIP-G, T5-XXL) for the JAX pipeline.

  python -m converters prompts --sd3 path/to/stable-diffusion-3.5-medium --prompt "" --out empty.npz
  python -m converters prompts --sd3 ... --prompt-file captions.txt --dit4sr-defaults --out caps.npz
  python -m converters prompts --sd3 ... --prompt "" --into model.safetensors   (bundle as params["prompt"])

Runs diffusers' `StableDiffusion3Pipeline.encode_prompt` (needs torch, diffusers, transformers and the
SD3 text-encoder weights, which the user supplies) and writes, per prompt (batch axis B = #prompts):
  prompt_embeds                  [B, 77 + max_sequence_length, 4096]  (333 tokens with the default 256)
  pooled_prompt_embeds           [B, 2048]
  negative_prompt_embeds         [1, 333, 4096]   (one negative prompt, shared)
  negative_pooled_prompt_embeds  [1, 2048]
The empty prompt "" gives prompt_embeds [1, 333, 4096] and pooled_prompt_embeds [1, 2048].
The .npz is read by `qdit4sr_jax.pipeline.load_prompts` (and `upscale(..., prompt="x.npz")`).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from qdit4sr_jax.pipeline import save_prompts, validate_prompts

# DiT4SR's inference defaults (test/test_wllava.py of the public repository): a quality suffix appended
# to every LLaVA caption and a fixed negative prompt.
DIT4SR_ADDED_PROMPT = ("Cinematic, hyper sharpness, highly detailed, perfect without deformations, camera, "
                       "hyper detailed photo - realistic maximum detail, 32k, Color Grading, ultra HD, extreme "
                       "meticulous detailing, skin pore detailing.")
DIT4SR_NEGATIVE_PROMPT = ("motion blur, noisy, dotted, bokeh, pointed, CG Style, 3D render, unreal engine, "
                          "blurring, dirty, messy, worst quality, low quality, frames, watermark, signature, "
                          "jpeg artifacts, deformed, lowres, chaotic")
SD3_EMPTY_PROMPT_SHAPES = {"prompt_embeds": (1, 333, 4096), "pooled_prompt_embeds": (1, 2048)}


def encode_with_sd3(sd3_path: str, prompts: Sequence[str], negative_prompt: Optional[str] = "",
                    max_sequence_length: int = 256, device: str = "cpu",
                    torch_dtype: str = "float32") -> Dict[str, np.ndarray]:
    """Encode `prompts` (and one `negative_prompt`, None to skip) with SD3's three text encoders.

    sd3_path: a diffusers SD3/SD3.5 folder (tokenizers + text_encoder{,_2,_3}); the transformer and VAE
    are not loaded. Returns float32 arrays keyed as `qdit4sr_jax.pipeline.PROMPT_KEYS`.
    """
    try:
        import torch
        from diffusers import StableDiffusion3Pipeline
    except ImportError as e:
        raise ImportError(f"exporting prompt embeddings needs torch, diffusers and transformers "
                          f"(pip install 'qdit4sr-jax[torch]' transformers sentencepiece): {e}") from None
    if not prompts:
        raise ValueError("no prompts given")
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_path, transformer=None, vae=None,
                                                    torch_dtype=getattr(torch, torch_dtype))
    pipe = pipe.to(device)
    with torch.no_grad():
        pe, npe, ppe, nppe = pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=torch.device(device),
            do_classifier_free_guidance=negative_prompt is not None,
            negative_prompt=None if negative_prompt is None else [negative_prompt] * len(prompts),
            max_sequence_length=max_sequence_length)
    out = {"prompt_embeds": pe.float().cpu().numpy(), "pooled_prompt_embeds": ppe.float().cpu().numpy(),
           "prompt": np.asarray(list(prompts))}
    if negative_prompt is not None:
        out["negative_prompt_embeds"] = npe[:1].float().cpu().numpy()
        out["negative_pooled_prompt_embeds"] = nppe[:1].float().cpu().numpy()
        out["negative_prompt"] = np.asarray([negative_prompt])
    return validate_prompts(out)


def bundle_into_model(model_path: str, embeddings: Dict[str, np.ndarray], index: int = 0) -> None:
    """Store one prompt (and the negative) as params['prompt'] of a float model file (rewritten atomically)."""
    from qdit4sr_jax.io.modelfile import load_model, save_model
    cfg, params = load_model(model_path)
    d = validate_prompts(embeddings, cfg)
    B = d["prompt_embeds"].shape[0]
    if not 0 <= index < B:
        raise ValueError(f"--index {index} out of range for {B} prompt(s)")
    p = {"prompt_embeds": d["prompt_embeds"][index:index + 1],
         "pooled_prompt_embeds": d["pooled_prompt_embeds"][index:index + 1]}
    if "negative_prompt_embeds" in d:
        p["negative_prompt_embeds"] = d["negative_prompt_embeds"][:1]
        p["negative_pooled_prompt_embeds"] = d["negative_pooled_prompt_embeds"][:1]
    params["prompt"] = p
    save_model(model_path, cfg, params)


def _read_prompts(args) -> List[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise ValueError("give --prompt (may be \"\" for the empty prompt) or --prompt-file")
    if args.dit4sr_defaults:
        prompts = [(p + " " + DIT4SR_ADDED_PROMPT).strip() for p in prompts]
    return prompts


def _cli(args) -> None:
    if not args.out and not args.into:
        raise ValueError("give --out prompts.npz and/or --into model.safetensors")
    neg = DIT4SR_NEGATIVE_PROMPT if args.dit4sr_defaults and args.negative_prompt is None else args.negative_prompt
    if args.no_negative:
        neg = None
    elif neg is None:
        neg = ""
    emb = encode_with_sd3(args.sd3, _read_prompts(args), neg, args.max_sequence_length, args.device, args.dtype)
    if args.out:
        save_prompts(args.out, emb)
        print(f"wrote {args.out}: prompt_embeds {emb['prompt_embeds'].shape}, "
              f"pooled_prompt_embeds {emb['pooled_prompt_embeds'].shape}")
    if args.into:
        bundle_into_model(args.into, emb, args.index)
        print(f"stored prompt {args.index} as params['prompt'] in {args.into}")


def add_cli(sub) -> None:
    p = sub.add_parser("prompts", help="prompt embeddings from SD3's text encoders -> .npz / model file")
    p.add_argument("--sd3", required=True, help="diffusers SD3 / SD3.5 folder with the text encoders")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable; \"\" is the empty prompt)")
    p.add_argument("--prompt-file", help="text file, one caption per line")
    p.add_argument("--negative-prompt", default=None, help="negative prompt (default \"\")")
    p.add_argument("--no-negative", action="store_true", help="do not export a negative prompt")
    p.add_argument("--dit4sr-defaults", action="store_true",
                   help="append DiT4SR's quality suffix to each prompt and use its negative prompt")
    p.add_argument("--max-sequence-length", type=int, default=256, help="T5 tokens (DiT4SR: 256 -> 333 total)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--out", help="output .npz")
    p.add_argument("--into", help="float model file to store one prompt in as params['prompt']")
    p.add_argument("--index", type=int, default=0, help="which prompt --into stores")
    p.set_defaults(func=_cli)
