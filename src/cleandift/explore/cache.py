"""A bounded least-recently-used cache of feature maps, so a click costs a match, not a model run."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Hashable

import torch


class FeatureCache:
    """``key -> value`` with a byte budget over the tensors in the values; the oldest use is evicted first.

    A value is anything whose tensors :func:`_nbytes` can find (a tensor, or an object with ``feats``).
    One entry larger than the whole budget is still kept (alone): the click that needed it must work.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Hashable, object] = OrderedDict()
        self._sizes: dict[Hashable, int] = {}
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: Hashable):
        with self._lock:
            if key not in self._items:
                self.misses += 1
                return None
            self.hits += 1
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: Hashable, value: object) -> None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
            self._items[key] = value
            self._sizes[key] = _nbytes(value)
            while len(self._items) > 1 and self.nbytes > self.max_bytes:
                old, _ = self._items.popitem(last=False)
                del self._sizes[old]

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return sum(self._sizes.values())

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._items), "bytes": self.nbytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses}


def _nbytes(value: object) -> int:
    tensor = value if isinstance(value, torch.Tensor) else getattr(value, "feats", None)
    return tensor.numel() * tensor.element_size() if isinstance(tensor, torch.Tensor) else 0
