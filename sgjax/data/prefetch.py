"""Host-to-device prefetch: grain's own thread prefetch, with the device placement in its thread.

`grain.experimental.ThreadPrefetchDatasetIterator` reads ahead in a background thread and
records the host iterator's state right after each element, and its `get_state` is the state of
the last element handed out. So the checkpointed position is the batch the train loop consumed,
not the one the thread has read up to, and resume stays bit-exact (tests/test_loop.py,
tests/test_preemption.py). It replaced a hand-written synchronous wrapper with the same
checkpoint rule; on the 2-core CPU both fed the demo step equally fast (docs/status.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grain

from sgjax import errors


class _Placed(grain.DatasetIterator):
  """The host iterator's batches passed through `put`; position and state are the host's."""

  def __init__(self, host_iter: grain.DatasetIterator, put: Callable[[Any], Any]):
    super().__init__(host_iter)
    self._put = put

  def __next__(self) -> Any:
    return self._put(next(self._parent))

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)


class DevicePrefetch(grain.experimental.ThreadPrefetchDatasetIterator):
  """Iterator over `put(batch)` for the batches of `host_iter`, placed by a background thread.

  The thread keeps `depth` placed batches queued and is at most one more ahead (it blocks
  holding it), so up to `depth` + 1 batches beyond the consumed one exist on the devices.
  `depth` = 0 places each batch in the caller's thread when it is asked for. Checkpointable by
  grain's orbax handler; `set_state` stops the thread and drops what it had read ahead. The
  thread stops when the iterator is closed or garbage-collected.
  """

  def __new__(cls, host_iter: grain.DatasetIterator, put: Callable[[Any], Any], depth: int):
    # Checked before the object exists: grain's __del__ of a half-built iterator would raise.
    if depth < 0:
      raise errors.UserError(f"data.prefetch = {depth}", "must be >= 0 (batches placed ahead)")
    return super().__new__(cls)

  def __init__(self, host_iter: grain.DatasetIterator, put: Callable[[Any], Any], depth: int):
    super().__init__(_Placed(host_iter, put), depth)
