#!/usr/bin/env bash
# GPU check (issue 7): a short local federation whose site trains the digits example with `fedadmin start-mgpu`
# on this machine's GPUs; prints the backend, per-round time, final accuracy and peak GPU memory per GPU.
#
#   benchmarks/gpu_check.sh            # every visible GPU
#   GPUS=2 ROUNDS=5 benchmarks/gpu_check.sh
#
# Installs with the project's own steps (`make` creates .venv) on a bare machine; needs nvidia-smi.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v nvidia-smi >/dev/null || { echo "gpu_check: nvidia-smi not found: this check needs NVIDIA GPUs" >&2; exit 2; }
make -s .venv/.installed
PY=.venv/bin/python
FEDADMIN=.venv/bin/fedadmin
if ! $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: the installed torch ($($PY -c 'import torch; print(torch.__version__)')) sees no CUDA device" >&2
    exit 2
fi
GPUS=${GPUS:-$($PY -c 'import torch; print(torch.cuda.device_count())')}
ROUNDS=${ROUNDS:-5}
WS=$(mktemp -d -t fedlearn-gpu-check.XXXXXX)
SAMPLER=""
cleanup() {
    [ -n "$SAMPLER" ] && kill "$SAMPLER" 2>/dev/null || true
    $FEDADMIN poc stop --workspace "$WS" >/dev/null 2>&1 || true
    rm -rf "$WS"
}
trap cleanup EXIT

PORTS=$($PY -c 'import socket
ports = []
for _ in range(2):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); ports.append(s.getsockname()[1]); s.close()
print(*ports)')
read -r FL_PORT ADMIN_PORT <<<"$PORTS"
$FEDADMIN poc prepare --workspace "$WS" --clients 1 --fl-port "$FL_PORT" --admin-port "$ADMIN_PORT" >/dev/null
$PY - "$WS/mmar" "$ROUNDS" <<'PYEOF'
import json, shutil, sys
from pathlib import Path
dst, rounds = Path(sys.argv[1]), int(sys.argv[2])
shutil.copytree("examples/digits", dst, ignore=shutil.ignore_patterns("__pycache__"))
cfg_path = dst / "config" / "config_fed_server.json"
cfg = json.loads(cfg_path.read_text())
cfg.update(min_num_clients=1, num_rounds=rounds, wait_after_min_clients=0)
cfg_path.write_text(json.dumps(cfg))
PYEOF
$FEDADMIN poc start --workspace "$WS" >/dev/null
export FEDADMIN_KIT="$WS/admin"

# Peak memory per GPU while the federation runs (nvidia-smi's view: every process, context included).
nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 200 > "$WS/gpu_memory.csv" &
SAMPLER=$!

$FEDADMIN set-run 1 >/dev/null
$FEDADMIN deploy "$WS/mmar" all >/dev/null
START=$(date +%s.%N)
$FEDADMIN --json start-mgpu "$GPUS" all >"$WS/start.json" || { cat "$WS/start.json"; exit 1; }
$FEDADMIN --json wait --timeout 900 >/dev/null || { echo "gpu_check: the run did not complete" >&2;
    $FEDADMIN status || true; tail -n 30 "$WS/site-1/run_1/log.txt" >&2 || true; exit 1; }
END=$(date +%s.%N)
kill "$SAMPLER" 2>/dev/null || true
SAMPLER=""

$PY - "$WS" "$GPUS" "$START" "$END" <<'PYEOF'
import json, sys
from pathlib import Path
ws, gpus, start, end = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
summary = json.loads((ws / "server" / "run_1" / "summary.json").read_text())
log = (ws / "site-1" / "run_1" / "log.txt").read_text()
backend = "nccl" if "process group (nccl)" in log else "gloo" if "process group (gloo)" in log else "unknown"
peak = {}
for line in (ws / "gpu_memory.csv").read_text().splitlines():
    try:
        index, used = (int(x) for x in line.split(","))
    except ValueError:
        continue
    peak[index] = max(peak.get(index, 0), used)
print(f"start-mgpu {gpus}: {summary['status']}, backend {backend}, {end - start:.1f} s from start to completion")
for r in summary["rounds"]:
    note = " (from the round's opening: includes starting the ranks)" if r is summary["rounds"][0] else ""
    print(f"  round {r['round']}: {r['duration_s']:.2f} s{note}")
print(f"  final accuracy: {summary['final_metrics'].get('site-1', {}).get('accuracy', float('nan')):.4f}")
for index in sorted(peak):
    print(f"  GPU {index}: peak {peak[index]} MiB used")
sys.exit(0 if summary["status"] == "completed" and backend == "nccl" else 1)
PYEOF
