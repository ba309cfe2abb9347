"""Time a panel's rerun in the viewer: its result layer updated in place vs. replaced.

`place_layer` gives an existing layer of the same name the new result in place (removing a
hidden layer crashes napari on Mesa's llvmpipe). Baseline: what it did before, remove the old
layer and insert a new one at its index (visible layers only, so the baseline does not crash).
Each rerun places a cluster map (Labels) and a top-k box layer (Shapes) over the bundled
sample, the window shown, and the time includes the repaint (Qt events processed until idle).
Runs are interleaved; the median per rerun is reported.

    xvfb-run -a python bench/bench_place_layer.py [--tiles 50000] [--boxes 100] [--repeats 15]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=50_000, help="tiles of the cluster map")
    parser.add_argument("--boxes", type=int, default=100, help="rectangles of the top-k layer")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    import napari
    from napari.layers import Layer
    from qtpy.QtWidgets import QApplication

    from napari_gpfm.napari._overlays import place_layer

    viewer = napari.Viewer()
    viewer.open_sample("napari-gpfm", "cmu_small_region")
    app = QApplication.instance()
    rng = np.random.default_rng(0)
    side = int(np.ceil(np.sqrt(args.tiles)))
    scale = (2967 * 0.499 / side, 2220 * 0.499 / side)

    def results(run: int) -> list[tuple]:
        labels = rng.integers(1, 9, size=(side, side)).astype(np.int32)
        xy = rng.uniform(0, 1000, size=(args.boxes, 2))
        boxes = [np.array([[y, x], [y, x + 50], [y + 50, x + 50], [y + 50, x]]) for y, x in xy]
        return [
            (labels, {"name": "bench · clusters", "scale": scale, "opacity": 0.5,
                      "units": ("um", "um")}, "labels"),
            (boxes, {"name": "bench · similar tiles", "shape_type": "rectangle",
                     "features": {"rank": np.arange(args.boxes)}, "edge_color": "cyan",
                     "face_color": "transparent", "metadata": {"run": run},
                     "units": ("um", "um")}, "shapes"),
        ]

    def replace(layer_data: tuple) -> None:  # the previous place_layer, for visible layers
        data, kwargs, layer_type = layer_data
        layer = Layer.create(data, dict(kwargs), layer_type)
        layers = list(viewer.layers)
        old = next((lay for lay in layers if lay.name == kwargs["name"]), None)
        if old is None:
            viewer.add_layer(layer)
            return
        index = layers.index(old)
        viewer.layers.remove(old)
        viewer.layers.insert(index, layer)

    def settle() -> None:
        for _ in range(5):
            app.processEvents()

    timings: dict[str, list[float]] = {"in place (place_layer)": [], "remove + insert": []}
    methods = {"in place (place_layer)": lambda d: place_layer(viewer, d),
               "remove + insert": replace}
    for data in results(-1):
        place_layer(viewer, data)
    settle()
    for run in range(args.repeats):
        for name, method in methods.items():
            batch = results(run)
            start = time.perf_counter()
            for data in batch:
                method(data)
            settle()
            timings[name].append((time.perf_counter() - start) * 1000.0)
    assert len(viewer.layers) == 3, [lay.name for lay in viewer.layers]

    from _machine import cpu_name

    print(f"Machine: {cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"napari {napari.__version__}, Qt platform {os.environ.get('QT_QPA_PLATFORM', 'xcb')}")
    print(f"{side}x{side} labels ({side * side} tiles) + {args.boxes} boxes per rerun, "
          f"{args.repeats} interleaved reruns, median ms")
    base = statistics.median(timings["remove + insert"])
    for name, values in timings.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.1f} ms | {med / base:.2f}x |")
    viewer.close()


if __name__ == "__main__":
    main()
