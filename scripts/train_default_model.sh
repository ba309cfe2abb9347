#!/usr/bin/env bash
# Rebuild the embedded default model from the real H&E in this repository, then measure it.
# About 45 minutes on 2 CPU cores. Run from the repository root with the venv installed.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1   # one torch thread + one data worker: the fastest split of 2 cores
py=.venv/bin
$py/gpfm-train fit --config gpfm_train/configs/default_model.yaml
$py/gpfm-train export runs/default_model/checkpoints/last.ckpt --out runs/default_model/teacher.safetensors
$py/gpfm-train fit --config gpfm_train/configs/default_model_stage2.yaml
$py/gpfm-train export runs/default_model_stage2/checkpoints/last.ckpt \
    --out napari_gpfm/encoders/weights/default.safetensors
$py/python scripts/evaluate_default_model.py
