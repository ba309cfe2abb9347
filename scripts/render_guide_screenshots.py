"""Render the user guide's screenshots: every widget at work on the bundled sample slide.

Run under a real X display with OpenGL (Qt's offscreen platform has no OpenGL):

    xvfb-run -a -s "-screen 0 1920x1200x24" .venv/bin/python scripts/render_guide_screenshots.py

It opens the sample, embeds it with ``--model`` (default: the embedded default model), then
drives the Maps, Similar regions and ROI classifier widgets and the GeoJSON writer/reader
exactly as a user would, saving ``docs/images/*.png``. Last, it embeds a second real slide
(the OpenSlide OS-1 crop) at the sample's tiling, indexes both into a library in a temporary
folder and searches it from the Similar regions panel. It also measures how late a 10 ms timer
fires on the viewer's event loop while the embedding runs, and prints p50/p99.

``--fallback-random`` allows a placeholder when the default model is not built yet: a tiny
timm ViT with random weights, announced on every screenshot. Rerun without it once
``napari_gpfm/encoders/weights/default.safetensors`` exists.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# The library's second slide: a real H&E crop at 0.227 um/px (9 tiles at the default tiling).
OS1_CROP = REPO / "data" / "extra-he" / "openslide_os1_crop" / "OS-1-detail.ome.tif"
FALLBACK_ARCH = "vit_tiny_patch16_224"
SHOT_WIDTH = 1360
# Level-0 pixel boxes (x0, y0, x1, y1) on CMU-1-Small-Region, chosen by looking at the slide.
EPIDERMIS_QUERY = (1080, 1780, 1280, 2000)
REGIONS = {
    "epidermis": [(1090, 1800, 1260, 2000), (1560, 2480, 1700, 2800)],
    "dermis": [(900, 2450, 1080, 2750), (1350, 2500, 1550, 2750)],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="encoder name (default: default)")
    p.add_argument("--weights", default=None, help="weights file for --model")
    p.add_argument("--out", default=str(REPO / "docs" / "images"), help="folder for the PNGs")
    p.add_argument("--mpp", type=float, default=0.5, help="tile resolution in um/px")
    p.add_argument("--tile", type=int, default=128, help="tile side in pixels at --mpp")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--fallback-random", action="store_true",
                   help=f"if --model cannot be loaded, use timm {FALLBACK_ARCH} with random "
                   "weights (placeholder screenshots, labelled as such)")
    return p.parse_args(argv)


def pick_encoder(args: argparse.Namespace, workdir: Path) -> tuple[str, str | None, str | None]:
    """(model name, weights path, placeholder label or None)."""
    from napari_gpfm.encoders import load_encoder
    from napari_gpfm.errors import GPFMError

    try:
        load_encoder(args.model, weights=args.weights, device="cpu")
        return args.model, args.weights, None
    except GPFMError as exc:
        if not args.fallback_random:
            raise SystemExit(f"error: {exc} (or pass --fallback-random for placeholders)") from None
        print(f"note: {exc}\nnote: using a random-weights {FALLBACK_ARCH} as a placeholder")
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(FALLBACK_ARCH, num_classes=0)
    weights = workdir / f"{FALLBACK_ARCH}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    label = "PLACEHOLDER: random-weights tiny ViT, not the trained model"
    return f"timm:{FALLBACK_ARCH}", str(weights), label


class Driver:
    """Runs the viewer's event loop between steps and saves screenshots."""

    def __init__(self, out: Path, label: str | None):
        import napari
        from qtpy.QtWidgets import QApplication

        self.napari = napari
        self.out = out
        self.viewer = napari.Viewer(title="napari-gpfm", show=True)
        self.viewer.window.resize(1700, 1050)
        self.app = QApplication.instance()
        self.label = label
        self.docks: list = []

    def announce_placeholder(self) -> None:
        """Write the placeholder warning on the canvas (every later screenshot shows it)."""
        if self.label:
            text = self.viewer.canvas.overlays.text
            text.text = self.label
            text.color = "yellow"
            text.font_size = 13
            text.position = "bottom_left"
            text.visible = True

    def wait_until(self, condition, timeout: float = 1800.0) -> None:
        from qtpy.QtCore import QEventLoop, QTimer

        loop = QEventLoop()
        deadline = time.perf_counter() + timeout
        poll = QTimer()
        poll.setInterval(20)

        def check():
            if condition() or time.perf_counter() > deadline:
                loop.quit()

        poll.timeout.connect(check)
        poll.start()
        check()
        if not condition():
            loop.exec()
        poll.stop()
        if not condition():
            raise SystemExit("error: timed out waiting for the viewer")

    def settle(self, seconds: float = 0.8) -> None:
        end = time.perf_counter() + seconds
        self.wait_until(lambda: time.perf_counter() > end)

    def dock(self, name: str):
        for dock in self.docks:
            self.viewer.window.remove_dock_widget(dock)
        self.docks = []
        dock, widget = self.viewer.window.add_plugin_dock_widget("napari-gpfm", name)
        self.docks.append(dock)
        self.settle(0.3)
        self.viewer.reset_view()  # the canvas got narrower: fit the slide again
        return widget

    def shot(self, name: str) -> Path:
        from PIL import Image

        self.settle()
        image = Image.fromarray(np.asarray(self.viewer.screenshot(canvas_only=False, flash=False)))
        image = image.convert("RGB")
        if image.width > SHOT_WIDTH:
            height = round(image.height * SHOT_WIDTH / image.width)
            image = image.resize((SHOT_WIDTH, height), Image.Resampling.LANCZOS)
        # 256 dithered colours keep the tissue readable at a third of the file size.
        image = image.quantize(256, Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG)
        path = self.out / f"{name}.png"
        image.save(path, optimize=True)
        print(f"wrote {path}")
        return path

    def show_only(self, *names_ending: str) -> None:
        """Hide result layers except those named; the slide and drawings stay visible."""
        from napari_gpfm.napari._session import OVERLAY_KEY

        for layer in self.viewer.layers:
            kind = (layer.metadata.get(OVERLAY_KEY) or {}).get("kind")
            if kind in (None, "query", "regions", "geojson"):
                continue
            layer.visible = any(layer.name.endswith(n) for n in names_ending)

    def view_box(self, ref, x0: float, y0: float, x1: float, y1: float) -> None:
        """Centre and zoom the camera on a level-0 box."""
        (cy, cx), = ref.level0_to_world(np.array([[(x0 + x1) / 2, (y0 + y1) / 2]]))
        camera = self.viewer.scene.camera
        camera.center = (cy, cx)
        h, w = self.viewer.canvas.size
        camera.zoom = min(h / ((y1 - y0) * ref.scale_yx[0]), w / ((x1 - x0) * ref.scale_yx[1]))


def build_library(sample_store: Path, model: str, weights: str | None, device: str,
                  work: Path) -> Path:
    """Embed the OS-1 crop exactly as the sample was (its store's tiling and model) and index
    both stores into a library, as `gpfm embed` + `gpfm index build` would."""
    from napari_gpfm.embedding.engine import embed_slide, prepare_store
    from napari_gpfm.embedding.store import EmbeddingStore
    from napari_gpfm.encoders import load_encoder
    from napari_gpfm.library import LibraryIndex
    from napari_gpfm.slides import open_slide
    from napari_gpfm.tiling import TilingSpec, make_grid

    # The library accepts only stores of one model and one tiling: reuse the sample's.
    spec = TilingSpec.from_dict(EmbeddingStore.open(sample_store).attrs["tiling"])
    encoder = load_encoder(model, weights=weights, device="cpu")
    other = work / "library-stores" / "os1.zarr"
    with open_slide(OS1_CROP) as slide:
        grid = make_grid(slide, spec)
        store = prepare_store(other, slide=slide, grid=grid, encoder=encoder, spec=spec)
        embed_slide(slide, grid, encoder, store, device=device, batch_size=64, num_workers=0)
    return LibraryIndex.build([sample_store, other], work / "library").path


def box_data(ref, box) -> np.ndarray:
    x0, y0, x1, y1 = box
    return ref.level0_to_data(np.array([[x0, y0], [x1, y1]], dtype=np.float64))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpfm-guide-"))
    os.environ["XDG_CACHE_HOME"] = str(work / "cache")  # a fresh store: the embedding runs
    # torch/timm before the viewer: Triton must load before OpenGL maps Mesa's LLVM.
    model, weights, label = pick_encoder(args, work)

    from qtpy.QtCore import QTimer

    from napari_gpfm.napari._session import SlideRef

    d = Driver(out, label)
    viewer = d.viewer

    # 1. Open the sample (File > Open Sample > napari-gpfm).
    [slide] = viewer.open_sample("napari-gpfm", "cmu_small_region")
    ref = SlideRef.from_layer(slide)
    viewer.reset_view()
    d.shot("01-open-sample")
    d.announce_placeholder()  # from here on, pictures depend on the model

    # 2. Embed, measuring the event loop's latency meanwhile.
    embed = d.dock("Embed")
    embed.encoder_combo.setCurrentText(model)
    if weights:
        embed.weights_edit.setText(weights)
    embed.mpp_spin.setValue(args.mpp)
    embed.tile_spin.setValue(args.tile)
    embed.device_combo.setCurrentText(args.device)
    lateness: list[float] = []
    last = [time.perf_counter()]

    def tick():
        now = time.perf_counter()
        lateness.append(max(0.0, now - last[0] - 0.010))
        last[0] = now

    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(tick)
    t0 = time.perf_counter()
    timer.start()
    embed.start()
    d.wait_until(lambda: embed.tiles_total and embed.tiles_done >= 0.5 * embed.tiles_total
                 or not embed.is_running)
    d.shot("02-embed-running")
    d.wait_until(lambda: not embed.is_running)
    timer.stop()
    seconds = time.perf_counter() - t0
    late_ms = np.asarray(lateness) * 1000.0
    latency = {
        "model": model, "tiles": embed.tiles_total, "seconds": round(seconds, 1),
        "timer_ticks": len(lateness),
        "p50_ms": round(float(np.percentile(late_ms, 50)), 1),
        "p99_ms": round(float(np.percentile(late_ms, 99)), 1),
        "max_ms": round(float(late_ms.max()), 1),
    }
    print("event-loop lateness while embedding:", json.dumps(latency))
    if embed.tiles_done < embed.tiles_total:
        raise SystemExit(f"error: embedding stopped: {embed.status.text()}")

    # 3. Maps: PCA colours, then clusters with their table.
    maps = d.dock("Maps")
    maps.show_pca()
    d.wait_until(lambda: not maps.is_busy)
    d.show_only("· PCA colours")
    d.shot("03-maps-pca")
    maps.k_spin.setValue(5)
    maps.show_clusters()
    d.wait_until(lambda: not maps.is_busy)
    d.show_only("· clusters")
    d.shot("04-maps-clusters")

    # 4. Similar regions: a box on the epidermis.
    similar = d.dock("Similar regions")
    similar.start_query("add_rectangle")
    query = viewer.layers["similarity query"]
    query.add_rectangles(box_data(ref, EPIDERMIS_QUERY))
    query.mode = "pan_zoom"
    similar.k_spin.setValue(20)
    similar.search()
    d.show_only("· similarity", "· similar tiles")
    viewer.layers.selection.active = query
    d.shot("05-similar-regions")
    d.show_only("· similar tiles")
    similar.go_to(0)
    d.shot("06-similar-zoom")
    viewer.reset_view()
    query.visible = False

    # 5. ROI classifier: two classes, two regions each.
    classifier = d.dock("ROI classifier")
    for name, boxes in REGIONS.items():
        classifier.add_class(name)
        classifier.draw("add_rectangle")
        regions = viewer.layers["training regions"]
        for box in boxes:
            regions.add_rectangles(box_data(ref, box))
    regions.mode = "pan_zoom"
    classifier.train()
    d.wait_until(lambda: not classifier.is_busy)
    d.show_only("· tissue classes")
    d.shot("07-classifier")

    # 6. GeoJSON: save the regions for QuPath, read them back.
    geojson = work / "training-regions.geojson"
    viewer.layers.selection = {regions}
    viewer.layers.save(str(geojson), selected=True, plugin="napari-gpfm")
    classifier.export_predictions(work / "tissue-map.geojson")
    regions.visible = False
    d.show_only()
    viewer.open(str(geojson), plugin="napari-gpfm")
    d.shot("08-geojson-read-back")
    print(f"GeoJSON written to {geojson} and {work / 'tissue-map.geojson'}")

    # 7. Similar regions over a library: the sample and the OS-1 crop, searched with the
    # epidermis box; a click on an OS-1 thumbnail opens that slide framed on the hit.
    similar = d.dock("Similar regions")
    sample_store = similar.slide_picker.session().tiles().store_path
    library = build_library(Path(sample_store), model, weights, args.device, work)
    similar.scope_combo.setCurrentText("a library")
    similar.library_row.set_library(library)
    similar.start_query("add_rectangle")
    query = viewer.layers["similarity query"]
    query.data = []  # step 4's box is still there: draw this query afresh, as a user would
    query.add_rectangles(box_data(ref, EPIDERMIS_QUERY))
    query.mode = "pan_zoom"
    # Grouped by slide, so the gallery shows both slides' best regions whatever their scores.
    similar.group_check.setChecked(True)
    similar.per_slide_spin.setValue(3)
    similar.k_spin.setValue(2)
    gallery = similar.library_results.gallery
    similar.search()
    d.wait_until(lambda: not similar.is_busy)
    results = similar.library_results
    hits = gallery.hits
    if len(results.thumbnails) < len(hits) or not hits:
        raise SystemExit(f"error: library search incomplete: {similar.status.text()}")
    other = next((i for i, h in enumerate(hits) if h.slide_name == OS1_CROP.name), None)
    if other is None:
        raise SystemExit(f"error: no hit on {OS1_CROP.name}: {similar.status.text()}")
    gallery.itemClicked.emit(gallery.item(other))  # a user's click
    d.shot("09-similar-library")
    (out / "embed-latency.json").write_text(json.dumps(latency, indent=2) + "\n")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
