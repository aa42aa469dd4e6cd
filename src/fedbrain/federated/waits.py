"""Shorter waits inside Flower 1.23's processes, none of which Flower lets us configure.

Every Flower exchange moves a message and then its objects (the weights), and each process that
receives one polls or backs off while it waits. Two waits dominated our rounds on the 2-core
bench (bench/federated.py), so each is capped at WAIT_S here:

- The SuperNode loop sleeps a fixed 3 s when the SuperLink has no message for it and 0.5 s
  between checks for its ClientApp's reply (`ShortSleeps`, installed by supernode.py).
- Pulling a message's objects backs off 1 s, then 2, 4 ... s, whenever an object is registered
  but not yet stored (`shorten_object_pulls`). That is the usual case, not a failure: the
  SuperNode stores a message for its ClientApp before it has pulled the message's objects from
  the SuperLink (seen in the ClientApp process: a 3 KB message waited 1.08 s in that backoff).
  The SuperLink's messages are pushed before their objects too, so the ServerApp and the
  SuperNodes can hit the same wait; that was not profiled separately.
  Installed in every process that pulls: the ServerApp, each SuperNode and each ClientApp runtime.

Only how long a process waits between tries changes; what is sent, and the total time a pull
may take before it fails (Flower's PULL_MAX_TIME, 2 hours), stay as they are.
"""

from __future__ import annotations

import time
import types

WAIT_S = 0.2
FIRST_RETRY_S = 0.05
# The longest the ServerApp waits for the objects of one reply it has already been told of. A live
# SuperNode uploads them right after the reply (seconds for the cnn's 11 MB, or a Paillier update,
# on loopback); a reply whose SuperNode died between the two never completes, and one pull may
# hold every other reply of the round behind it.
REPLY_OBJECTS_WAIT_S = 60.0


class ShortSleeps(types.ModuleType):
    """The `time` module as the SuperNode loop sees it: everything as usual but shorter sleeps."""

    def __getattr__(self, name: str):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(min(seconds, WAIT_S))


def shorten_object_pulls() -> None:
    """Retry an object that is not there yet after FIRST_RETRY_S, doubling up to WAIT_S (Flower:
    1 s doubling up to 10 s, 500 tries), with as many tries as Flower's PULL_MAX_TIME allows.

    Sets the keyword defaults of the two pull functions every Flower caller in this process goes
    through (none of them passes its own backoff); refuses to run against another Flower."""
    from flwr.common import constant, inflatable_utils

    functions = (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree)
    names = {"initial_backoff", "backoff_cap", "max_tries_per_object"}
    if not all(names <= set(f.__kwdefaults__ or {}) for f in functions):
        raise RuntimeError("flwr.common.inflatable_utils' pull functions no longer take initial_backoff, "
                           "backoff_cap and max_tries_per_object: check fedbrain.federated.waits against "
                           "this Flower version")
    for function in functions:
        function.__kwdefaults__.update(initial_backoff=FIRST_RETRY_S, backoff_cap=WAIT_S,
                                       max_tries_per_object=int(constant.PULL_MAX_TIME / WAIT_S))


def limit_object_pulls(seconds: float) -> None:
    """Let a pull of a message's objects that starts now give up after `seconds`, and never later
    than REPLY_OBJECTS_WAIT_S (Flower: 2 h).

    The ServerApp sets this to the time left in the phase before it pulls replies. A SuperNode
    that dies after pushing its reply but before uploading the reply's objects leaves the reply
    registered with objects that never arrive; Flower's pull then retries for PULL_MAX_TIME and
    the round's `round-timeout` never comes into play (seen in the crash test: the ServerApp
    stalled in pull_objects). When the limit is reached Flower returns the reply as an error
    message, which the round records as that hospital's failure. Capped because the pull of that
    reply held the whole round's remaining time: replies that arrived meanwhile were then past the
    deadline and recorded as missing (seen: a live hospital's reply lost, the round 300 s long)."""
    from flwr.common import constant, inflatable_utils

    defaults = inflatable_utils.pull_objects.__kwdefaults__ or {}
    if "max_time" not in defaults:
        raise RuntimeError("flwr.common.inflatable_utils.pull_objects no longer takes max_time: "
                           "check fedbrain.federated.waits against this Flower version")
    defaults["max_time"] = max(0.0, min(seconds, REPLY_OBJECTS_WAIT_S, constant.PULL_MAX_TIME))
