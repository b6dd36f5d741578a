"""``flux-mini``: a small FluxPipeline trained by fluxopt itself on procedural captioned shapes.

The shipped weights (``WEIGHTS_DIR``, bf16 safetensors written by ``save_pretrained``) load
offline with ``FluxPipeline.from_pretrained(WEIGHTS_DIR)``. See docs/flux-mini.md.
"""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
