"""Flower's ``flower-supernode``, waiting at most WAIT_S between its requests for work (waits.py).

    python -m fedbrain.federated.supernode <flower-supernode's own arguments>

Why: Flower 1.23's SuperNode loop (``flwr.supernode.start_client_internal``) sleeps a fixed 3 s
whenever the SuperLink has no message for it, and a round waits for the last of its hospitals to
get its message: ~2.5 s of every exchange on the 2-core bench (waits.py says which waits and why).
This runs Flower's own SuperNode command unchanged (same arguments, TLS, authentication,
heartbeats) with its sleeps capped at WAIT_S (`ShortSleeps`) and the shorter object-pull backoff
(`shorten_object_pulls`). An idle SuperNode then asks the SuperLink 1/WAIT_S times a second
instead of once every 3 s: negligible for a consortium's handful of hospitals.

It also closes a race in Flower 1.23 that the shorter wait made frequent: the ClientAppIo API
stores a ClientApp's reply in the node state before it registers the reply's objects
(``PushMessage``), and the loop that sends replies then asks for the reply's object tree, which
is not there yet: NoObjectInStoreError, and the SuperNode exits (seen under load on the 2-core
machine: two hospitals lost in one round). Here the sending loop waits for the tree instead.
Later Flower versions store the message and register its objects in one step.
"""

from __future__ import annotations

import time

from fedbrain.federated.lean import block_tensorflow
from fedbrain.federated.waits import WAIT_S, ShortSleeps, shorten_object_pulls


class _RegisteredTrees:
    """The SuperNode's object store, whose `get_object_tree` waits up to `timeout` seconds for a
    reply's objects to be registered (see the module docstring) instead of failing at once."""

    def __init__(self, store, timeout: float = 30.0):
        self._store, self._timeout = store, timeout

    def __getattr__(self, name: str):
        return getattr(self._store, name)

    def get_object_tree(self, object_id: str):
        from flwr.supercore.object_store import NoObjectInStoreError

        deadline = time.monotonic() + self._timeout
        while True:
            try:
                return self._store.get_object_tree(object_id)
            except NoObjectInStoreError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(WAIT_S)


def main() -> None:
    block_tensorflow()  # the ClientApp trains in its own process (lean.py says why)
    from flwr.supernode import start_client_internal as loop
    from flwr.supernode.cli import flower_supernode

    if getattr(loop, "time", None) is not time or not callable(getattr(loop, "_push_messages", None)):
        # Another Flower than the pinned 1.23 may poll differently: stop rather than patch blindly.
        raise RuntimeError("flwr.supernode.start_client_internal no longer has `time` and `_push_messages`: "
                           "check fedbrain.federated.supernode against this Flower version")
    loop.time = ShortSleeps("time")
    shorten_object_pulls()
    push_messages = loop._push_messages

    def push_registered_replies(**kwargs) -> None:
        push_messages(**{**kwargs, "object_store": _RegisteredTrees(kwargs["object_store"])})

    loop._push_messages = push_registered_replies
    flower_supernode()  # reads sys.argv as `flower-supernode` does


if __name__ == "__main__":
    main()
