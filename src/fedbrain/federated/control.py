"""The SuperLink's Control API from inside the launcher: what `flwr supernode register`,
`flwr run --stream`, `flwr ls` and `flwr supernode ls` send, over one TLS channel.

Why not the `flwr` CLI: every `flwr` process imports TensorFlow (Flower's TensorBoard helper
does it at import time when TensorFlow is installed), which costs seconds per call on a
2-core machine. The launcher pays that import once and then makes plain gRPC calls, built with
the same Flower functions the CLI uses (FAB building, protobuf serialisation).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Callable

import grpc
from cryptography.hazmat.primitives import serialization
from flwr.app import ConfigRecord
from flwr.cli.build import build_fab_from_disk
from flwr.common import GRPC_MAX_MESSAGE_LENGTH
from flwr.common.grpc import create_channel
from flwr.common.serde import config_record_to_proto, fab_to_proto, run_from_proto, user_config_to_proto
from flwr.common.typing import Fab
from flwr.proto.control_pb2 import (  # pylint: disable=no-name-in-module
    ListNodesRequest,
    ListRunsRequest,
    RegisterNodeRequest,
    StartRunRequest,
    StreamLogsRequest,
)
from flwr.proto.control_pb2_grpc import ControlStub
from flwr.supercore.primitives.asymmetric import public_key_to_bytes

# A log stream is reopened after this many seconds (as `flwr log` does), so a stalled
# connection cannot hang the launcher.
STREAM_REFRESH_S = 60


class Control:
    """A Control API client for one SuperLink (TLS with our CA, or plaintext when insecure)."""

    def __init__(self, address: str, root_certificates: Path | None, server_name: str | None = None):
        """`server_name`: the name to check the SuperLink's certificate against when the address's host is
        another (the kubernetes launcher dials a Service's DNS name or a port-forward; the certificate
        names the `superlink` Service, as the SuperNodes dial it)."""
        if server_name is None or root_certificates is None:
            self.channel = create_channel(
                server_address=address, insecure=root_certificates is None,
                root_certificates=None if root_certificates is None else Path(root_certificates).read_bytes(),
                max_message_length=GRPC_MAX_MESSAGE_LENGTH)
        else:  # create_channel takes no channel options
            self.channel = grpc.secure_channel(
                address, grpc.ssl_channel_credentials(Path(root_certificates).read_bytes()),
                options=[("grpc.max_send_message_length", GRPC_MAX_MESSAGE_LENGTH),
                         ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_LENGTH),
                         ("grpc.ssl_target_name_override", server_name)])
        self.stub = ControlStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def register_node(self, public_key: Path) -> int:
        """Admit a SuperNode's OpenSSH public key (`flwr supernode register`): its node id."""
        key = serialization.load_ssh_public_key(Path(public_key).read_bytes())
        return self.stub.RegisterNode(RegisterNodeRequest(public_key=public_key_to_bytes(key))).node_id

    def nodes(self) -> list[dict]:
        """Registered SuperNodes and their status (`flwr supernode ls`)."""
        res = self.stub.ListNodes(ListNodesRequest())
        return [{"node-id": n.node_id, "status": n.status} for n in res.nodes_info]

    def start_run(self, app_dir: Path, run_config: dict) -> int:
        """Bundle the app folder and start a run with these run-config overrides (`flwr run`)."""
        fab_bytes = build_fab_from_disk(Path(app_dir))
        fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
        res = self.stub.StartRun(StartRunRequest(
            fab=fab_to_proto(fab), override_config=user_config_to_proto(run_config),
            federation_options=config_record_to_proto(ConfigRecord())))
        if not res.HasField("run_id"):
            raise RuntimeError(f"the SuperLink did not start a run of {app_dir}")
        return res.run_id

    def status(self, run_id: int) -> str:
        """'pending', 'running', 'finished:completed', 'finished:failed', ... (`flwr ls`)."""
        res = self.stub.ListRuns(ListRunsRequest(run_id=run_id))
        run = run_from_proto(res.run_dict[run_id])
        return f"{run.status.status}:{run.status.sub_status}" if run.status.sub_status else run.status.status

    def stream_logs(self, run_id: int, on_line: Callable[[str], None]) -> None:
        """The ServerApp's log, line by line, until the run has ended (`flwr run --stream`)."""
        after, pending = 0.0, ""
        while True:
            try:
                for res in self.stub.StreamLogs(StreamLogsRequest(run_id=run_id, after_timestamp=after),
                                                timeout=STREAM_REFRESH_S):
                    pending += res.log_output
                    *lines, pending = pending.split("\n")
                    for line in lines:
                        on_line(line)
                    after = max(after, res.latest_timestamp)
                break  # the SuperLink closes the stream once the run has finished
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:  # pylint: disable=no-member
                    raise
                time.sleep(0.5)
        if pending:
            on_line(pending)
