#!/usr/bin/env python3
"""Baseline for Tandem's decode benchmark: Hugging Face transformers' `generate`
on the same model, greedy, CPU, float32.

    /tmp/hfvenv/bin/python model/benches/hf_generate.py            # runs init-model --preset small
    /tmp/hfvenv/bin/python model/benches/hf_generate.py DIR        # an existing model folder
    options: --preset tiny|small  --threads N  --batches 1,8,64,256  --min-secs S  --ragged

(venv: model/tests/fixtures/requirements.txt). Without DIR it writes the preset
with `cargo run -p learner -- init-model --preset PRESET --out <tmp> --seed 0`.

Workload, as in `cargo run --release -p model --bin bench` (decode rows):
B prompts of 16 tokens (ids `(i * 7919 + row * 104729) % vocab`, the bench's
formula), 16 new tokens each, greedy (`do_sample=False`), `min_new_tokens=16`
so no row stops early at EOS. Prompts are passed left-padded with an attention
mask, as transformers needs for batched decoder-only generation; with
`--ragged` prompt lengths vary from 9 to 16 so the padding is real.

Two rows per batch size:
- `generate`: B x 16 new tokens / wall time of one `generate` call (prefill +
  16 decode steps): the number the issue quotes (~2,500 tok/s at batch 256);
- `decode only`: B x 15 / (time of generate(16) - time of generate(1)):
  subtracts prefill and the first step, comparable to Tandem's decode rows,
  which time decode steps only.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

REPO = Path(__file__).resolve().parents[2]
PROMPT_LEN = 16
NEW_TOKENS = 16


def make_folder(args) -> Path:
    if args.dir:
        return Path(args.dir).resolve()
    out = Path(tempfile.mkdtemp(prefix=f"tandem_{args.preset}_")) / "model"
    cmd = ["cargo", "run", "-q", "-p", "learner", "--", "init-model",
           "--preset", args.preset, "--out", str(out), "--seed", "0"]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)
    return out


def prompts(batch: int, vocab: int, pad: int, ragged: bool) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((batch, PROMPT_LEN), pad, dtype=torch.long)
    mask = torch.zeros((batch, PROMPT_LEN), dtype=torch.long)
    for row in range(batch):
        n = PROMPT_LEN - (row % 8 if ragged else 0)
        toks = [(i * 7919 + row * 104_729) % vocab for i in range(n)]
        ids[row, PROMPT_LEN - n:] = torch.tensor(toks)  # left padding
        mask[row, PROMPT_LEN - n:] = 1
    return ids, mask


def timed_generate(model, ids, mask, new_tokens: int, pad: int) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad,
        )
    secs = time.perf_counter() - start
    assert out.shape == (ids.shape[0], ids.shape[1] + new_tokens), out.shape
    return secs


def median_of(min_secs: float, fn) -> tuple[float, int]:
    """Calls fn (after one warm-up) until min_secs have passed; returns the
    median seconds per call and the number of calls."""
    fn()
    times = []
    start = time.perf_counter()
    while not times or time.perf_counter() - start < min_secs:
        times.append(fn())
    times.sort()
    return times[len(times) // 2], len(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", nargs="?", help="model folder (default: write the preset with init-model)")
    ap.add_argument("--preset", default="small", choices=["tiny", "small"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--min-secs", type=float, default=3.0)
    ap.add_argument("--ragged", action="store_true")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    folder = make_folder(args)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    cfg = model.config
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    n_params = sum(p.numel() for p in model.parameters())
    name = args.preset if not args.dir else folder.name

    print(f"<!-- transformers {transformers.__version__}, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"{n_params / 1e6:.2f}M parameters, attn {cfg._attn_implementation}, "
          f"prompts {PROMPT_LEN}{' ragged' if args.ragged else ''}, "
          f"loadavg {' '.join(f'{x:.2f}' for x in os.getloadavg())} -->")
    print("| engine | model | batch | new tokens | tokens/s |")
    print("|---|---|---|---|---|")
    for batch in [int(b) for b in args.batches.split(",")]:
        ids, mask = prompts(batch, cfg.vocab_size, pad, args.ragged)
        full, n_full = median_of(args.min_secs, lambda: timed_generate(model, ids, mask, NEW_TOKENS, pad))
        first, _ = median_of(min(args.min_secs, 1.0), lambda: timed_generate(model, ids, mask, 1, pad))
        gen_tps = batch * NEW_TOKENS / full
        dec_tps = batch * (NEW_TOKENS - 1) / max(full - first, 1e-9)
        print(f"| transformers generate | {name} | batch {batch} | {NEW_TOKENS} new | {gen_tps:.0f} tok/s |")
        print(f"| transformers decode only | {name} | batch {batch} | {NEW_TOKENS - 1} new | {dec_tps:.0f} tok/s |",
              flush=True)
        print(f"<!-- batch {batch}: generate(16) {full:.3f} s (median of {n_full}), "
              f"generate(1) {first:.3f} s -->", flush=True)
    print(f"<!-- loadavg at end {' '.join(f'{x:.2f}' for x in os.getloadavg())} -->")


if __name__ == "__main__":
    main()
