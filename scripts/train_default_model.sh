#!/usr/bin/env bash
# Rebuild the embedded default model from the real H&E in this repository, then measure it.
# Stages 1-2 (their own configs), then default_model_stage3.yaml five times (stages 3-7), each
# from the previous stage's exported teacher; the shipped weights are the mean of the teachers
# of stages 3-7 (docs/default-model.md). About 3 hours on 2 CPU cores.
# Run from the repository root with the venv installed.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1   # one torch thread + one data worker: the fastest split of 2 cores
py=.venv/bin
cfg=gpfm_train/configs
last_stage=7
$py/gpfm-train fit --config $cfg/default_model.yaml
$py/gpfm-train export runs/default_model/checkpoints/last.ckpt \
    --out runs/default_model/teacher.safetensors
$py/gpfm-train fit --config $cfg/default_model_stage2.yaml
$py/gpfm-train export runs/default_model_stage2/checkpoints/last.ckpt \
    --out runs/default_model_stage2/teacher.safetensors
previous=runs/default_model_stage2/teacher.safetensors
teachers=()
for stage in $(seq 3 $last_stage); do
    root=runs/default_model_stage$stage
    $py/gpfm-train fit --config $cfg/default_model_stage3.yaml \
        --set model.backbone.init_weights=$previous --set trainer.default_root_dir=$root
    $py/gpfm-train export $root/checkpoints/last.ckpt --out $root/teacher.safetensors
    previous=$root/teacher.safetensors
    teachers+=("$previous")
done
# The shipped model: the mean of every stage end since the fine tiling began (weight averaging).
$py/gpfm-train average "${teachers[@]}" --out napari_gpfm/encoders/weights/default.safetensors
$py/python scripts/evaluate_default_model.py
