#!/usr/bin/env bash
# Sets up an offline GPU host for bench/gpu_suite.sh from wheels carried to it: the staged
# chunks of ../shared/device/stage-wheels.sh, plus a folder of extra wheels its image lacks.
#
# Here (a machine with an index), from the repository root:
#   bash ../shared/device/stage-wheels.sh 'mlx[cuda13]==0.32.4' 'mlx-lm==0.32.2' \
#       'ray[serve]>=2.60,<2.61' 'pydantic>=2.11,<3'            # -> .device-stage/chunk-0..N
#   mkdir -p .whl && echo /.whl/ >> .git/info/exclude
#   pip download -d .whl/js --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 jsonschema            # the image has no jsonschema
#   for v in 1.62.3 1.66.2 1.70.0 1.74.0 1.76.0 1.80.0; do     # one of them fits its grpcio
#     pip download -d .whl --no-deps grpcio-reflection==$v; done
# There: send chunk-0..N-1 with `mkdir -p /root/stage && cp .device-stage/chunk-K/part.* \
# /root/stage/`, then the last chunk and .whl together with `bash bench/gpu_host_setup.sh`,
# and start every later command with `. /root/env.sh`.
set -euo pipefail
last=$(ls -d .device-stage/chunk-* | sort -V | tail -n 1)
bash "$last/install.sh" >/dev/null
# jsonschema and its own dependencies only: the image's attrs and typing-extensions stay
python3 -m pip install -q --no-index --no-deps --target /root/site .whl/js/jsonschema*.whl \
  .whl/js/referencing*.whl .whl/js/rpds*.whl 2>&1 | grep -v "already exists" || true
echo "image: grpcio $(python3 -c 'import grpc; print(grpc.__version__)')," \
  "protobuf $(python3 -c 'import google.protobuf as p; print(p.__version__)')"
# Ray Serve imports grpc_reflection, whose generated code must match the image's protobuf:
# keep the newest carried version that imports.
ok=""
for w in $(ls .whl/grpcio_reflection-*.whl | sort -t- -k2 -V -r); do
  rm -rf /root/refl && python3 -m pip install -q --no-index --no-deps --target /root/refl "$w"
  if PYTHONPATH=/root/refl:/root/site python3 -c 'from grpc_reflection.v1alpha import reflection' \
      2>/dev/null; then
    rm -rf /root/site/grpc_reflection /root/site/grpcio_reflection*
    cp -r /root/refl/* /root/site/; ok=$w; break
  fi
done
echo "grpc reflection: ${ok:-none imports}"
# the package as installed: mlx_serving.<part> -> this tree's folders
mkdir -p /root/pkg/mlx_serving
for d in engine deployments canary native bench; do ln -sfn "$PWD/$d" /root/pkg/mlx_serving/$d; done
printf 'export PYTHONPATH=/root/site:/root/pkg MLX_SERVING_CUDA=1 PATH=/root/site/bin:$PATH %s\n' \
  'HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 MODELS=/tmp/mlx-serving-models' > /root/env.sh
. /root/env.sh
python3 -c 'import mlx.core as mx, ray, ray.serve, mlx_serving.deployments.cli
print("mlx", mx.__version__, mx.default_device(), "ray", ray.__version__)'
nproc; nvidia-smi -L; nvidia-smi topo -m 2>/dev/null | head -8 || true
