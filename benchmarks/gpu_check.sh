#!/usr/bin/env bash
# GPU check (issues 7 and 21): a short local federation whose site trains an example MMAR with `fedadmin start-mgpu`
# on every GPU of this machine, then (segmentation) the same on one GPU; prints seconds per round, images per second
# per GPU, peak GPU memory, the final Dice (or accuracy), and the multi-GPU speed-up.
#
#   benchmarks/gpu_check.sh                          # segmentation-3d at GPU scale: 128^3 volumes, 256 per site
#   MMAR=digits benchmarks/gpu_check.sh              # the digits check of issue 7 (every GPU, no 1-GPU baseline)
#   GPUS=2 ROUNDS=3 VOLUME_SIZE=96 NUM_TRAIN=128 benchmarks/gpu_check.sh
#   PY=python3 WHEELS=/path/to/wheels benchmarks/gpu_check.sh   # no make, no network (benchmarks/README.md)
#   RESULTS=gpu_check.json benchmarks/gpu_check.sh   # also write the figures as JSON
#
# Without PY it installs with the project's own steps (`make` creates .venv). With PY it uses that interpreter as
# it is, with this checkout on PYTHONPATH, after installing the wheels in WHEELS (if set) into a temporary folder
# with `pip install --no-index --no-deps --target`. Needs nvidia-smi; REHEARSE_ON_CPU=1 runs the same steps with gloo
# ranks on CPU (no GPU figures), to check the script itself on a machine without GPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MMAR=${MMAR:-segmentation}
case "$MMAR" in
    segmentation|segmentation-3d) MMAR=segmentation-3d ;;
    digits) ;;
    *) echo "gpu_check: MMAR must be segmentation or digits, got '$MMAR'" >&2; exit 2 ;;
esac
CPU=${REHEARSE_ON_CPU:-0}

if [ "$CPU" != 1 ]; then
    command -v nvidia-smi >/dev/null || { echo "gpu_check: nvidia-smi not found: this check needs NVIDIA GPUs" >&2; exit 2; }
fi
WS=$(mktemp -d -t fedlearn-gpu-check.XXXXXX)
SAMPLER=""
FEDADMIN=()
cleanup() {
    [ -n "$SAMPLER" ] && kill "$SAMPLER" 2>/dev/null || true
    [ ${#FEDADMIN[@]} -gt 0 ] && "${FEDADMIN[@]}" poc stop --workspace "$WS" >/dev/null 2>&1 || true
    rm -rf "$WS"
}
trap cleanup EXIT
if [ -n "${PY:-}" ]; then
    if [ -n "${WHEELS:-}" ]; then
        DEPS=$WS/deps
        "$PY" -m pip install -q --upgrade --no-index --no-deps --target "$DEPS" "$WHEELS"/*.whl
        export PYTHONPATH="$DEPS:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    else
        export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    fi
    FEDADMIN=("$PY" -m fedadmin.cli)
else
    make -s .venv/.installed
    PY=.venv/bin/python
    FEDADMIN=(.venv/bin/fedadmin)
fi
NEEDS="grpc, google.protobuf, cryptography, yaml, psutil, numpy, ml_dtypes, torch, click, rich"
[ "$MMAR" = segmentation-3d ] && NEEDS="$NEEDS, monai, nibabel"
"$PY" -c "import $NEEDS" 2>/dev/null || { echo "gpu_check: $PY cannot import all of: $NEEDS" \
    "(put the missing wheels in a folder and set WHEELS=that folder: benchmarks/README.md)" >&2;
    "$PY" -c "import $NEEDS" || true; exit 2; }
if [ "$CPU" != 1 ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: the installed torch ($("$PY" -c 'import torch; print(torch.__version__)')) sees no CUDA device" >&2
    exit 2
fi
if [ "$CPU" = 1 ]; then
    GPUS=${GPUS:-2}
else
    GPUS=${GPUS:-$("$PY" -c 'import torch; print(torch.cuda.device_count())')}
fi
ROUNDS=${ROUNDS:-5}
TIMEOUT=${TIMEOUT:-1800}
SINGLE=${SINGLE:-$([ "$MMAR" = segmentation-3d ] && [ "$GPUS" -gt 1 ] && echo 1 || echo 0)}

PORTS=$("$PY" -c 'import socket
ports = []
for _ in range(2):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); ports.append(s.getsockname()[1]); s.close()
print(*ports)')
read -r FL_PORT ADMIN_PORT <<<"$PORTS"
"${FEDADMIN[@]}" poc prepare --workspace "$WS" --clients 1 --fl-port "$FL_PORT" --admin-port "$ADMIN_PORT" >/dev/null

# The MMAR copy: one site, ROUNDS rounds, no cross-site validation; segmentation at GPU scale (each knob overridable).
export VOLUME_SIZE=${VOLUME_SIZE:-128} NUM_TRAIN=${NUM_TRAIN:-256} NUM_VAL=${NUM_VAL:-16} ROI_SIZE=${ROI_SIZE:-96}
export BATCH_SIZE=${BATCH_SIZE:-2} NUM_SAMPLES=${NUM_SAMPLES:-2} CHANNELS=${CHANNELS:-16,32,64,128,256}
export RES_UNITS=${RES_UNITS:-2} EPOCHS=${EPOCHS:-1} LEARNING_RATE=${LEARNING_RATE:-0.002}
export SW_BATCH_SIZE=${SW_BATCH_SIZE:-4} AMP=${AMP:-1} CHANNELS_LAST=${CHANNELS_LAST:-1}
"$PY" - "examples/$MMAR" "$WS/mmar" "$ROUNDS" <<'PYEOF'
import json, os, shutil, sys
from pathlib import Path
src, dst, rounds = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
def update(name, change):
    path = dst / "config" / name
    cfg = json.loads(path.read_text())
    change(cfg)
    path.write_text(json.dumps(cfg, indent=1))
update("config_fed_server.json", lambda c: c.update(min_num_clients=1, num_rounds=rounds, wait_after_min_clients=0,
                                                     heart_beat_timeout=600))
update("config_fed_client.json", lambda c: c.update(cross_site_validate=False))
if src.endswith("segmentation-3d"):
    env = os.environ
    channels = [int(c) for c in env["CHANNELS"].split(",")]
    size = int(env["VOLUME_SIZE"])
    model = {"channels": channels, "num_res_units": int(env["RES_UNITS"])}
    update("config_fed_server.json", lambda c: c["initial_model"]["args"].update(model))
    site = {"num_objs": 12, "rad_min": max(2, size // 16), "rad_max": max(3, size // 4 - 1), "noise_max": 0.3,
            "intensity_scale": 1.0, "seed": 1}
    update("config_train.json", lambda c: c["trainer"]["args"].update(
        **model, volume_size=size, num_train=int(env["NUM_TRAIN"]), num_val=int(env["NUM_VAL"]),
        roi_size=int(env["ROI_SIZE"]), batch_size=int(env["BATCH_SIZE"]), num_samples=int(env["NUM_SAMPLES"]),
        epochs_per_round=int(env["EPOCHS"]), learning_rate=float(env["LEARNING_RATE"]),
        sw_batch_size=int(env["SW_BATCH_SIZE"]), amp=env["AMP"] == "1", channels_last=env["CHANNELS_LAST"] == "1",
        cpu_threads=0, sites={"site-1": site}))
PYEOF
"${FEDADMIN[@]}" poc start --workspace "$WS" >/dev/null
export FEDADMIN_KIT="$WS/admin"

# train RUN GPUS: one run on GPUS ranks (start-mgpu) or one process (GPUS=1); nvidia-smi samples memory meanwhile.
train() {
    local run=$1 gpus=$2
    if [ "$CPU" != 1 ]; then
        # Peak memory per GPU while the run trains (nvidia-smi's view: every process, context included).
        nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 200 > "$WS/gpu_memory_$run.csv" &
        SAMPLER=$!
    fi
    "${FEDADMIN[@]}" set-run "$run" >/dev/null
    "${FEDADMIN[@]}" deploy "$WS/mmar" all >/dev/null
    local start end
    start=$(date +%s.%N)
    if [ "$gpus" -gt 1 ]; then
        "${FEDADMIN[@]}" --json start-mgpu "$gpus" all >"$WS/start.json" || { cat "$WS/start.json"; exit 1; }
    else
        "${FEDADMIN[@]}" --json start all >"$WS/start.json" || { cat "$WS/start.json"; exit 1; }
    fi
    if ! "${FEDADMIN[@]}" --json wait --timeout "$TIMEOUT" >/dev/null; then
        echo "gpu_check: run $run ($gpus GPUs) did not complete; the site's error (an out-of-memory one names the" \
             "knob to lower: set it in the environment, e.g. BATCH_SIZE=1):" >&2
        "${FEDADMIN[@]}" status site-1 || true
        tail -n 40 "$WS/site-1/run_$run/logs/worker.log" >&2 || true
        exit 1
    fi
    end=$(date +%s.%N)
    [ -n "$SAMPLER" ] && kill "$SAMPLER" 2>/dev/null || true
    SAMPLER=""
    echo "$run $gpus $start $end" >> "$WS/runs.txt"
}

train 1 "$GPUS"
[ "$SINGLE" = 1 ] && train 2 1

"$PY" - "$WS" "$MMAR" "$CPU" "${RESULTS:-}" <<'PYEOF'
import json, re, statistics, sys
from pathlib import Path
ws, mmar, cpu, results = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", sys.argv[4]
metric = "dice" if mmar == "segmentation-3d" else "accuracy"
trained = re.compile(r"site-1 rank (\d+): trained (\d+) crops of \S+ in ([\d.]+) s: ([\d.]+) images/s, "
                     r"peak GPU memory (\d+) MiB")
figures, ok = [], True
for line in (ws / "runs.txt").read_text().splitlines():
    run, gpus, start, end = line.split()
    run, gpus = int(run), int(gpus)
    summary = json.loads((ws / "server" / f"run_{run}" / "summary.json").read_text())
    log = (ws / "site-1" / f"run_{run}" / "logs" / "worker.log").read_text()
    backend = "nccl" if "process group (nccl)" in log else "gloo" if "process group (gloo)" in log else "one process"
    rounds = [r["duration_s"] for r in summary["rounds"]]
    # The first round includes starting the ranks, caching the volumes and cuDNN's autotuning: left out when possible.
    steady = rounds[1:] or rounds
    per_rank: dict[int, list[tuple[float, int]]] = {}
    for m in trained.finditer(log):
        per_rank.setdefault(int(m.group(1)), []).append((float(m.group(4)), int(m.group(5))))
    rate = {r: statistics.mean(x[0] for x in v[1:] or v) for r, v in per_rank.items()}
    torch_peak = {r: max(x[1] for x in v) for r, v in per_rank.items()}
    smi_peak: dict[int, int] = {}
    memory = ws / f"gpu_memory_{run}.csv"
    for row in memory.read_text().splitlines() if memory.is_file() else []:
        try:
            index, used = (int(x) for x in row.split(","))
        except ValueError:
            continue
        smi_peak[index] = max(smi_peak.get(index, 0), used)
    final = summary["final_metrics"].get("site-1", {}).get(metric, float("nan"))
    fig = {"run": run, "gpus": gpus, "backend": backend, "status": summary["status"],
           "wall_s": float(end) - float(start), "round_s": rounds, "s_per_round": statistics.mean(steady),
           "images_per_s_per_gpu": rate, "torch_peak_mib": torch_peak, "nvidia_smi_peak_mib": smi_peak,
           metric: final}
    figures.append(fig)
    print(f"{mmar}, {gpus} GPU(s), {backend}: {summary['status']}, {fig['wall_s']:.1f} s from start to completion")
    print("  seconds per round: " + ", ".join(f"{d:.2f}" for d in rounds) +
          f" (steady: {fig['s_per_round']:.2f} s, the first round left out)")
    for r in sorted(rate):
        print(f"  rank {r}: {rate[r]:.1f} images/s, peak {torch_peak[r]} MiB allocated by torch")
    for index in sorted(smi_peak):
        print(f"  GPU {index}: peak {smi_peak[index]} MiB used (nvidia-smi)")
    print(f"  {metric} after {len(rounds)} rounds: {final:.4f}")
    want = "gloo" if cpu else "nccl"
    ok = ok and summary["status"] == "completed" and (gpus == 1 or backend == want)
if len(figures) == 2:
    many, one = figures
    speedup = one["s_per_round"] / many["s_per_round"]
    throughput = sum(many["images_per_s_per_gpu"].values()) / max(sum(one["images_per_s_per_gpu"].values()), 1e-9)
    print(f"speed-up of {many['gpus']} GPUs over 1: {speedup:.2f}x per round, {throughput:.2f}x training images/s")
    figures.append({"speedup_per_round": speedup, "speedup_images_per_s": throughput})
if results:
    Path(results).write_text(json.dumps(figures, indent=1))
sys.exit(0 if ok else 1)
PYEOF
