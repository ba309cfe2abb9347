#!/usr/bin/env bash
# Everything this project runs on a lent GPU, in one go (about 10 minutes on an H100/H200;
# STEPS picks some of them):
#   1. the embedded default model's stage 16G (scripts/train_default_model_gpu.sh: the CPU
#      recipe stretched to TRAIN_S seconds, 150 by default, teacher exported to $OUT/train), and
#      that recipe's step alone on synthetic batches, profiled, beside its real DataLoader;
#   2. bench/train_gpu.py: step time, memory and MFU of the ViT-L/14 recipe, with and without
#      experts, DDP-style single device and the FSDP code path;
#   3. bench/gpu.py: the embedding engine's throughput (model-only, reading, end-to-end);
#   4. bench/search_gpu.py: exact top-100 over 10M x 1024 float16 vectors.
# Each step has its own time cap and a failing step does not stop the others. Packages the
# machine lacks can come as wheels in .whl/ (unpacked onto PYTHONPATH); the repository itself
# need not be installed. Results in $OUT: results.md, the exported models, their metrics.
#
#   OUT=/tmp/gpu bash bench/gpu_all.sh
#   OUT=/tmp/gpu STEPS="train engine" bash bench/gpu_all.sh     # some of the steps
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    for w in .whl/*.whl; do python3 -m zipfile -e "$w" /tmp/site; done
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm, lightning; print('torch', torch.__version__, 'timm', timm.__version__, 'lightning', lightning.__version__)"
nproc
step() { echo "== $1 ($(date +%T))"; }
want() { [[ " ${STEPS:-train smallstep recipe engine search} " == *" $1 "* ]]; }
python3 -c "from napari_gpfm.slides import open_slide; open_slide('napari_gpfm/data/CMU-1-Small-Region.svs')" \
    || { echo "the sample slide does not open: fix the packages first"; exit 2; }

if want train; then
step "default model: stage 16G, the CPU recipe stretched to the lease (scripts/train_default_model_gpu.sh)"
OUT="$OUT/train" DEADLINE_S=${TRAIN_S:-150} bash scripts/train_default_model_gpu.sh
fi

if want smallstep; then
step "default model recipe step (synthetic batches) and its real DataLoader alone"
source scripts/default_model_sources.sh   # $sources: stage 14C's data
small=(python3 bench/train_gpu.py --config default_model_stage3.yaml --cases none --out "$OUT/results.md"
       --set model.backbone.init_weights=napari_gpfm/encoders/weights/default.safetensors
       --set data.crops.rot90_p=0.75 --set data.crops.clean_global_crops=true
       --set "data.num_workers=$(( $(nproc --all) - 2 ))"
       --set "$sources")
timeout 90 "${small[@]}" --precision 32-true --batch-size 8 --steps 60 --warmup 10 --profile 20 \
    --loader-seconds 30
timeout 40 "${small[@]}" --precision bf16-mixed --batch-size 8 --steps 60 --warmup 10
for b in 32 128; do
    timeout 40 "${small[@]}" --precision 32-true --batch-size $b --steps 30 --warmup 10
done
fi

if want recipe; then
step "ViT-L/14 recipe training step: experts and none (bf16-mixed, batch 96)"
timeout 110 python3 bench/train_gpu.py --steps 6 --out "$OUT/results.md"
step "ViT-L/14 recipe training step, FSDP code path"
timeout 50 python3 bench/train_gpu.py --strategy fsdp --cases experts --steps 4 --out "$OUT/results.md"
fi
if want engine; then
step "embedding engine"
timeout 85 python3 bench/gpu.py --budget-s 70 --seconds 2 --out /tmp/engine.md
cat /tmp/engine.md >> "$OUT/results.md" 2>/dev/null
fi
if want search; then
step "exact search, 10M x 1024"
timeout 45 python3 bench/search_gpu.py --n 10000000 --out "$OUT/results.md"
fi
step "done"
