#!/bin/bash
# old engine/ against new, in-process, lockstep and jittered arrivals: ab.sh OUT REPEATS
. /root/env.sh
M=$MODELS/llama-1b-bfloat16
[ -f $M/config.json ] || python3 -m mlx_serving.deployments.cli make-model $M --size 1b --dtype bfloat16 >/dev/null 2>&1
mkdir -p /root/pkg-old/mlx_serving
# scratch/old/engine: the old engine/, from `git archive OLD_REV engine` unpacked in scratch/old
ln -sfn $PWD/scratch/old/engine /root/pkg-old/mlx_serving/engine
for d in deployments canary native bench; do ln -sfn $PWD/$d /root/pkg-old/mlx_serving/$d; done
for rep in $(seq ${2:-2}); do
  for side in old new; do
    pp=/root/pkg; [ $side = old ] && pp=/root/pkg-old
    PYTHONPATH=/root/site:$pp python3 docs/results/run11-h100/probe_stagger.py --model $M --repeats 1 \
      --jitter-ms 0 20 --json $1/stagger-$side-$rep.json > $1/stagger-$side-$rep.log 2>&1
    echo "$side $rep"; grep '^{' $1/stagger-$side-$rep.log | cut -c1-300
  done
done
