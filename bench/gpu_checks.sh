#!/usr/bin/env bash
# Every measurement the GPU targets of bench/RESULTS.md wait for, in one run on one GPU machine, most needed first:
#
#   bench/gpu_checks.sh OUT_DIR [--quick]
#
# Writes OUT_DIR/gpu_checks.log (every check's whole output) and prints each check's table. A check that fails
# does not stop the others; one that would start after DEADLINE seconds (default 480) is skipped, so a run on a
# lent machine returns what it measured within its time. --quick runs the same commands at toy sizes (a CPU
# rehearsal of the script). The machine needs torch with CUDA and the packages that bench/gpu_wheels.sh fetches
# (for a machine without network: run it where pip works, copy .whl/ along, and set WHEELS=.whl).
set -u
out=$(mkdir -p "${1:?usage: bench/gpu_checks.sh OUT_DIR [--quick]}" && cd "$1" && pwd) || exit 1
quick=${2:-}
deadline=${DEADLINE:-480}
log="$out/gpu_checks.log"
: >"$log"
cd "$(dirname "$0")/.."
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/sonogen-site \
    "$WHEELS"/*.whl || exit 1
  export PYTHONPATH="/tmp/sonogen-site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:$PWD/bench:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true
started=$(date +%s)

check() {  # check NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  if (( $(date +%s) - started > deadline )); then
    echo "== $name: skipped (past the ${deadline} s deadline)" | tee -a "$log"
    return
  fi
  echo "== $name: $*" | tee -a "$log"
  local begin=$(date +%s)
  timeout "$limit" "$@" >>"$log.part" 2>&1
  local rc=$?
  grep -v -e "cannot be saved" -e "requires torchvision" "$log.part" >>"$log"
  grep -e "^|" -e "^device" -e "^baseline" -e "^in-process" -e "passed" -e "failed" -e "Error" "$log.part" | tail -n 40
  rm -f "$log.part"
  echo "   $name: exit $rc after $(( $(date +%s) - begin )) s" | tee -a "$log"
}

python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" | tee -a "$log"
git log -1 --format='commit %h %s' 2>/dev/null | tee -a "$log"

if [ "$quick" = "--quick" ]; then
  check syncbn 120 python3 -m pytest -q -p no:cacheprovider tests/test_distributed.py -k sync_batchnorm
  check ddp-overhead 120 python3 bench/ddp_speed.py --ranks 1 --steps 2 --families dcgan
  check train-throughput 300 python3 bench/train_throughput.py --size 32 --steps 2 --warmup 1 --flop-steps 1 --batch 4
  check generate 120 python3 bench/generate_throughput.py --image-size 64 --n 128 --batches 32 --repeats 1
  check endpoint 120 python3 bench/endpoint_latency.py --torch --image-size 32 --requests 16 --concurrency 1,4 \
    --max-batch 4 --precision bf16
  check endpoint-n16 120 python3 bench/endpoint_latency.py --torch --image-size 32 --requests 8 --n 4 --concurrency 4 \
    --max-batch 16 --precision bf16
  check ldm-vs-diffusers 180 python3 bench/ldm_vs_diffusers.py --image-size 32 --n 4 --repeats 1
  check sampling-precision 300 python3 bench/sampling_precision.py --n 4 --repeats 1
  exit 0
fi
# issue-sized runs on one GPU (bench/RESULTS.md says what each target is)
check syncbn 120 python3 -m pytest -q -p no:cacheprovider tests/test_distributed.py -k sync_batchnorm
check ddp-overhead 120 python3 bench/ddp_speed.py --ranks 1 --steps 30
check train-throughput 180 python3 bench/train_throughput.py --size 128 --steps 20
check dcgan-paper-train 90 python3 bench/dcgan_throughput.py --device cuda --steps 10
check generate 120 python3 bench/generate_throughput.py --n 8192 --batches 256,1024 --channels-last
check endpoint 120 python3 bench/endpoint_latency.py --torch --image-size 256 --requests 1024 --concurrency 1,64 \
  --max-batch 64 --precision bf16
check endpoint-n16 90 python3 bench/endpoint_latency.py --torch --image-size 256 --requests 256 --n 16 \
  --concurrency 64 --max-batch 256 --precision bf16
check ldm-vs-diffusers 150 python3 bench/ldm_vs_diffusers.py --image-size 64 --n 64 --compile
check sampling-precision 150 python3 bench/sampling_precision.py --n 256
