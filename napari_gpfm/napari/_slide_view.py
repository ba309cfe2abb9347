"""Which slide the viewer shows, and putting results over their slide (Qt-free).

Every slide opens at the world origin, so two slides shown together lie on top of each other.
Going to a library hit therefore shows one slide at a time (:class:`SlideSwitcher`): it hides
the other slides with the layers drawn over them, remembers what it hid, and shows it again
when the user comes back to that slide. One switcher per viewer (:func:`switcher_for`), shared
by every panel, so whichever panel brings a slide back also brings back its layers.

:func:`place_result` is how the panels add a result layer: over a slide that is still open
(a result whose slide was closed while it computed is refused, not drawn over nothing), with
that slide shown if it was hidden (a map drawn under a hidden slide would float over another).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from napari_gpfm.errors import ParameterError
from napari_gpfm.napari._overlays import LayerData, place_layer
from napari_gpfm.napari._session import OVERLAY_KEY, SlideRef, slide_layers


def layer_slide_fingerprint(layer: Any) -> str | None:
    """The fingerprint of the slide a layer shows or was drawn over; None for other layers."""
    ref = SlideRef.from_layer(layer)
    if ref is not None:
        return ref.fingerprint
    meta = getattr(layer, "metadata", None) or {}
    overlay = meta.get(OVERLAY_KEY) if isinstance(meta, Mapping) else None
    if not isinstance(overlay, Mapping):
        return None
    slide = overlay.get("slide")
    if isinstance(slide, Mapping) and slide.get("fingerprint"):
        return str(slide["fingerprint"])
    return str(overlay["slide_fingerprint"]) if overlay.get("slide_fingerprint") else None


def drawn_over(layer: Any, ref: SlideRef | None) -> bool:
    """Whether ``layer`` belongs with ``ref``'s slide: drawn over it, or over no slide in
    particular (a layer the user made by hand); a panel offers and reads only such layers."""
    fingerprint = layer_slide_fingerprint(layer)
    return fingerprint is None or ref is None or fingerprint == ref.fingerprint


def find_slide_layer(viewer: Any, fingerprint: str) -> Any | None:
    """The open slide layer showing the slide with this content fingerprint, if any."""
    return next((layer for layer in slide_layers(viewer)
                 if SlideRef.from_layer(layer).fingerprint == fingerprint), None)


@dataclass
class SlideSwitcher:
    """Shows one slide (and what is drawn over it) at a time; remembers what it hid."""

    hidden: dict[str, list[Any]] = field(default_factory=dict)

    def show(self, viewer: Any, slide_layer: Any) -> None:
        """Make ``slide_layer`` visible and active; hide the other slides and their layers."""
        target = SlideRef.from_layer(slide_layer).fingerprint
        for layer in list(viewer.layers):
            fingerprint = layer_slide_fingerprint(layer)
            if fingerprint is not None and fingerprint != target and layer.visible:
                layer.visible = False
                self.hidden.setdefault(fingerprint, []).append(layer)
        for layer in self.hidden.pop(target, []):
            if layer in viewer.layers:
                layer.visible = True
        slide_layer.visible = True
        viewer.layers.selection.active = slide_layer


_SWITCHERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def switcher_for(viewer: Any) -> SlideSwitcher:
    """The viewer's one :class:`SlideSwitcher` (made on first use)."""
    switcher = _SWITCHERS.get(viewer)
    if switcher is None:
        switcher = _SWITCHERS[viewer] = SlideSwitcher()
    return switcher


def reveal_slide(viewer: Any, slide_layer: Any) -> None:
    """Show ``slide_layer`` if it is hidden (switching away from the slide shown instead)."""
    if not slide_layer.visible:
        switcher_for(viewer).show(viewer, slide_layer)


def place_result(viewer: Any, layer_data: LayerData, *, colour_bar: bool = False) -> Any:
    """Add (or update) a result layer over the slide it was computed for.

    Refuses a result whose slide is no longer open; shows the slide first when it is hidden;
    ``colour_bar`` shows the layer's colour bar (score maps: a colour means a value).
    """
    meta = layer_data[1].get("metadata") or {}
    overlay = meta.get(OVERLAY_KEY) or {}
    fingerprint = overlay.get("slide_fingerprint") or (overlay.get("slide") or {}).get(
        "fingerprint")
    if fingerprint:
        slide_layer = find_slide_layer(viewer, str(fingerprint))
        if slide_layer is None:
            name = overlay.get("slide_name") or (overlay.get("slide") or {}).get("name")
            raise ParameterError(
                f"{name or 'the slide'} was closed before its result "
                f"({layer_data[1].get('name')}) was ready; open it again and rerun"
            )
        reveal_slide(viewer, slide_layer)
    layer = place_layer(viewer, layer_data)
    if colour_bar and hasattr(layer, "colorbar"):
        layer.colorbar.visible = True
    return layer
