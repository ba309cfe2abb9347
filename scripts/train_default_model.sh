#!/usr/bin/env bash
# Rebuild the embedded default model from the real H&E in this repository, then measure it.
# Stages 1-2 (their own configs), then default_model_stage3.yaml five times (stages 3-7), each
# from the previous stage's exported teacher, and their mean; then two stages with the colour
# expert: stage 8 once, stage 9 under four seeds; then stage 12R (the TCGA frozen section beside
# the other sources, all eight orientations) under four seeds, and the mean of the two soups;
# then stage 17L (the colour expert's clean, log-scale target) under four seeds from that mean,
# stage 18 (the same recipe) under four seeds from the 17L soup, and stage 19 under two seeds
# from the mean of the 18 and 17L soups. The shipped weights are the mean of the stage-19 soup
# and the stage-17L soup (docs/default-model.md). About 8.5 hours on 2 CPU cores.
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
# The mean of every stage end since the fine tiling began (weight averaging): the default
# shipped before stages 8-9 were added.
$py/gpfm-train average "${teachers[@]}" --out runs/default_model_mean3to7.safetensors
# Stages 8-9: GPFM's expert distillation with a parameter-free expert, the colour histogram of
# the crop (its CLS weight 1.0), beside DINO / iBOT / KoLeo. Exports hold no heads, so the new
# heads train alone for the first 500 iterations. Stage 8 starts from the mean above; stage 9
# from the mean of that and stage 8's teacher, under four seeds, two at a time (one core each).
colour=(--set model.schedule.freeze_backbone_epochs=10
        --set 'model.experts=[{name: colour, encoder: "baseline:colour-histogram"}]')
$py/gpfm-train fit --config $cfg/default_model_stage3.yaml "${colour[@]}" \
    --set model.backbone.init_weights=runs/default_model_mean3to7.safetensors \
    --set trainer.default_root_dir=runs/default_model_stage8
$py/gpfm-train export runs/default_model_stage8/checkpoints/last.ckpt \
    --out runs/default_model_stage8/teacher.safetensors
$py/gpfm-train average runs/default_model_mean3to7.safetensors \
    runs/default_model_stage8/teacher.safetensors --out runs/default_model_mean8.safetensors
stage9() {
    local root=runs/default_model_stage9_seed$1
    $py/gpfm-train fit --config $cfg/default_model_stage3.yaml "${colour[@]}" \
        --set model.backbone.init_weights=runs/default_model_mean8.safetensors \
        --set seed_everything=$1 --set data.seed=$1 --set trainer.default_root_dir=$root \
        --set trainer.enable_progress_bar=false
    $py/gpfm-train export $root/checkpoints/last.ckpt --out $root/teacher.safetensors
}
in_pairs() {   # in_pairs FN [PAIR ...]: run "FN SEED" two at a time (one core each); pairs "0 1" "2 3" unless named
    local fn=$1 pair seed
    shift
    [ $# -gt 0 ] || set -- "0 1" "2 3"
    for pair in "$@"; do
        pids=()
        for seed in $pair; do "$fn" "$seed" & pids+=($!); done
        for pid in "${pids[@]}"; do wait "$pid"; done   # set -e stops here if a seed failed
    done
}
in_pairs stage9
# The stage-9 soup: the mean of the four seeds' teachers (no seed picked); shipped until 12R.
$py/gpfm-train average runs/default_model_stage9_seed{0,1,2,3}/teacher.safetensors \
    --out runs/default_model_stage9_soup.safetensors
# Stage 12R: stage 9's recipe from that soup, with the TCGA frozen section at its true scale
# (112 px tiles at 1 um/px every 56 px; its file records no pixel size) beside the other
# sources, minus every tile that shares a pixel with the section's labelled evaluation
# regions, and all eight orientations of a crop (a slide has no up or down).
source scripts/default_model_sources.sh   # $sources: the data of stages 12R-16G
sectioned() {   # sectioned ROOT INIT SEED [--set ...]: stage 12R's data, one seed, exported
    local root=$1 init=$2 seed=$3
    shift 3
    $py/gpfm-train fit --config $cfg/default_model_stage3.yaml "$@" \
        --set model.backbone.init_weights=$init \
        --set "$sources" --set data.crops.rot90_p=0.75 \
        --set seed_everything=$seed --set data.seed=$seed --set trainer.default_root_dir=$root \
        --set trainer.enable_progress_bar=false
    $py/gpfm-train export $root/checkpoints/last.ckpt --out $root/teacher.safetensors
}
stage12r() {
    sectioned runs/default_model_stage12r_seed$1 runs/default_model_stage9_soup.safetensors $1 \
        "${colour[@]}"
}
in_pairs stage12r
$py/gpfm-train average runs/default_model_stage12r_seed{0,1,2,3}/teacher.safetensors \
    --out runs/default_model_stage12r_soup.safetensors
# The default shipped until stage 17L: the mean of the two soups.
$py/gpfm-train average runs/default_model_stage9_soup.safetensors \
    runs/default_model_stage12r_soup.safetensors \
    --out runs/default_model_mean12r.safetensors
# Stages 17L-19: stage 12R's data, the colour expert reading the crop before its jitter
# (clean_input) and its target on a log scale; each stage from the weights named below.
logcolour() {   # logcolour STAGE INIT SEED
    sectioned "runs/default_model_stage${1}_seed${3}" "$2" "$3" \
        --set model.schedule.freeze_backbone_epochs=10 \
        --set 'model.experts=[{name: colour, encoder: "baseline:colour-histogram", clean_input: true, histogram_scale: log}]' \
        --set data.crops.clean_global_crops=true
}
stage17l() { logcolour 17l runs/default_model_mean12r.safetensors "$1"; }
in_pairs stage17l
# The stage-17L soup (shipped until stage 19).
$py/gpfm-train average runs/default_model_stage17l_seed{0,1,2,3}/teacher.safetensors \
    --out runs/default_model_stage17l_soup.safetensors
# Stage 18: the same recipe from that soup, four seeds; the mean of its soup and the 17L soup.
stage18() { logcolour 18 runs/default_model_stage17l_soup.safetensors "$1"; }
in_pairs stage18
$py/gpfm-train average runs/default_model_stage18_seed{0,1,2,3}/teacher.safetensors \
    --out runs/default_model_stage18_soup.safetensors
$py/gpfm-train average runs/default_model_stage18_soup.safetensors \
    runs/default_model_stage17l_soup.safetensors --out runs/default_model_mean18.safetensors
# Stage 19: the same recipe from that mean, seeds 0-1 (one pair).
stage19() { logcolour 19 runs/default_model_mean18.safetensors "$1"; }
in_pairs stage19 "0 1"
$py/gpfm-train average runs/default_model_stage19_seed{0,1}/teacher.safetensors \
    --out runs/default_model_stage19_soup.safetensors
# The shipped model: the mean of the stage-19 soup and the stage-17L soup.
$py/gpfm-train average runs/default_model_stage19_soup.safetensors \
    runs/default_model_stage17l_soup.safetensors \
    --out napari_gpfm/encoders/weights/default.safetensors
$py/python scripts/evaluate_default_model.py
