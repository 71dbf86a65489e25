#!/usr/bin/env bash
# The GPU figures of docs/BENCHMARKS.md: engine vs raw BatchGenerator on Llama-1B and 8B-shaped
# random models (bf16), and HTTP through Ray Serve vs the engine in-process (1B).
# Models are generated on the machine itself (too large to carry).
#
#   bash bench/gpu_suite.sh OUTDIR STEP...
#   STEP: tiny | 1b | 8b            engine vs raw BatchGenerator (ENGINE_LEVELS overrides the
#                                   levels)
#         serve-SIZE                HTTP / Serve handle / engine in-process (bench.serve)
#         serve-process-SIZE        the same with the replica's engine in a child process
#         serve-nogate-SIZE         serve-SIZE with the prefill gate off (prefill_wait_steps=0)
#         serve-inreplica-SIZE      serve-SIZE with the engine in the replica's own process
#                                   (the default on a GPU is a child process)
#         serve-plain-SIZE          serve-SIZE with Serve's defaults (MLX_SERVING_SERVE_MODE=
#                                   default) instead of its high-throughput mode: the Python
#                                   HTTP proxy and Ray actor calls between replicas
#         serve-spread[-nogate]-SIZE  serve-SIZE with output lengths spread over 64-192
#         serve-spread-cudnn-SIZE   ... with cuDNN attention on (cudnn_attention: true; a graph
#                                   per new prompt shape)
#         serve-spread-cache-SIZE   ... cuDNN attention on, its graph and CUDA-graph caches 1024
#                                   (serve steps but serve-process: SERVE_LEVELS overrides the
#                                   levels, SERVE_REQUESTS the requests per stream (16:
#                                   runs of 15-25 s on a GPU; 4-5 s runs spread +-15%),
#                                   SERVE_ARGS adds bench.serve flags, e.g.
#                                   "--switch-interval-ms 0.2"; MLX_ENABLE_CACHE_THRASHING_CHECK=1
#                                   reports thrashing caches in STEP.err)
#         gpus-N                    bench llm, ours alone: N replicas of one GPU each, 8B bf16,
#                                   32-256 streams (the multi-GPU scaling run; GPUS_LEVELS and
#                                   GPUS_REPEATS override the levels and the repeats, GPUS_ARGS
#                                   adds bench llm flags, e.g. "--deployment
#                                   max_ongoing_requests=136")
#                                   (one load-client process per GPU; GPUS_CLIENTS overrides;
#                                   batch 160, room above 128 streams per GPU for the Routers'
#                                   uneven shares; GPUS_BATCH overrides, 128 was runs 6-20's;
#                                   STEP/threads.txt: the busy threads and their cores, 2-s
#                                   samples, bench.host_threads; a step named again writes
#                                   STEP.2, STEP.3: GPUS_PER_GPU=128 with "gpus-1 gpus-4
#                                   gpus-1 gpus-4 scaling" interleaves the repeats; GPUS_PER_GPU
#                                   gives the levels as streams per GPU, over GPUS_LEVELS)
#         gpus-pow2-N               gpus-N with the Routers on Serve's own request router
#                                   instead of FreshQueueLengthRouter
#         gpus-two-N                gpus-N with FreshQueueLengthRouter comparing two random
#                                   replicas (choices: 2) instead of all of them
#         scaling                   the efficiency of every gpus-* step run so far in OUTDIR
#                                   against one GPU, repeats paired in the order of their
#                                   folders, by replica (bench.scaling; scaling.md)
#         decode-rate               raw BatchGenerator decode steps/s on 1, 2 and all GPUs at
#                                   once, then beside 16 busy CPUs (bench.gpu_decode)
#         decode-rate-engine        the same through our Engine (batch 128 streams), 1 and all
#                                   GPUs; decode-rate-process through EngineProcess, as a
#                                   replica on a GPU runs it
#         canary-gpus               the canary rollback drill, stable and canary on a GPU each
#         process-SIZE              engine in-process vs in a child process, no Ray
#         prefix-SIZE               the engine's prefix cache off and on, in-process, chat
#                                   prompts with no and with a shared 200-word system prompt
#         llm-SIZE[-q4]             mlx-serving bench llm --compare: ours vs mlx_lm.server
#                                   (bf16, or 4-bit with -q4), 1-128 streams (LLM_LEVELS
#                                   overrides the levels, LLM_ARGS adds bench llm flags)
#
# Environment: PYTHON (default python3), MODELS (default /tmp/mlx-serving-models).
set -euo pipefail
out=${1:?usage: gpu_suite.sh OUTDIR STEP...}; shift
py=${PYTHON:-python3}
models=${MODELS:-/tmp/mlx-serving-models}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$out" "$models"

model() {  # model SIZE [BITS] -> path of a bf16 (or BITS-quantized) llama, generated if missing
  local path="$models/llama-$1-bfloat16${2:+-q$2}"
  [ -f "$path/config.json" ] || "$py" -m mlx_serving.deployments.cli make-model "$path" \
    --size "$1" --dtype bfloat16 ${2:+--quantize $2} >&2
  echo "$path"
}

for step in "$@"; do
  case $step in
    tiny|1b|8b)
      path=$(model "$step")
      "$py" -m mlx_serving.bench.engine --model "$path" \
        --concurrency ${ENGINE_LEVELS:-1 8 32 64 128} \
        --json "$out/engine-$step.json" | tee "$out/engine-$step.md" ;;
    llm-*)
      spec=${step#llm-}; size=${spec%-q*}; bits=""
      [ "$spec" != "$size" ] && bits=${spec#*-q}
      path=$(model "$size" $bits)
      "$py" -m mlx_serving.deployments.cli bench llm --compare --model-path "$path" \
        --concurrency ${LLM_LEVELS:-1 8 32 64 128} --max-batch-size 128 \
        --engine prefill_batch_size=16 ${LLM_ARGS:-} \
        --mlx-lm-arg=--prompt-concurrency=16 --no-progress --no-plots --out "$out/$step" \
        --title "$step" | tail -n 20 ;;
    serve-process-*)
      size=${step#serve-process-}
      path=$(model "$size")
      "$py" -m mlx_serving.bench.serve --model "$path" --concurrency 8 32 64 --engine-process \
        --max-batch-size 64 --json "$out/$step.json" | tee "$out/$step.md" ;;
    serve-*)
      spec=${step#serve-}; flags=(); envs=(MLX_ENABLE_CACHE_THRASHING_CHECK=1)
      [[ $spec == spread-* ]] && { spec=${spec#spread-}; flags+=(--max-tokens-spread 0.5); }
      [[ $spec == nogate-* ]] && { spec=${spec#nogate-}; flags+=(--engine prefill_wait_steps=0); }
      [[ $spec == inreplica-* ]] && { spec=${spec#inreplica-}; flags+=(--no-engine-process); }
      [[ $spec == plain-* ]] && { spec=${spec#plain-}; envs+=(MLX_SERVING_SERVE_MODE=default); }
      [[ $spec == cache-* ]] && { spec=cudnn-${spec#cache-}
        envs+=(MLX_CUDA_SDPA_CACHE_SIZE=1024 MLX_CUDA_GRAPH_CACHE_SIZE=1024); }
      [[ $spec == cudnn-* ]] && { spec=${spec#cudnn-}; flags+=(--engine cudnn_attention=true); }
      path=$(model "$spec")
      env "${envs[@]}" "$py" -m mlx_serving.bench.serve --model "$path" \
        --concurrency ${SERVE_LEVELS:-1 8 32 64} --max-batch-size 64 \
        --requests-per-stream "${SERVE_REQUESTS:-16}" "${flags[@]}" ${SERVE_ARGS:-} \
        --json "$out/$step.json" 2> >(tee "$out/$step.err" >&2) | tee "$out/$step.md" ;;
    gpus-*)
      n=${step#gpus-}; flags=()
      [[ $n == pow2-* ]] && { n=${n#pow2-}; flags+=(--deployment "request_router_config=\
{request_router_class: 'ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter'}"); }
      [[ $n == two-* ]] && { n=${n#two-}; flags+=(--deployment "request_router_config=\
{request_router_class: 'mlx_serving.deployments.replica_routing:FreshQueueLengthRouter', \
request_router_kwargs: {choices: 2}}"); }
      # a folder already there (a step named again: gpus-1 gpus-4 gpus-1 gpus-4 interleaves
      # the repeats) makes this one STEP.2, STEP.3, ...
      dir=$out/$step; k=1
      while [ -e "$dir" ]; do k=$((k + 1)); dir=$out/$step.$k; done
      levels=${GPUS_LEVELS:-32 64 128 256}
      [ -n "${GPUS_PER_GPU:-}" ] && levels=$(for s in $GPUS_PER_GPU; do echo $((s * n)); done)
      path=$(model 8b); mkdir -p "$dir"
      # the busy threads and their cores every 2 s, for replicas that step slower beside others
      { lscpu | grep -E '^(Model name|Thread|Core|Socket|NUMA node)' || true
        exec "$py" -m mlx_serving.bench.host_threads --min-share 0.2; } > "$dir/threads.txt" &
      sampler=$!
      "$py" -m mlx_serving.deployments.cli bench llm --compare --servers ours --model-path "$path" \
        --replicas "$n" --gpus-per-replica 1 --concurrency $levels \
        --client-processes "${GPUS_CLIENTS:-$n}" --repeats "${GPUS_REPEATS:-1}" \
        --max-batch-size "${GPUS_BATCH:-160}" "${flags[@]}" ${GPUS_ARGS:-} \
        --engine prefill_batch_size=16 --no-progress --no-plots --out "$dir" \
        --title "${dir##*/}" | tail -n 20 || { kill $sampler; exit 1; }
      kill $sampler ;;
    scaling)
      # in the order they ran (gpus-1, gpus-1.2, ...: a glob puts gpus-1.2 before gpus-1)
      mapfile -t folders < <(printf '%s\n' "$out"/gpus-*/results.json \
        | sed 's|/results.json$||' | sort -V)
      "$py" -m mlx_serving.bench.scaling "${folders[@]}" \
        --json "$out/scaling.json" | tee "$out/scaling.md" ;;
    decode-rate)
      path=$(model 8b); gpus=$(nvidia-smi -L | wc -l)
      "$py" -m mlx_serving.bench.gpu_decode --model "$path" --groups 0 0,1 \
        "$(seq -s, 0 $((gpus - 1)))" --cpu-load 16 --json "$out/decode-rate.json" \
        | tee "$out/decode-rate.md" ;;
    decode-rate-engine|decode-rate-process)
      path=$(model 8b); gpus=$(nvidia-smi -L | wc -l); driver=engine
      [ "$step" = decode-rate-process ] && driver=engine-process
      "$py" -m mlx_serving.bench.gpu_decode --model "$path" --driver $driver --groups 0 \
        "$(seq -s, 0 $((gpus - 1)))" --json "$out/$step.json" | tee "$out/$step.md" ;;
    canary-gpus)
      path=$(model 8b)
      "$py" -m mlx_serving.bench.canary_gpus --model "$path" --stable-replicas 1 \
        --canary-replicas 1 --concurrency 32 --json "$out/canary-gpus.json" \
        | tail -n 60 ;;
    process-*)
      size=${step#process-}
      path=$(model "$size")
      "$py" -m mlx_serving.bench.process --model "$path" --concurrency 8 32 64 \
        --gil-load 0.3 | tee "$out/$step.md" ;;
    prefix-*)
      path=$(model "${step#prefix-}")
      "$py" -m mlx_serving.bench.prefix_cache --model "$path" --json "$out/$step.json" \
        | tee "$out/$step.md" ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
