"""surgeon: grow pretrained networks, fine-tune them, and deploy them.

Developmental transfer learning ("Growing a Brain", Wang, Ramanan, Hebert, CVPR 2017) plus the
model surgery that makes the grown network cheap at inference.
"""

from __future__ import annotations

__version__ = "0.1.0"

from surgeon.errors import SurgeonError

__all__ = ["SurgeonError", "__version__", "load"]


def load(path, *, trust_code: bool = False, map_location: str = "cpu"):
    """Rebuild the grown model stored in a ``grown.pt`` checkpoint (see :mod:`surgeon.checkpoint`)."""
    from surgeon.checkpoint import load_model

    return load_model(path, trust_code=trust_code, map_location=map_location)
