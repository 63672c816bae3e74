"""Passkey retrieval of the default model under the exact LagKV reference, to pick defaults.

    python -m benchmarks.passkey_defaults --lengths 2048 6144 --samples 5 --json out/passkey.json

Greedy-decodes the answer of the LagKV paper's passkey prompt (5-digit key in filler, depths
spread over the context) with the HF reference attention (float32, CPU) for each setting and the
uncompressed model, and prints accuracy per (setting, length). Slow by design: it is the oracle.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lrsa_serve.config import LagKVConfig
from lrsa_serve.models import resolve_model
from lrsa_serve.reference_attention import use_lagkv_reference
from lrsa_serve.synthetic_tasks import passkey, split_seed

SETTINGS = {
    "full": None,
    "S32 L128 r.25": LagKVConfig(sink=32, lag=128, ratio=0.25),
    "S32 L256 r.25": LagKVConfig(sink=32, lag=256, ratio=0.25),
    "S32 L512 r.25": LagKVConfig(sink=32, lag=512, ratio=0.25),
    "S32 L256 r.5": LagKVConfig(sink=32, lag=256, ratio=0.5),
    "S32 L512 r.5": LagKVConfig(sink=32, lag=512, ratio=0.5),
}


def answer(model, tokenizer, prompt: str, new_tokens: int = 7) -> str:
    ids = torch.tensor([tokenizer.encode(prompt)], device=model.device)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 6144])
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--gguf", type=Path, default=None, help="load from this GGUF instead")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    if args.gguf:  # straight from a GGUF file instead of a converted folder
        source = dict(pretrained_model_name_or_path=args.gguf.parent, gguf_file=args.gguf.name)
    else:
        source = dict(pretrained_model_name_or_path=resolve_model(args.model))
    tokenizer = AutoTokenizer.from_pretrained(**source)
    model = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)
    model = model.to(args.device).eval()
    rows = []
    for name in args.settings:
        cfg = SETTINGS[name]
        if cfg is None:
            model.set_attn_implementation("sdpa")
        else:
            use_lagkv_reference(model, cfg)
        for length in args.lengths:
            correct, started = 0, time.time()
            for i in range(args.samples):
                depth = (i + 0.5) / args.samples
                ex = passkey(tokenizer, length, depth, split_seed(i, "eval"))
                correct += ex.answer in answer(model, tokenizer, ex.prompt)
            rows.append(
                {
                    "setting": name,
                    "length": length,
                    "accuracy": correct / args.samples,
                    "seconds": round(time.time() - started, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'setting':<16}" + "".join(f"{n:>9}" for n in args.lengths))
    for name in args.settings:
        accs = [r["accuracy"] for r in rows if r["setting"] == name]
        print(f"{name:<16}" + "".join(f"{a:>9.0%}" for a in accs))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
