#!/usr/bin/env bash
# Builds the CUDA binaries and test executables and packs them, stripped and
# xz-compressed, into gpu-bundle/ (git-ignored), to carry to a GPU machine that
# has no Rust toolchain or registry access. Run from the repository root with
# nvcc on PATH and CUDA_COMPUTE_CAP set (e.g. 90 for H100/H200).
#   ops/gpu/bundle.sh            # then, on the GPU machine: ops/gpu/checks.sh
# CARGO_TARGET_DIR (default target/cuda) keeps the CUDA build apart from the
# CPU one, so neither rebuilds the other's dependencies.
set -euo pipefail
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
command -v nvcc >/dev/null || { echo "bundle.sh: nvcc is not on PATH (see the README's CUDA section)" >&2; exit 1; }
: "${CUDA_COMPUTE_CAP:?set CUDA_COMPUTE_CAP to the compute capability of the GPUs, e.g. 90}"

cargo build --release --features cuda --workspace --bins
# Test executables (the CUDA ones): their paths from cargo's JSON messages.
tests=$(for t in "model devices" "rollout-server cuda_logprobs" "learner nccl_cuda"; do
    set -- $t
    cargo test --release --features cuda --no-run --message-format=json -p "$1" --test "$2"
  done | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])')

out=gpu-bundle
rm -rf "$out"; mkdir -p "$out/release/deps"
for b in rollout-server learner launcher bench bench_weight_sync; do
  strip -o "$out/release/$b" "$CARGO_TARGET_DIR/release/$b"
done
for t in $tests; do strip -o "$out/release/deps/$(basename "$t")" "$t"; done
# -9: the bundle and the working tree must fit in the 64 MiB that travels.
xz -T2 -9 "$out"/release/* "$out"/release/deps/* 2>/dev/null || true
du -sh "$out"
