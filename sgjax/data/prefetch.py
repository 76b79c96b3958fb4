"""Host-to-device prefetch that checkpoints the position the train loop has consumed.

The wrapper keeps `depth` batches already placed on the devices, so the copy of batch k+1 runs
while step k computes and the step never waits on a transfer. A plain prefetch would break exact
resume: the host iterator runs `depth` batches ahead of the loop, and saving its state would skip
them after a restart. So each placed batch carries the host iterator's state right after it was
read, and `get_state` returns the one of the last batch handed out.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Callable, Iterator
from typing import Any


class DevicePrefetch:
  """Iterator over `put(batch)` for the batches of `host_iter`, `depth` ahead of the caller.

  Checkpointable by grain's orbax handler (`get_state`/`set_state`/`start_prefetch`, state as
  bytes). `depth` = 0 places each batch when it is asked for.
  """

  def __init__(self, host_iter: Iterator[Any], put: Callable[[Any], Any], depth: int):
    if depth < 0:
      raise ValueError(f"data.prefetch = {depth}: must be >= 0 (batches placed ahead)")
    self._host, self._put, self._depth = host_iter, put, depth
    self._ready: collections.deque[tuple[Any, Any]] = collections.deque()
    self._consumed_state = host_iter.get_state()

  def __iter__(self) -> DevicePrefetch:
    return self

  def _read_one(self) -> None:
    batch = next(self._host)
    self._ready.append((self._put(batch), self._host.get_state()))

  def __next__(self) -> Any:
    while len(self._ready) < max(self._depth, 1):
      self._read_one()
    batch, self._consumed_state = self._ready.popleft()
    return batch

  def get_state(self) -> bytes:
    state = self._consumed_state
    return state if isinstance(state, bytes) else json.dumps(state).encode()

  def set_state(self, state: bytes) -> None:
    # Batches placed ahead belong to the old position: drop them.
    self._ready.clear()
    host_state = self._host.get_state()
    self._host.set_state(state if isinstance(host_state, bytes) else json.loads(state))
    self._consumed_state = self._host.get_state()

  def start_prefetch(self) -> None:
    if hasattr(self._host, "start_prefetch"):
      self._host.start_prefetch()
