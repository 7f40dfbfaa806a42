"""The authors' released students by name: ``--checkpoint cleandift-sd21`` instead of a manual download.

The files are in the hub repo ``CompVis/cleandift`` (MIT, per its model card):

* ``cleandift-sd15`` / ``cleandift-sd21`` -- ``cleandift_sd{15,21}_unet.safetensors``: the student U-Net
  only (diffusers keys). The file stores no timestep, so the student runs at 261, the value its
  learnable timestep was initialised at.
* ``cleandift-sd15-full`` / ``cleandift-sd21-full`` -- ``cleandift_sd{15,21}_full.safetensors``: the whole
  training module (student, teacher, VAE, projection heads) including the learned ``timestep``.

A name resolves through huggingface_hub's cache: a file already there is used with no network at all;
otherwise it is downloaded once (``hf_hub_download``). Offline (``HF_HUB_OFFLINE``, or a hub that does
not answer) a missing file is reported with the fix instead of a minute of retries. A local file or
folder with the same name as a release wins over the name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointNotFoundError
from .hub import hub_cache_dir, hub_unreachable_reason, in_hub_cache, offline_mode

log = logging.getLogger(__name__)

REPO_ID = "CompVis/cleandift"


@dataclass(frozen=True)
class ReleasedStudent:
    name: str
    filename: str  #: file in :data:`REPO_ID`
    base: str  #: the ``--model`` preset it was distilled from (and must be loaded on)
    size: str  #: download size (hub tree listing)


RELEASED: dict[str, ReleasedStudent] = {s.name: s for s in (
    ReleasedStudent("cleandift-sd15", "cleandift_sd15_unet.safetensors", "sd15", "1.72 GB"),
    ReleasedStudent("cleandift-sd21", "cleandift_sd21_unet.safetensors", "sd21", "1.73 GB"),
    ReleasedStudent("cleandift-sd15-full", "cleandift_sd15_full.safetensors", "sd15", "3.86 GB"),
    ReleasedStudent("cleandift-sd21-full", "cleandift_sd21_full.safetensors", "sd21", "3.88 GB"),
)}


def released_student(spec: str | Path) -> ReleasedStudent | None:
    """The release ``spec`` names (case-insensitive), or ``None`` for anything else or an existing local path."""
    text = str(spec)
    found = RELEASED.get(text.strip().lower())
    if found is None or Path(text).expanduser().exists():
        return None
    return found


def resolve_checkpoint(spec: str | Path) -> Path:
    """``--checkpoint`` as a path: a release name becomes its file in the local hub cache (downloaded if
    needed); anything else is returned as the (user-expanded) path it already is."""
    student = released_student(spec)
    if student is None:
        return Path(spec).expanduser()
    return fetch_released(student)


def fetch_released(student: ReleasedStudent) -> Path:
    """The cached file of ``student``; downloads it when the cache lacks it and the hub can be reached."""
    cached = in_hub_cache(REPO_ID, student.filename)
    if cached is not None:
        return Path(cached)
    reason = hub_unreachable_reason()
    if reason is not None:
        raise CheckpointNotFoundError(_unavailable_message(student, reason))
    from huggingface_hub import hf_hub_download  # noqa: PLC0415

    log.info("downloading %s (%s, once) from %s into the Hugging Face cache", student.filename, student.size, REPO_ID)
    try:
        return Path(hf_hub_download(REPO_ID, student.filename))
    except Exception as exc:  # noqa: BLE001 - network / disk errors, reported with the file and the fix
        text = str(exc).strip().splitlines()
        raise CheckpointNotFoundError(
            f"--checkpoint {student.name}: downloading {REPO_ID}/{student.filename} failed "
            f"({type(exc).__name__}: {text[0][:200] if text else ''}); retry, or download the file yourself and "
            "pass its path") from exc


def _unavailable_message(student: ReleasedStudent, reason: str) -> str:
    where = f"{REPO_ID}/{student.filename}"
    cause = ("HF_HUB_OFFLINE is set" if offline_mode() else f"the Hugging Face hub cannot be reached ({reason})")
    fix = ("unset HF_HUB_OFFLINE for one run to download it" if offline_mode()
           else "run once with network access to download it")
    return (f"--checkpoint {student.name}: {where} ({student.size}) is not in the local cache ({hub_cache_dir()}) "
            f"and {cause}; {fix} (afterwards it loads offline), or pass the path of a downloaded copy")
