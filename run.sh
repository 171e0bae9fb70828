#!/usr/bin/env bash
# Launch a run:   ./run.sh [--gpus N] [torchrun multi-node options] CONFIG.yaml [--key=value ...]
#
#   ./run.sh --gpus 8 configs/run7.yaml                 # one node, 8 GPUs (torchrun, NCCL)
#   ./run.sh --gpus 0 configs/run7.yaml --max_steps=10  # CPU, one process (gloo)
#   ./run.sh --gpus 2 --cpu configs/micro.yaml          # 2 CPU processes (gloo), for testing DDP
#   ./run.sh --gpus 8 --nnodes 2 --node_rank 0 --rdzv_endpoint host0:29500 configs/run7.yaml
#   ./run.sh configs/tiny.yaml                          # a pipeline config: every stage in order
#
# Without --gpus: all visible GPUs, or the CPU when there are none. A config with a `pipeline:`
# list runs pipeline.py (corpus → prepare → train stages → merge → sample → eval) instead; there
# --gpus N (and --cpu) run each training stage as N torchrun processes (its `train_processes` key).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi

gpus=""; cpu=0; torchrun_args=(); rest=()
while [ $# -gt 0 ]; do
  case "$1" in
    --gpus) gpus="$2"; shift 2 ;;
    --gpus=*) gpus="${1#*=}"; shift ;;
    --cpu) cpu=1; shift ;;
    --nnodes|--node_rank|--rdzv_endpoint|--rdzv_backend|--rdzv_id|--master_addr|--master_port|--max_restarts)
      torchrun_args+=("$1" "$2"); shift 2 ;;
    --nnodes=*|--node_rank=*|--rdzv_endpoint=*|--rdzv_backend=*|--rdzv_id=*|--master_addr=*|--master_port=*|--max_restarts=*)
      torchrun_args+=("$1"); shift ;;
    *) rest+=("$1"); shift ;;
  esac
done
[ ${#rest[@]} -gt 0 ] || { echo "usage: ./run.sh [--gpus N] CONFIG.yaml [--key=value ...]" >&2; exit 2; }

if grep -qE '^pipeline:' "${rest[0]}" 2>/dev/null; then
  # pipeline.py launches each training stage itself (under torchrun when its `train_processes` key is > 1)
  if [ ${#torchrun_args[@]} -gt 0 ]; then
    echo "run.sh: ${torchrun_args[*]}: multi-node options are for training configs, not pipeline configs" >&2; exit 2
  fi
  extra=()
  if [ "$gpus" = "0" ]; then extra+=(--train_processes=1 --device=cpu); elif [ -n "$gpus" ]; then extra+=("--train_processes=$gpus"); fi
  if [ "$cpu" = "1" ]; then extra+=(--device=cpu); fi
  exec "$PY" pipeline.py "${rest[@]}" "${extra[@]}"
fi

if [ -z "$gpus" ]; then
  gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
fi
if [ "$gpus" = "0" ]; then
  exec "$PY" train.py "${rest[@]}" --device=cpu
fi
if [ "$cpu" = "1" ]; then rest+=("--device=cpu"); fi
if [ ${#torchrun_args[@]} -eq 0 ]; then torchrun_args=(--standalone); fi
exec "$PY" -m torch.distributed.run "${torchrun_args[@]}" --nproc_per_node "$gpus" train.py "${rest[@]}"
