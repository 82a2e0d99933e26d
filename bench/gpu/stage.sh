#!/bin/bash
# Build what a lent GPU machine needs to run the benchmarks, in folders git ignores (each call
# of the device tool moves at most 64 MiB with the repo's ~31 MiB, hence two carries):
#   .gpu1: large, small-b (call 1: carry .gpu1 and bench/cache)
#   .gpu2: small-c, IMDB cut to the end a 160-token context reads; .whl: the wheels the GPU
#          image lacks, for its Python 3.12 (call 2: carry .gpu2 and .whl, run bench/gpu/run.sh)
# The configs read ../shared beside the checkout: run.sh puts the models under /work/shared,
# beside /work/main, as here. Usage: bash bench/gpu/stage.sh  (from the repo root)
set -euo pipefail
SHARED=${MLFLOW_RECYCLE_SHARED:-$PWD/../shared}
PYTHON=${PYTHON:-.venv/bin/python}
mkdir -p .gpu1 .gpu2 .whl
grep -qx '/.gpu1/' .git/info/exclude 2>/dev/null || printf '/.gpu1/\n/.gpu2/\n/.whl/\n' >> .git/info/exclude
for m in large small-b; do tar -C "$SHARED/models" -cf - $m | xz -9 -T2 > .gpu1/$m.tar.xz; done
tar -C "$SHARED/models" -cf - small-c | xz -9 -T2 > .gpu2/small-c.tar.xz
"$PYTHON" bench/gpu/trim_imdb.py "$SHARED/data/imdb" /tmp/imdb-trim/imdb 160
tar -C /tmp/imdb-trim -cf - imdb | xz -9 -T2 > .gpu2/imdb.tar.xz
platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms -d .whl \
  annotated-types==0.8.0 cachetools==7.3.3 databricks-sdk==0.162.0 datasets==4.8.5 dill==0.4.1 \
  fastapi==0.165.0 hydra-core==1.3.8 importlib_metadata==9.1.0 mlflow-skinny==3.17.2 mlflow-tracing==3.17.2 \
  multiprocess==0.70.19 omegaconf==2.3.1 opentelemetry-api==1.45.2 opentelemetry-proto==1.45.2 \
  opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2 pydantic==2.14.4 pydantic_core==2.50.5 \
  sqlparse==0.6.1 starlette==1.10.0 typing-inspection==0.4.5 protobuf==7.36.2 typing_extensions==4.16.0
"$PYTHON" -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
du -sm .gpu1 .gpu2 .whl bench/cache
