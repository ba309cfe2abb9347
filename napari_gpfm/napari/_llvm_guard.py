"""Keep torch from loading Triton into a napari process whose OpenGL runs on Mesa's LLVM.

On Linux without a GPU driver, Qt's OpenGL goes through Mesa (llvmpipe), which maps the
system ``libLLVM``. Triton's ``libtriton.so`` carries its own LLVM; loaded second into the same
process, the two LLVMs' global symbols collide and the process dies with a segmentation fault
in ``triton/knobs.py``. torch imports Triton lazily (timm -> torchvision -> torch._dynamo), so
the first embedding in such a viewer would crash napari.

torch treats a missing Triton as "no Triton" (it only needs it for ``torch.compile`` on GPUs,
which the widgets do not use), so when another LLVM is already mapped and Triton is not yet
loaded, we mark it as not importable for this process.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def foreign_llvm_loaded(maps_file: str | Path = "/proc/self/maps") -> bool:
    """True when a shared ``libLLVM`` is mapped into this process (Linux; False elsewhere)."""
    try:
        text = Path(maps_file).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return any("/libLLVM" in line for line in text.splitlines())


def keep_triton_out(maps_file: str | Path = "/proc/self/maps") -> bool:
    """Block Triton's import if it would load next to another LLVM; True if it was blocked.

    Call before anything imports torch-related packages from inside napari. Does nothing when
    Triton is already imported (it then loaded first, which is safe) or no LLVM is mapped.
    """
    if "triton" in sys.modules:
        return sys.modules["triton"] is None
    if not foreign_llvm_loaded(maps_file):
        return False
    sys.modules["triton"] = None  # `import triton` now raises ImportError: torch copes
    log.info("OpenGL uses Mesa's LLVM in this process: Triton (torch.compile) is disabled here")
    return True
