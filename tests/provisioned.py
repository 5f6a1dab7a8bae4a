"""A provisioned federation of real processes (`fedadmin provision`, then `poc start`) for a test module's fixture."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from conftest import free_port
from signing import signed_header
from test_hostile import fedadmin, project_yaml, provision

from fedcommon.kit import channel_credentials, load_kit
from fedcommon.wire import admin_pb2 as apb
from fedcommon.wire import admin_pb2_grpc as admin_grpc


@dataclass
class ProvisionedFederation:
    """The kits' folder of a running federation; stubs to its admin port as any of its admins."""

    out: Path

    def stub(self, admin: str) -> admin_grpc.AdminServiceStub:
        kit = load_kit(self.out / admin)
        return admin_grpc.AdminServiceStub(grpc.secure_channel(kit.admin_target, channel_credentials(kit)))

    def upload(self, admin: str, data: bytes) -> str:
        """Upload `data` as `admin`; returns its blob id."""
        header = signed_header(self.out / admin, data)  # signed by the uploader's kit, as the console does
        self.stub(admin).Upload(iter([apb.BlobChunk(header=header), apb.BlobChunk(data=data)]), timeout=30)
        return header.sha256

    def execute(
        self, admin: str, command: str, targets: list[str], args: dict, timeout: float = 10
    ) -> apb.CommandReply:
        request = apb.CommandRequest(command=command, targets=targets, args_json=json.dumps(args), timeout=timeout)
        return self.stub(admin).Execute(request, timeout=60)


@contextlib.contextmanager
def running(
    root: Path,
    project: str,
    sites: dict[str, str],
    admins: dict[str, tuple[str, str]],
    admin: str,
    local_policies: dict[str, dict] | None = None,
) -> Iterator[Path]:
    """Provision `project` under root/out, give each named site its local/authorization.json, start the server and
    every site, and yield root/out once `admin` sees every site connected; everything is stopped afterwards."""
    yml = root / "project.yml"
    yml.write_text(project_yaml(project, free_port(), free_port(), sites, admins))
    out = root / "out"
    provision(yml, out)
    for site, policy in (local_policies or {}).items():
        (out / site / "local").mkdir(exist_ok=True)
        (out / site / "local" / "authorization.json").write_text(json.dumps(policy))
    started = fedadmin("poc", "start", "--workspace", str(out), timeout=180)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        fed = ProvisionedFederation(out)
        deadline = time.monotonic() + 60
        while True:
            reply = fed.stub(admin).Execute(
                apb.CommandRequest(command="status", targets=["server"]), timeout=30, wait_for_ready=True
            )
            if set(sites) <= set(json.loads(reply.replies[0].data_json)["connected_sites"]):
                break
            assert time.monotonic() < deadline, f"the sites never connected: {reply}"
            time.sleep(0.5)
        yield out
    finally:
        fedadmin("poc", "stop", "--workspace", str(out), timeout=120)
