"""What a client may ask of the explorer, and the errors it gets back when it asks too much.

Every refusal is a :class:`~cleandift.errors.CleanDIFTError` with a one-line message and an HTTP status,
so the server turns it into a 4xx answer the page can show, never a crash.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import CleanDIFTError


class ExploreRequestError(CleanDIFTError, ValueError):
    """A request the explorer refuses (bad parameter, bad upload); ``status`` is the HTTP code."""

    status = 400


class UnknownImageError(ExploreRequestError):
    """An image id the server never listed (ids are the only way to address an image)."""

    status = 404


class UploadTooLargeError(ExploreRequestError):
    """An upload over the byte or pixel limit."""

    status = 413


@dataclass(frozen=True)
class Limits:
    """Bounds on what one session holds and one request may ask (defaults suit a local machine)."""

    max_upload_bytes: int = 25 * 2**20  #: bytes of one uploaded file
    max_pixels: int = 40_000_000  #: pixels of any image (checked from the header, before decoding)
    max_images: int = 1000  #: images listed from the served folders
    max_uploads: int = 200  #: uploads kept per session (on disk, in a temporary folder)
    cache_bytes: int = 512 * 2**20  #: feature cache budget (least recently used maps are dropped)
    max_points: int = 64  #: points per query (a keypoint template)
    max_targets: int = 16  #: targets per query
    max_methods: int = 3  #: methods per query (one of each)
    max_ensemble: int = 64  #: DIFT noise draws
    max_prompt_chars: int = 300
    max_heatmap_side: int = 128  #: heatmap cells per side sent to the page
    #: the "pixels" grid of a larger target is a uniformly reduced frame of this longer side (points still
    #: come back in original pixels): on a CPU a 1024 px target cost ~100 ms per click and method, and the
    #: grid is then still >= 5 candidates per feature cell for maps up to 96 cells wide (SD at 768 px)
    max_match_side: int = 512

    def as_dict(self) -> dict:
        return asdict(self)
