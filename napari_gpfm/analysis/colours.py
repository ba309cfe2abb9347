"""Colour maps and categorical palettes, numpy only (no matplotlib).

Continuous maps are piecewise-linear interpolations between anchor colours sampled from the
published maps (viridis and inferno from matplotlib/R's viridisLite, coolwarm from Moreland's
diverging map), sampled into a 256-entry lookup table.
"""

from __future__ import annotations

import colorsys

import numpy as np

from napari_gpfm.errors import ParameterError

# Space-separated anchor lists keep each map on one line.
_ANCHORS_HEX: dict[str, str] = {
    "viridis": "440154 472D7B 3B528B 2C728E 21908C 27AD81 5DC863 AADC32 FDE725",
    "inferno": "000004 1B0C42 4B0C6B 781C6D A52C60 CF4446 ED6925 FB9A06 F7D13D FCFFA4",
    "coolwarm": "3B4CC0 7396F5 B0CBFC DDDDDD F6BFA6 EA7B60 B40426",
    "gray": "000000 FFFFFF",
}

# Ten well-separated categorical colours (the Tableau 10 set) used before generated ones.
_CATEGORICAL_HEX = "1F77B4 FF7F0E 2CA02C D62728 9467BD 8C564B E377C2 7F7F7F BCBD22 17BECF"

COLORMAPS = tuple(_ANCHORS_HEX)


def hex_to_rgb(value: str) -> tuple[int, int, int]:
    """``"#RRGGBB"`` or ``"RRGGBB"`` -> ``(r, g, b)`` ints."""
    text = value.lstrip("#")
    if len(text) != 6:
        raise ParameterError(f"colour {value!r} must be written #RRGGBB")
    try:
        return (int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16))
    except ValueError:
        raise ParameterError(f"colour {value!r} must be written #RRGGBB") from None


def rgb_to_hex(rgb: np.ndarray | tuple[int, int, int]) -> str:
    """``(r, g, b)`` ints in 0..255 -> ``"#rrggbb"``."""
    r, g, b = (int(v) for v in np.asarray(rgb).reshape(3))
    return f"#{r:02x}{g:02x}{b:02x}"


def colormap_lut(name: str = "viridis", n: int = 256) -> np.ndarray:
    """An ``(n, 3)`` uint8 lookup table for the named continuous colour map."""
    if name not in _ANCHORS_HEX:
        raise ParameterError(f"unknown colour map {name!r}; choose one of {', '.join(COLORMAPS)}")
    anchors = np.array([hex_to_rgb(h) for h in _ANCHORS_HEX[name].split()], dtype=np.float64)
    at = np.linspace(0.0, 1.0, len(anchors))
    t = np.linspace(0.0, 1.0, n)
    lut = np.column_stack([np.interp(t, at, anchors[:, c]) for c in range(3)])
    return np.clip(np.rint(lut), 0, 255).astype(np.uint8)


def apply_colormap(
    values: np.ndarray,
    name: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Map scalar ``values`` (any shape) to colours.

    Returns ``(rgb uint8 values.shape + (3,), valid bool values.shape)``; NaN values are not
    valid (their colour is black). ``vmin``/``vmax`` default to the finite range.
    """
    arr = np.asarray(values, dtype=np.float64)
    valid = np.isfinite(arr)
    finite = arr[valid]
    lo = float(finite.min()) if vmin is None and finite.size else (0.0 if vmin is None else vmin)
    hi = float(finite.max()) if vmax is None and finite.size else (1.0 if vmax is None else vmax)
    span = hi - lo
    norm = np.zeros_like(arr) if span <= 0 else (arr - lo) / span
    lut = colormap_lut(name)
    index = np.rint(np.clip(np.nan_to_num(norm, nan=0.0), 0.0, 1.0) * (len(lut) - 1))
    return lut[index.astype(np.intp)], valid


def categorical_colours(k: int) -> np.ndarray:
    """``(k, 3)`` uint8 distinct colours; the first ten are fixed, further ones are generated.

    Generated colours step the hue by the golden angle so neighbours in index differ strongly.
    """
    if k < 0:
        raise ParameterError(f"number of colours k={k} must be >= 0")
    colours = [hex_to_rgb(h) for h in _CATEGORICAL_HEX.split()[:k]]
    golden = 0.618033988749895
    for i in range(len(colours), k):
        hue = (0.11 + i * golden) % 1.0
        sat = 0.55 + 0.35 * ((i // 3) % 2)
        val = 0.95 - 0.25 * ((i // 2) % 2)
        r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
        colours.append((round(r * 255), round(g * 255), round(b * 255)))
    return np.array(colours, dtype=np.uint8).reshape(k, 3)
