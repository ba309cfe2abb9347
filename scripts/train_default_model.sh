#!/usr/bin/env bash
# Rebuild the embedded default model from the real H&E in this repository, then measure it.
# Four stages, each from the previous one's exported teacher (docs/default-model.md): about
# 2.5 hours on 2 CPU cores. Run from the repository root with the venv installed.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1   # one torch thread + one data worker: the fastest split of 2 cores
py=.venv/bin
cfg=gpfm_train/configs
$py/gpfm-train fit --config $cfg/default_model.yaml
$py/gpfm-train export runs/default_model/checkpoints/last.ckpt \
    --out runs/default_model/teacher.safetensors
$py/gpfm-train fit --config $cfg/default_model_stage2.yaml
$py/gpfm-train export runs/default_model_stage2/checkpoints/last.ckpt \
    --out runs/default_model_stage2/teacher.safetensors
$py/gpfm-train fit --config $cfg/default_model_stage3.yaml
$py/gpfm-train export runs/default_model_stage3/checkpoints/last.ckpt \
    --out runs/default_model_stage3/teacher.safetensors
$py/gpfm-train fit --config $cfg/default_model_stage3.yaml \
    --set model.backbone.init_weights=runs/default_model_stage3/teacher.safetensors \
    --set trainer.default_root_dir=runs/default_model_stage4
$py/gpfm-train export runs/default_model_stage4/checkpoints/last.ckpt \
    --out napari_gpfm/encoders/weights/default.safetensors
$py/python scripts/evaluate_default_model.py
