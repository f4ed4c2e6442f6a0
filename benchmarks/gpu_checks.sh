#!/usr/bin/env bash
# Everything that needs a GPU, in one command for a lent GPU machine (the `device` tool's `run`):
#
#     bash benchmarks/gpu_checks.sh            # results in $OUT (the device tool's folder), else ./gpu-results
#
# 1. the CUDA tests (tests/test_cuda.py);
# 2. a 1,000-step soak on CUDA: device memory and pinned bytes must stay flat;
# 3. the decode benchmark on CUDA, Mixtral layer dimensions, 4 layers, 12.5/25/50% resident, beside
#    accelerate's offload: the 10x-at-25% target and the host-to-device bandwidth. The longest step, so last;
#    8 timed tokens and no "no reuse" column, so that the whole script fits one 600 s device command.
#
# The machine's own torch and transformers are used and nothing is installed or downloaded: the package
# runs from this source tree (PYTHONPATH). Each step runs even if an earlier one failed; summary.txt
# gets each step's exit code as soon as the step ends, so a run stopped at a time limit still says
# which steps finished. Seven files land in $OUT, within the device tool's limit of eight.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-gpu-results}"
mkdir -p "$out"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
  python -c "import accelerate, psutil, typer, rich, safetensors, numpy, pytest; print('accelerate', accelerate.__version__)" \
    || echo "a dependency is missing (above)"
  date -u +%Y-%m-%dT%H:%M:%SZ
} > "$out/machine.txt" 2>&1

: > "$out/summary.txt"
python -m pytest -q -m cuda tests/test_cuda.py > "$out/test_cuda.txt" 2>&1
echo "test_cuda $?" | tee -a "$out/summary.txt"
python benchmarks/soak.py --device cuda --steps 1000 --json "$out/soak_cuda.json" > "$out/soak_cuda.txt" 2>&1
echo "soak $?" | tee -a "$out/summary.txt"
python benchmarks/decode.py --device cuda --shape mixtral --layers 4 --tokens 8 --budgets 0.125,0.25,0.5 \
  --skip "no reuse,full buffered,lru buffered" --json "$out/decode_cuda.json" > "$out/decode_cuda.txt" 2>&1
echo "decode $?" | tee -a "$out/summary.txt"
