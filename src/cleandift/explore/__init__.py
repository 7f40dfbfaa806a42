"""``cleandift explore``: a local click-to-match page comparing CleanDIFT, DIFT and the frozen model.

The maths and state live in :mod:`.session` (no web framework: testable and reusable); :mod:`.server`
wraps it in a FastAPI app (the optional ``explore`` extra) and serves the static page in ``static/``.
"""

from __future__ import annotations

from .limits import ExploreRequestError, Limits, UnknownImageError, UploadTooLargeError

__all__ = ["ExploreRequestError", "Limits", "UnknownImageError", "UploadTooLargeError"]
