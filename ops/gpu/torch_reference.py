"""PyTorch + transformers on the same model folder and GPU, for the README's
side-by-side numbers (ops/gpu/checks.sh runs it after Tandem's own bench):

- decode tokens/s of `generate` (greedy, every sequence runs the full length)
  at batch 1, 64 and 256 with 16-token prompts, the shapes of `bench`;
- forward+backward tokens/s of the summed completion log-probs, batch 8 x 128.

    python3 ops/gpu/torch_reference.py MODEL_DIR [--dtype bfloat16]

On the CPU, next to `bench --only train` (f32, torch's threads as given):

    python3 ops/gpu/torch_reference.py MODEL_DIR --device cpu --dtype float32 \
        --threads 2 --no-generate

Prints Markdown rows in bench's columns.
"""

import argparse
import time

import torch
from transformers import AutoModelForCausalLM


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, min_secs=3.0):
    fn()  # warm-up (kernels, allocator)
    synchronize()
    start, n = time.perf_counter(), 0
    while n == 0 or time.perf_counter() - start < min_secs:
        fn()
        synchronize()
        n += 1
    return (time.perf_counter() - start) / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    ap.add_argument("--no-generate", action="store_true", help="forward+backward only")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=dtype).to(dev).eval()
    vocab = model.config.vocab_size
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else f"cpu, {torch.get_num_threads()} threads"
    print(f"device {name}, torch {torch.__version__}, dtype {args.dtype}")
    print("| model | measure | shape | tokens/s |")
    print("|---|---|---|---|")

    g = torch.Generator(device=dev).manual_seed(0)
    for batch in () if args.no_generate else (1, 64, 256):
        prompt = torch.randint(0, vocab, (batch, 16), device=dev, generator=g)
        mask = torch.ones_like(prompt)
        n = args.new_tokens

        def gen():
            with torch.no_grad():
                model.generate(
                    input_ids=prompt,
                    attention_mask=mask,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=0,
                )

        s = timed(gen)
        print(f"| transformers | decode (generate) | batch {batch} | {batch * n / s:.0f} |", flush=True)

    model.train()
    b, t, k = 8, 128, 127
    ids = torch.randint(0, vocab, (b, t), device=dev, generator=g)

    def fwd_bwd():
        logits = model(input_ids=ids).logits[:, -k - 1 : -1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, -k:].unsqueeze(-1))
        lp.sum().backward()
        model.zero_grad(set_to_none=True)

    s = timed(fwd_bwd)
    print(f"| transformers | forward+backward | {b}x{t} | {b * t / s:.0f} |", flush=True)

    # Next to Tandem's train.gradient_checkpointing row.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    s = timed(fwd_bwd)
    print(
        f"| transformers | forward+backward, gradient checkpointing | {b}x{t} | {b * t / s:.0f} |",
        flush=True,
    )


if __name__ == "__main__":
    main()
