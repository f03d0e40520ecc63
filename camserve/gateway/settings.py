"""Settings of the gRPC gateway (pydantic-settings).

Every setting has a default and can come from the environment
(``CAMSERVE_GATEWAY_<NAME>``, e.g. ``CAMSERVE_GATEWAY_PORT=50051``), from a
YAML file (``camserve gateway --config FILE``) or from the command line.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["GatewaySettings", "is_loopback"]


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class GatewaySettings(BaseSettings):
    """Everything the gateway can be told.

    Attributes:
        host: address to listen on (loopback by default).
        port: gRPC port (0: a free port, reported by the server).
        metrics_port: Prometheus metrics port on ``host`` (0: a free port; None: off).
        backend: ``inprocess`` (the service in the gateway's process) or
            ``torchserve`` (TorchServe's gRPC inference API at ``torchserve_address``).
        torchserve_address: ``host:port`` of TorchServe's gRPC inference API.
        torchserve_management_address: ``host:port`` of its gRPC management API.
        torchserve_key_file: TorchServe's ``key_file.json`` (token authorization on;
            read again for every call, TorchServe renews its keys).
        torchserve_token: a fixed inference key instead of the key file.
        max_batch_size: most items of one model per backend call (1: no batching).
        max_batch_delay_ms: how long the first item of a batch may wait for more
            (0: a batch is whatever queued while the previous one ran).
        max_queue_size: most items queued per model; more get RESOURCE_EXHAUSTED.
        max_batch_items: most items of one ExplainBatch call.
        max_message_bytes: largest request and response message.
        max_concurrent_rpcs: most RPCs in progress (more get RESOURCE_EXHAUSTED).
        grace_s: at shutdown, how long items in flight may take to finish.
        token: the bearer token callers must send (``authorization: Bearer <token>``);
            may be unset only when ``host`` is a loopback address.
        tls_cert, tls_key: PEM server certificate chain and key (TLS on when set).
        tls_client_ca: PEM CA bundle; when set, clients must present a certificate it signed.
        health_interval_s: how often each model's health is checked.
    """

    model_config = SettingsConfigDict(env_prefix="CAMSERVE_GATEWAY_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    metrics_port: int | None = Field(9095, ge=0, le=65535)
    backend: Literal["inprocess", "torchserve"] = "inprocess"
    torchserve_address: str = "127.0.0.1:7070"
    torchserve_management_address: str = "127.0.0.1:7071"
    torchserve_key_file: Path | None = None
    torchserve_token: SecretStr | None = None
    max_batch_size: int = Field(16, ge=1, le=1024)
    max_batch_delay_ms: float = Field(0.0, ge=0.0, le=10_000.0)
    max_queue_size: int = Field(64, ge=1, le=100_000)
    max_batch_items: int = Field(64, ge=1, le=10_000)
    max_message_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_concurrent_rpcs: int | None = Field(1024, ge=1)
    grace_s: float = Field(10.0, ge=0.0)
    token: SecretStr | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    health_interval_s: float = Field(2.0, gt=0.0)

    @model_validator(mode="after")
    def _check(self) -> GatewaySettings:
        if self.token is None and not is_loopback(self.host):
            raise ValueError(
                f"host {self.host!r} is not a loopback address: set a token "
                "(CAMSERVE_GATEWAY_TOKEN) to serve beyond this machine"
            )
        if self.token is not None and not self.token.get_secret_value():
            raise ValueError("token must not be empty")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca needs tls_cert and tls_key")
        return self
