#!/usr/bin/env bash
# The GPU readiness suite, in <= 8 minutes on one GPU:
#   1. benchmarks/roofline.py on CUDA with bfloat16 autocast: the sparse and
#      soft layer rows and the V-MoE B/16 and V-JetMoE-T training steps
#      (GPU batches), each against its floor on this GPU;
#   2. the device-independent tests (marked `device`) with --device cuda;
#   3. OUT_DIR/gpu_suite.json: the GPU model, torch, every step's exit
#      status and seconds, with the roofline JSON and the pytest report
#      beside it.
# Usage: benchmarks/gpu_suite.sh [OUT_DIR] [--device cpu]
#   --device cpu: the same script as a CPU smoke test (tiny model rows).
set -u
cd "$(dirname "$0")/.."
OUT_DIR=work_dirs/gpu_suite
DEVICE=cuda
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        *) OUT_DIR="$1"; shift ;;
    esac
done
PY=${PYTHON:-python}
mkdir -p "$OUT_DIR"
if [ "$DEVICE" = cuda ]; then
    ROOFLINE=(--sparse --soft --models vmoe-b16 vjetmoe-t --amp)
    ROOF_LIMIT=330
    TEST_LIMIT=150
else
    ROOFLINE=(--models vmoe-tiny --batch 8)
    ROOF_LIMIT=600
    TEST_LIMIT=900  # a shared 2-core CPU; the 8 minutes are for a GPU
fi
if ! $PY -c "import torch, sys; sys.exit(0 if torch.device('$DEVICE').type != 'cuda' or torch.cuda.is_available() else 1)"; then
    echo "gpu_suite: --device $DEVICE but torch sees no CUDA device" >&2
    exit 2
fi
STATUS=()
step() {  # name, seconds limit, command...
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    local rc=$?
    STATUS+=("$name=$rc:$((SECONDS - start))")
    echo "gpu_suite: $name exited $rc after $((SECONDS - start)) s (log: $OUT_DIR/$name.log)"
}
step roofline "$ROOF_LIMIT" $PY benchmarks/roofline.py "${ROOFLINE[@]}" \
    --device "$DEVICE" --repeats 5 --json "$OUT_DIR/roofline.json"
step tests "$TEST_LIMIT" $PY -m pytest -p no:cacheprovider -q -m device \
    --device "$DEVICE" --junitxml "$OUT_DIR/tests.xml" tests
$PY - "$OUT_DIR" "$DEVICE" "${STATUS[@]}" <<'PYEOF'
import json, os, platform, sys
import torch
out_dir, device, *status = sys.argv[1:]
sys.path.insert(0, os.getcwd())
from moe_plugin.fileio import atomic_write
summary = dict(
    device=device,
    gpu=(torch.cuda.get_device_name(0) if device.startswith('cuda')
         else None),
    cpu=platform.processor() or platform.machine(),
    torch=torch.__version__,
    cuda=torch.version.cuda,
    steps={s.split('=')[0]: dict(exit=int(s.split('=')[1].split(':')[0]),
                                 seconds=int(s.split(':')[1]))
           for s in status},
    roofline='roofline.json', tests='tests.xml')
def write(tmp):
    with open(tmp, 'w') as f:
        json.dump(summary, f, indent=2)
atomic_write(os.path.join(out_dir, 'gpu_suite.json'), write)
print(json.dumps(summary, indent=2))
sys.exit(max((v['exit'] for v in summary['steps'].values()), default=0))
PYEOF
