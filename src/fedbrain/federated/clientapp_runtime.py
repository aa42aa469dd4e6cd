"""One long-lived process per hospital that runs every ClientApp message the SuperNode receives.

    python -m fedbrain.federated.clientapp_runtime --appio-api-address 127.0.0.1:PORT \
        --flwr-dir DIR --parent-pid <SuperNode pid>

Why not Flower's default: a SuperNode with ``--isolation subprocess`` starts a fresh
``flwr-clientapp`` process for each message, and each one imports TensorFlow, rebuilds the model
and reloads the hospital's arrays before training. With two messages per round per hospital
(train, BatchNorm calibration) that cost was 17-29% of every round (session 1, bench/federated.py).

So the launcher starts each SuperNode with ``--isolation process`` (the mode Flower provides for a
ClientApp process managed by someone else, e.g. a side-car container on Kubernetes) and this
process beside it. It is Flower's own SuperExec loop (``run_superexec``: ask the SuperNode's
ClientAppIo API for a message, take its token) with a plugin that runs Flower's own
``run_clientapp`` in this process instead of spawning ``flwr-clientapp``. Only the plugin is
written here; TensorFlow and the ClientApp module are imported once, before the first message.

Like ``flwr-clientapp``, it talks to its SuperNode over loopback without TLS (the ClientAppIo API
is local to the hospital); the SuperNode's link to the SuperLink keeps TLS and authentication.
It exits when its SuperNode does (``--parent-pid``).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appio-api-address", required=True, help="the SuperNode's ClientAppIo API (host:port)")
    parser.add_argument("--flwr-dir", required=True, help="where the SuperNode's app bundles are installed")
    parser.add_argument("--parent-pid", type=int, help="exit when this process (the SuperNode) is gone")
    args = parser.parse_args(argv)

    import tensorflow as tf  # the warm part: once per process, not once per message
    from flwr.proto.clientappio_pb2_grpc import ClientAppIoStub
    from flwr.supercore.superexec.plugin import ClientAppExecPlugin
    from flwr.supercore.superexec.run_superexec import run_superexec
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    import fedbrain.federated.client_app  # noqa: F401  (imports the model and training code now)

    class InProcessClientApp(ClientAppExecPlugin):
        """Runs the ClientApp for a granted token here, to completion, instead of in a new process."""

        def launch_app(self, token: str, run_id: int) -> None:
            # Each message builds its own model: drop the previous one's Keras graph state first.
            tf.keras.backend.clear_session()
            try:
                run_clientapp(clientappio_api_address=self.appio_api_address, token=token,
                              flwr_dir=self.flwr_dir)
            except Exception:  # noqa: BLE001  (a broken bundle must not take the hospital down)
                # run_clientapp already turns the ClientApp's own exceptions into error replies;
                # this is the rest (e.g. an app bundle that fails to install): log, wait for the next.
                logging.getLogger("fedbrain").exception("a ClientApp message of run %s failed", run_id)
            finally:
                gc.collect()

    run_superexec(plugin_class=InProcessClientApp, stub_class=ClientAppIoStub,
                  appio_api_address=args.appio_api_address, flwr_dir=args.flwr_dir,
                  parent_pid=args.parent_pid)


if __name__ == "__main__":
    main()
