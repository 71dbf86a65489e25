set -x
cd /work/main
B="env HF_HUB_OFFLINE=1 $(.venv/bin/python -m mlx_serving.engine.blas --env)"
for mode in throughput default; do
  $B MLX_SERVING_SERVE_MODE=$mode .venv/bin/python -m mlx_serving.bench.serve --model models/demo-small \
    --concurrency 8 32 --requests-per-stream 2 --repeats 2 \
    --json docs/results/cpu-run12/serve-demo-small-$mode.json > /tmp/run12-$mode.md 2>/tmp/run12-$mode.err
  echo "$mode rc=$?"
done
