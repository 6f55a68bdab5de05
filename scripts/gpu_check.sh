#!/usr/bin/env bash
# byol3d on a GPU in one go (about 6-8 minutes on an H100/H200):
#   1. a bf16 training smoke run with train.compile, channels_last and device-side views
#      (transforms.views: batched) on synthetic CT phantoms, and a short one on synthetic
#      endoscopy frames with the batched 2D views (colour ops on the device);
#   2. the full benchmark (ResNet-50 3D at 128^3, batch 8; the view-path CPU costs and the
#      end-to-end rows from .nii.gz files to the step), without the file-synthesis data rows
#      and the start-up rows (CPU and disk measures, made on the CPU machine);
#   3. one summary, $OUT/gpu_check.json: samples/s, peak memory, achieved TFLOP/s against the
#      bf16 dense peak and the single-conv roof, end-to-end vs step-only, and the smoke run.
#
#   scripts/gpu_check.sh            # on the GPU machine, from the repository root
#   scripts/gpu_check.sh --dry      # the same steps on a CPU at toy sizes, in a minute or two
#
# Results go to $OUT (default /tmp/byol3d-gpu-check). Python is $PYTHON (default python3);
# torch must be there already (its CUDA build); monai, pytorch-ignite and the other
# dependencies are installed if missing: from wheels in ./.whl when that folder exists (a
# machine without network), else from the package index. It stops with one line saying
# what is missing when neither works.
set -euo pipefail

DRY=0
[[ "${1:-}" == "--dry" ]] && DRY=1
OUT="${OUT:-/tmp/byol3d-gpu-check}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log() { echo "[gpu_check] $*" >&2; }
fail() { echo "gpu_check: error: $*" >&2; exit 1; }

"$PY" -c "import torch" 2>/dev/null || fail "$PY has no torch; install the CUDA build of torch first"
REQS=(monai==1.6.1 pytorch-ignite==0.5.5 nibabel SimpleITK pyyaml tqdm matplotlib kornia pillow scikit-learn)
MODS=(monai ignite nibabel SimpleITK yaml tqdm matplotlib kornia PIL sklearn)
missing=()
for i in "${!MODS[@]}"; do
  "$PY" -c "import ${MODS[$i]}" 2>/dev/null || missing+=("${REQS[$i]}")
done
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  if [[ -d .whl ]]; then
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/byol3d-site .whl/*.whl \
      || fail "cannot install the wheels in .whl (${missing[*]} missing)"
    export PYTHONPATH="$PYTHONPATH:/tmp/byol3d-site"
  else
    "$PY" -m pip install -q "${missing[@]}" \
      || fail "cannot install ${missing[*]} (no network? put their wheels in ./.whl)"
  fi
fi
"$PY" -c "import monai, ignite, byol3d" || fail "byol3d does not import after installing"

if ((DRY)); then
  SMOKE=(model.encoder=resnet10 transforms.roi_size=[32,32,32] model.hidden_dim=64
         model.projection_dim=16 train.max_epochs=1 train.device=cpu train.amp=none
         train.compile=false 'train.channels_last="on"')
  BENCH=(--tiny --device cpu)
  FRAMES=(train.device=cpu train.amp=none)
  N=6
else
  SMOKE=(model.encoder=resnet50 transforms.roi_size=[128,128,128] train.max_epochs=2
         train.device=cuda train.amp=bf16 train.compile=true 'train.channels_last="on"')
  BENCH=(--no-switches --skip-data --skip-startup)  # start-up is a CPU and disk measure
  FRAMES=(train.device=cuda train.amp=bf16 'train.channels_last="on"')
  N=24
fi

log "1/3 smoke run (${SMOKE[*]})"
DATA="$OUT/smoke_data"
RUN="$OUT/smoke_run"
rm -rf "$RUN"
"$PY" -m byol3d demo-data "$DATA" --n "$N" >/dev/null
start=$(date +%s.%N)
"$PY" -m byol3d pretrain configs/demo_ct.yaml "data.root=$DATA/images" "output_dir=$RUN" \
  transforms.views=batched transforms.pixdim=null train.batch_size=4 train.progress=false \
  train.tensorboard=false data.num_workers=4 data.val_fraction=0.2 "${SMOKE[@]}" \
  > "$OUT/smoke.log" 2>&1 || { tail -20 "$OUT/smoke.log" >&2; fail "the smoke run failed (log: $OUT/smoke.log)"; }
end=$(date +%s.%N)
log "1/3 frames smoke run (transforms.views=batched ${FRAMES[*]})"
"$PY" -m byol3d demo-data "$OUT/frames_data" --kind endoscopy --n 16 >/dev/null
rm -rf "$OUT/frames_run"
"$PY" -m byol3d pretrain configs/demo_endoscopy.yaml "data.root=$OUT/frames_data/images" \
  "output_dir=$OUT/frames_run" transforms.views=batched train.max_epochs=1 train.batch_size=4 \
  train.progress=false data.num_workers=2 "${FRAMES[@]}" > "$OUT/frames.log" 2>&1 \
  || { tail -20 "$OUT/frames.log" >&2; fail "the frames smoke run failed (log: $OUT/frames.log)"; }

log "2/3 benchmark (${BENCH[*]})"
"$PY" scripts/benchmark.py "${BENCH[@]}" --json "$OUT/bench.json" --markdown "$OUT/bench.md" \
  > "$OUT/bench.log" 2>&1 || { tail -20 "$OUT/bench.log" >&2; fail "the benchmark failed (log: $OUT/bench.log)"; }

log "3/3 summary"
"$PY" - "$OUT" "$RUN" "$start" "$end" <<'EOF'
import csv, json, sys
from pathlib import Path

out, run, start, end = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
bench = json.loads((out / "bench.json").read_text())
rows = {r["name"]: r for r in bench["rows"]}
step = rows.get("byol3d_defaults", {})
metrics = list(csv.DictReader((run / "metrics.csv").open()))
frames = list(csv.DictReader((out / "frames_run" / "metrics.csv").open()))
summary = {
    "machine": bench["machine"],
    "versions": bench["versions"],
    "smoke": {
        "seconds": round(end - start, 1),
        "iterations": len(metrics),
        "final_loss": float(metrics[-1]["loss"]) if metrics else None,
        "losses_finite": all(float(r["loss"]) == float(r["loss"]) for r in metrics),
    },
    "frames_smoke": {
        "iterations": len(frames),
        "losses_finite": all(float(r["loss"]) == float(r["loss"]) for r in frames),
    },
    "step": {k: step.get(k) for k in ("encoder", "size", "batch", "precision", "samples_per_s", "peak_mem_mib", "tflops")},
    "flops": bench["flops"],
    "ratios": bench["ratios"],
    "intervals": bench.get("intervals", {}),
    "end_to_end": [r for r in bench["rows"] if r["section"] == "end_to_end"],
    "views_cpu_ms": {f"{r['name']}@{r['roi']}": r["cpu_ms_per_sample"] for r in bench["rows"] if r["section"] == "views"},
}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=str))
print(json.dumps({k: summary[k] for k in ("smoke", "frames_smoke", "step", "ratios")}, indent=2, default=str))
EOF
log "done: $OUT/gpu_check.json"
