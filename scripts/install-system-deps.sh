#!/usr/bin/env bash
# System libraries for the napari viewer tests on a headless Debian/Ubuntu machine:
# Xvfb (a virtual X display with software OpenGL) and the xcb libraries Qt 6 needs.
# The Python packages come from pip (see the README); this is only for a machine without a screen.
set -euo pipefail
pkgs="xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-image0 libxcb-render-util0
libxcb-randr0 libxcb-shape0 libxcb-xfixes0 libxcb-cursor0 libxkbcommon-x11-0 libegl1 libgl1
libglx-mesa0 libgl1-mesa-dri libfontconfig1 libdbus-1-3"
missing=$(for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
if [ -n "$missing" ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi
