#!/usr/bin/env bash
# The GPU checks and benchmarks of the CUDA issue, in one run on a GPU machine,
# from gpu-bundle/ (ops/gpu/bundle.sh). Results go to ${OUT:-gpu-results}/.
#   ops/gpu/checks.sh [BANDWIDTH_GBS]   # H100 SXM: 3350, H200: 4800
# Needs libcudart/libcublas/libcurand/libnccl of CUDA 13 on the library path
# (e.g. PyTorch's nvidia/*/lib folders, found below) and, for the side-by-side
# numbers, python3 with torch and transformers.
set -uo pipefail
bw=${1:-3350}
res=${OUT:-gpu-results}; mkdir -p "$res"
b=gpu-bundle/release
for f in "$b"/*.xz "$b"/deps/*.xz; do [ -e "$f" ] && xz -d -f "$f"; done
chmod +x "$b"/* "$b"/deps/* 2>/dev/null
site=$(python3 -c 'import site; print(site.getsitepackages()[0])' 2>/dev/null)
for d in "$site"/nvidia/*/lib /usr/local/cuda/lib64; do [ -d "$d" ] && LD_LIBRARY_PATH=$d:${LD_LIBRARY_PATH:-}; done
export LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$res/gpu.txt"

run() { echo "== $*" | tee -a "$res/log.txt"; "$@" 2>&1 | tee -a "$res/log.txt"; }
# Correctness: CUDA f32/bf16 against CPU f32 (the model, a reward model, LoRA dropout);
# server vs learner log-probs; NCCL (world size 1).
for t in "$b"/deps/devices-* "$b"/deps/cuda_logprobs-* "$b"/deps/nccl_cuda-*; do
  run "$t" --test-threads 1 --nocapture
done
model=gpu-bundle/models/qwen2.5-0.5b
[ -e $model/config.json ] || run "$b"/learner init-model --preset qwen2.5-0.5b --out $model
# Benchmarks: decode and forward+backward; weight sync GPU to GPU.
run "$b"/bench qwen2.5-0.5b --device cuda:0 --bandwidth-gbs "$bw" | tee "$res/bench_model.md"
run "$b"/bench_weight_sync --preset qwen2.5-0.5b --device cuda:0 --iters 5 | tee "$res/bench_weight_sync.md"
run python3 ops/gpu/torch_reference.py $model | tee "$res/bench_torch.md"
# A short GRPO run: rollout server and learner on the same GPU (colocated).
run "$b"/launcher --config ops/gpu/grpo_0.5b.yaml --device cuda \
  --out "$res/grpo-run"
# The same with LoRA (model.use_peft): adapters on the frozen bf16 base, the
# custom frozen-linear ops on CUDA, merged weights pushed to the server, TRL's
# lora_dropout (cuRAND masks), the rows cut by a token budget.
run "$b"/launcher --config ops/gpu/grpo_0.5b.yaml --device cuda \
  --out "$res/grpo-lora" model.use_peft=true model.lora_target_modules=all-linear \
  model.lora_dropout=0.05 train.max_tokens_per_micro_batch=8192 \
  train.learning_rate=1.0e-5 train.max_steps=10
