"""TestFederatedClient: a FederatedClient with an explicit login step, for tests and tools."""

from __future__ import annotations

from fedclient.fed_client import FederatedClient
from fedclient.fed_privacy import privacy_from_params


class TestFederatedClient(FederatedClient):
    """FederatedClient whose privacy settings come as parameters; client_login returns the token.

    privacy_params: None, a privacy filter, or {"name": "SVTProtocol", "args": {...}} as in config_fed_client.json.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        client_id,
        client_args,
        secure_train,
        server_args=None,
        exclude_vars=None,
        privacy_params=None,
        req_processors=None,
    ):
        super().__init__(
            client_id,
            client_args,
            secure_train,
            server_args,
            exclude_vars,
            privacy=privacy_from_params(privacy_params),
            req_processors=req_processors,
        )

    def client_login(self, task_name: str) -> str:
        """Register with the task's server and return the session token."""
        return self.client_register(task_name)
