"""One long-lived process per hospital that runs every ClientApp message the SuperNode receives.

    python -m fedbrain.federated.clientapp_runtime --appio-api-address 127.0.0.1:PORT \
        --flwr-dir DIR --parent-pid <SuperNode pid>

Why not Flower's default: a SuperNode with ``--isolation subprocess`` starts a fresh
``flwr-clientapp`` process for each message, and each one imports TensorFlow, rebuilds the model
and reloads the hospital's arrays before training. With two messages per round per hospital
(train, BatchNorm calibration) that cost was 17-29% of every round (session 1, bench/federated.py).

So the launcher starts each SuperNode with ``--isolation process`` (the mode Flower provides for a
ClientApp process managed by someone else, e.g. a side-car container on Kubernetes) and this
process beside it. It does what Flower's SuperExec loop (``run_superexec``) does: ask the
SuperNode's ClientAppIo API for a run with a message waiting, take its token, and run Flower's
own ``run_clientapp`` for it, here, instead of spawning ``flwr-clientapp``. TensorFlow and the
ClientApp module are imported once, before the first message. The loop is written out only to
ask every 0.1 s instead of every 1 s: each round waits for its slowest hospital's message to be
picked up, and at most a second of that was pure polling.

Like ``flwr-clientapp``, it talks to its SuperNode over loopback without TLS (the ClientAppIo API
is local to the hospital); the SuperNode's link to the SuperLink keeps TLS and authentication.
It exits when its SuperNode does (``--parent-pid``).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

POLL_S = 0.1  # how often to ask the SuperNode for a waiting message (Flower's SuperExec: 1 s)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appio-api-address", required=True, help="the SuperNode's ClientAppIo API (host:port)")
    parser.add_argument("--flwr-dir", required=True, help="where the SuperNode's app bundles are installed")
    parser.add_argument("--parent-pid", type=int, help="exit when this process (the SuperNode) is gone")
    args = parser.parse_args(argv)

    import grpc
    import tensorflow  # noqa: F401  (the warm part: once per process, not once per message)
    from flwr.common.grpc import create_channel
    from flwr.proto.appio_pb2 import ListAppsToLaunchRequest, RequestTokenRequest
    from flwr.proto.clientappio_pb2_grpc import ClientAppIoStub
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    import fedbrain.federated.client_app  # noqa: F401  (imports the model and training code now)
    from fedbrain.federated.waits import shorten_object_pulls

    shorten_object_pulls()  # a message's objects are fetched while we already ask for them

    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)
    stub = ClientAppIoStub(create_channel(server_address=args.appio_api_address, insecure=True,
                                          root_certificates=None))
    log = logging.getLogger("fedbrain")
    while True:
        try:
            runs = stub.ListAppsToLaunch(ListAppsToLaunchRequest()).run_ids
            token = stub.RequestToken(RequestTokenRequest(run_id=runs[0])).token if runs else ""
        except grpc.RpcError as error:  # the SuperNode is starting or stopping: ask again
            log.debug("ClientAppIo API not answering: %s", error.code())
            token = ""
        if not token:
            time.sleep(POLL_S)
            continue
        try:
            run_clientapp(clientappio_api_address=args.appio_api_address, token=token, flwr_dir=args.flwr_dir)
        except Exception:  # noqa: BLE001  (a broken bundle must not take the hospital down)
            # run_clientapp already turns the ClientApp's own exceptions into error replies;
            # this is the rest (e.g. an app bundle that fails to install): log, wait for the next.
            log.exception("a ClientApp message of run %s failed", runs[0])
            gc.collect()  # run_clientapp collects after a reply it sent (~0.6 s here), not after this


if __name__ == "__main__":
    main()
