#!/usr/bin/env bash
# Downloads (on a machine with the package index) the wheels the GPU machine's image lacks for bench/gpu_suite.sh,
# into .whl/ (git-ignored; carried with `run(carry=[".whl"])`, 64 MiB a call: these are about 48 MB).
# The image has torch, transformers, peft, accelerate, pillow, numpy, safetensors; it lacks bitsandbytes, torchao,
# hydra-core, omegaconf and antlr4 (hydra's parser), and its peft version is pinned here to the tested one.
#   bash bench/gpu_wheels.sh && ls -la .whl
set -euo pipefail
PY=${PYTHON:-python3}
rm -rf .whl && mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" -d .whl \
    bitsandbytes==0.50.2 torchao==0.18.0 hydra-core==1.3.8 omegaconf==2.3.1 peft==0.21.2
$PY -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3  # pure Python, published as a source archive only
du -sh .whl
