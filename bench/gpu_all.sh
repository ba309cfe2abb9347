#!/usr/bin/env bash
# Everything this project runs on a lent GPU, in one go (under 10 minutes on an H100/H200):
#   1. the embedded default model trained on the GPU (gpfm_train/configs/default_model_gpu.yaml,
#      two colour-augmentation variants side by side, each exported to $OUT);
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
want() { [[ " ${STEPS:-train recipe engine search} " == *" $1 "* ]]; }
python3 -c "from napari_gpfm.slides import open_slide; open_slide('napari_gpfm/data/CMU-1-Small-Region.svs')" \
    || { echo "the sample slide does not open: fix the packages first"; exit 2; }

if want train; then
step "default model on the GPU: mild and DINOv2 colour augmentation, side by side"
# Lightning's max_time starts with fitting, after ~20 s of tiling and set-up: it must end well
# inside the outer timeout, whose SIGTERM would kill the run and its DataLoader workers.
train=(python3 -m gpfm_train fit --config gpfm_train/configs/default_model_gpu.yaml
       --set data.num_workers=7 --set 'trainer.extra={max_time: "00:00:03:05"}')
timeout 235 "${train[@]}" --set trainer.default_root_dir=runs/gpu_mild \
    > /tmp/train_mild.log 2>&1 &
timeout 235 "${train[@]}" --set trainer.default_root_dir=runs/gpu_dinov2 \
    --set 'data.crops.color_jitter=[0.4, 0.4, 0.2, 0.1]' --set data.crops.grayscale_p=0.2 \
    --set data.crops.solarize_p=0.2 > /tmp/train_dinov2.log 2>&1 &
wait
for v in mild dinov2; do
    grep -v "^\s*$" "/tmp/train_$v.log" | tail -n 4
    python3 -m gpfm_train export "runs/gpu_$v/checkpoints/last.ckpt" \
        --out "$OUT/default_$v.safetensors"
    find "runs/gpu_$v" -name metrics.csv -exec cp {} "$OUT/metrics_$v.csv" \;
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
