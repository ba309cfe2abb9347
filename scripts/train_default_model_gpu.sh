#!/usr/bin/env bash
# Stage 16G of the default model (docs/default-model.md): stage 14C's recipe stretched over as
# many iterations as one lent GPU allows before a deadline.
#
# The recipe: default_model_stage3.yaml with the colour expert reading the crop before its
# jitter, the frozen section beside the other sources minus its labelled evaluation regions,
# all eight orientations, from the shipped default, batch 8, fp32 as on the CPU. A short probe
# run measures this machine's step rate; then every schedule (lr and teacher-temperature
# warm-ups, the heads' warm-up, the cosines) is stretched by one factor, epoch_length x 60
# epochs, so that the run ends before DEADLINE_S (seconds from the script's start). Lightning's
# max_time stops it cleanly if the rate drops. The teacher is exported to OUT.
#
#   OUT=/tmp/g16 DEADLINE_S=560 bash scripts/train_default_model_gpu.sh        # on a GPU
#   OUT=/tmp/g16 LENGTH=111 bash scripts/train_default_model_gpu.sh    # stage 16G as run: no probe
#   OUT=/tmp/g16 ACCEL=cpu WORKERS=1 PROBE_STEPS=20 DEADLINE_S=200 \
#       PY=.venv/bin/python bash scripts/train_default_model_gpu.sh              # a dry run
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
OUT=${OUT:-runs/default_model_stage16g_out}
DEADLINE_S=${DEADLINE_S:-560}
ACCEL=${ACCEL:-gpu}
WORKERS=${WORKERS:-$(( $(nproc --all) > 3 ? $(nproc --all) - 2 : 1 ))}   # a core for the main process
PROBE_STEPS=${PROBE_STEPS:-250}
LENGTH=${LENGTH:-}   # epoch_length; set, it replaces the probe and the deadline
SEED=${SEED:-0}
PY=${PY:-python3}
ROOT=${ROOT:-runs/default_model_stage16g_seed$SEED}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
# Packages the GPU machine lacks travel as wheels (docs/benchmarks.md); bench/gpu_all.sh, when it
# calls this script, has unpacked them already.
if [ -d .whl ] && [[ ":${PYTHONPATH:-}:" != *":/tmp/site:"* ]]; then
    for w in .whl/*.whl; do "$PY" -m zipfile -e "$w" /tmp/site; done
    export PYTHONPATH=/tmp/site:$PWD
fi
elapsed() { echo $(( $(date +%s) - start )); }
say() { echo "== [$(elapsed) s] $*"; }

source scripts/default_model_sources.sh   # $sources: the data of stages 12R-16G
fit() {   # fit EPOCH_LENGTH ROOT [--set ...]: the recipe with its schedule stretched
    local length=$1 root=$2; shift 2
    "$PY" -m gpfm_train fit --config gpfm_train/configs/default_model_stage3.yaml \
        --set model.schedule.freeze_backbone_epochs=10 \
        --set 'model.experts=[{name: colour, encoder: "baseline:colour-histogram", clean_input: true}]' \
        --set data.crops.clean_global_crops=true \
        --set model.backbone.init_weights=napari_gpfm/encoders/weights/default.safetensors \
        --set "$sources" --set data.crops.rot90_p=0.75 \
        --set model.schedule.epoch_length="$length" \
        --set seed_everything="$SEED" --set data.seed="$SEED" \
        --set trainer.accelerator="$ACCEL" --set data.num_workers="$WORKERS" \
        --set trainer.log_every_n_steps=25 --set trainer.checkpoint_every_n_steps=2000 \
        --set trainer.default_root_dir="$root" "$@"
}
# tqdm's last smoothed rate in a log (steps per second), or nothing
rate_of() {
    "$PY" - "$1" <<'EOF'
import re, sys
text = open(sys.argv[1], errors="replace").read().replace("\r", "\n")
hits = re.findall(r"([0-9.]+)(step/s|s/step)", text)
if hits:
    value, unit = hits[-1]
    print(float(value) if unit == "step/s" else 1.0 / float(value))
EOF
}

[ "$ACCEL" = gpu ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, timm, lightning; print('torch', torch.__version__, 'timm', timm.__version__, \
'lightning', lightning.__version__, 'cuda', torch.cuda.is_available())"
echo "cores $(nproc --all), workers $WORKERS"
"$PY" -c "from napari_gpfm.slides import open_slide; s = open_slide('napari_gpfm/data/CMU-1-Small-Region.svs'); \
print('sample slide', s.dimensions, s.read_region_mpp((0, 0), 224, 0.5).shape)" \
    || { echo "the sample slide does not open: fix the packages first"; exit 2; }

if [ -n "$LENGTH" ]; then
    length=$LENGTH
    max_time="00:23:59:00"
else
    say "probe: $PROBE_STEPS steps of the recipe"
    rm -rf "$ROOT-probe"
    # The backbone trains from the first step here: the run's head warm-up steps are cheaper.
    fit 50 "$ROOT-probe" --set trainer.max_steps="$PROBE_STEPS" \
        --set model.schedule.freeze_backbone_epochs=0 > "$OUT/probe.log" 2>&1 \
        || { tail -c 3000 "$OUT/probe.log"; echo "the probe failed"; exit 3; }
    rate=$(rate_of "$OUT/probe.log")
    [ -n "$rate" ] || { echo "no step rate in the probe's log"; exit 3; }
    # Left for fitting: the deadline less the set-up (the probe's own, ~30 s), export and copies.
    left=$(( DEADLINE_S - $(elapsed) - 60 ))
    length=$("$PY" -c "print(max(1, int($rate * 0.9 * $left / 60)))")
    say "probe: $rate steps/s; $left s left: epoch_length $length (x$("$PY" -c "print(round($length / 50, 2))") the recipe's 50), $(( length * 60 )) iterations"
    if [ "$length" -lt 50 ]; then
        echo "this machine is too slow to stretch the recipe: its own length, stopped by max_time"
        length=50
    fi
    max_time=$("$PY" -c "s = max(30, $left + 20); print(f'00:{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}')")
fi

say "stage 16G: $(( length * 60 )) iterations, max_time $max_time"
rm -rf "$ROOT"
(while sleep 5; do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader \
    2>/dev/null | sed "s/^/$(elapsed) s, /"; done) > "$OUT/gpu_util.csv" &
sampler=$!
fit "$length" "$ROOT" --set "trainer.extra={max_time: \"$max_time\"}" > "$OUT/run.log" 2>&1
status=$?
kill $sampler 2>/dev/null
say "fit exited $status; final rate $(rate_of "$OUT/run.log") steps/s"
find "$ROOT" -name metrics.csv -exec cp {} "$OUT/metrics.csv" \;
tail -n 2 "$OUT/metrics.csv" | cut -c1-400
[ -f "$ROOT/checkpoints/last.ckpt" ] || { tail -c 3000 "$OUT/run.log"; exit 4; }
"$PY" -m gpfm_train export "$ROOT/checkpoints/last.ckpt" --out "$OUT/teacher.safetensors"
# the logs come back short: tqdm's carriage returns made lines
for f in probe run; do
    [ -f "$OUT/$f.log" ] && tr '\r' '\n' < "$OUT/$f.log" | grep -v '^\s*$' | tail -n 60 > "$OUT/$f.tail"
done
rm -f "$OUT/probe.log" "$OUT/run.log"
ls -la "$OUT"
say "done"
