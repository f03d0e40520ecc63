"""The TorchServe backend: forwards each item to TorchServe's gRPC inference API
(``Predictions``, the handlers' JSON request format from
:func:`~camserve.codecs.http.encode_json_request`) and decodes the handler's
JSON answer with the same codec (:func:`~camserve.codecs.http.decode_outcome`)
into the same typed outcomes as the in-process service.

Items of one batch are sent concurrently, so TorchServe's own batching groups
them. Model names and worker readiness come from TorchServe's gRPC management
API. Descriptions (layers, labels, methods) come from the model specs in the
model store, loaded once on the CPU, since TorchServe does not know them.

Raw tensor inputs and ``predict_only`` travel in the same JSON format (``tensor``,
``predict_only``), so the audit can score a model served by TorchServe too.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from camserve.codecs.http import decode_error, decode_outcome, encode_json_request
from camserve.errors import (
    CamserveError,
    DeadlineExceededError,
    InvalidRequestError,
    ModelFailureError,
    UnavailableError,
    UnknownNameError,
)
from camserve.service import ModelDescription
from camserve.service.outcomes import ExplainError, Outcome
from camserve.service.request import ExplainRequest

__all__ = ["TorchServeBackend"]


class TorchServeBackend:
    """Forwards items to a running TorchServe.

    Args:
        address: ``host:port`` of TorchServe's gRPC inference API.
        management_address: ``host:port`` of its gRPC management API.
        store: the model store (model specs, for descriptions).
        key_file: TorchServe's ``key_file.json`` (token authorization on); read
            again for every call, since TorchServe renews its keys.
        token: a fixed inference key instead of ``key_file``.
        timeout: seconds an item may take when it has no deadline.
        stub_dir: where TorchServe's stubs are generated.
    """

    device = "torchserve"

    def __init__(
        self,
        address: str,
        management_address: str,
        store: str | Path,
        *,
        key_file: Path | None = None,
        token: str | None = None,
        timeout: float = 60.0,
        stub_dir: Path | None = None,
    ) -> None:
        from camserve.torchserve.protos import load_stubs

        self.address = address
        self.store = Path(store)
        self.key_file = key_file
        self.token = token
        self.timeout = timeout
        out = stub_dir or Path.home() / ".cache" / "camserve" / "torchserve-stubs"
        self._pb, pb_grpc, self._mpb, mpb_grpc = load_stubs(out)
        self._channel = grpc.insecure_channel(address)
        self._inference = pb_grpc.InferenceAPIsServiceStub(self._channel)
        self._mchannel = grpc.insecure_channel(management_address)
        self._management = mpb_grpc.ManagementAPIsServiceStub(self._mchannel)
        self._descriptions: dict[str, ModelDescription] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Any, store: str | Path) -> TorchServeBackend:
        """A backend from the gateway's settings."""
        secret = settings.torchserve_token
        return cls(
            settings.torchserve_address,
            settings.torchserve_management_address,
            store,
            key_file=settings.torchserve_key_file,
            token=secret.get_secret_value() if secret is not None else None,
        )

    def _metadata(self, kind: str) -> tuple[tuple[str, str], ...]:
        key = self.token if kind == "inference" else None
        if self.key_file is not None and self.key_file.exists():
            try:
                key = str(json.loads(self.key_file.read_text())[kind]["key"])
            except (OSError, ValueError, KeyError):
                key = None
        return (("authorization", f"Bearer {key}"),) if key else ()

    def _unavailable(self, exc: grpc.RpcError) -> UnavailableError:
        return UnavailableError(f"TorchServe at {self.address} did not answer: {exc.details()}")

    # --- the protocol ------------------------------------------------------------
    def run(self, requests: Sequence[ExplainRequest]) -> list[Outcome]:
        """Sends every item concurrently; one outcome per item, in order.

        Raises:
            UnavailableError: TorchServe could not be reached for any item.
        """
        metadata = self._metadata("inference")
        calls: list[Any] = []
        outcomes: list[Outcome | None] = [None] * len(requests)
        for i, r in enumerate(requests):
            try:
                body = encode_json_request(r)
            except CamserveError as exc:
                outcomes[i] = ExplainError(r.request_id, r.model, exc)
                calls.append(None)
                continue
            remaining = r.deadline - time.monotonic() if r.deadline is not None else self.timeout
            msg = self._pb.PredictionsRequest(model_name=r.model, input={"data": body})
            calls.append(
                self._inference.Predictions.future(
                    msg, timeout=max(remaining, 0.001), metadata=metadata
                )
            )
        down = 0
        for i, (r, call) in enumerate(zip(requests, calls, strict=True)):
            if call is None:
                continue
            try:
                reply = call.result()
                outcomes[i] = self._decode(reply.prediction, r)
            except grpc.RpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.UNAVAILABLE:
                    down += 1
                    error: CamserveError = self._unavailable(exc)
                elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    error = DeadlineExceededError(
                        "the deadline passed while TorchServe computed it"
                    )
                elif code == grpc.StatusCode.INVALID_ARGUMENT:
                    error = _decoded_error(exc.details() or "", InvalidRequestError)
                else:
                    error = _decoded_error(exc.details() or "", ModelFailureError)
                outcomes[i] = ExplainError(r.request_id, r.model, error)
            except (ValueError, KeyError, TypeError) as exc:
                outcomes[i] = ExplainError(
                    r.request_id,
                    r.model,
                    ModelFailureError(f"undecodable answer from TorchServe: {exc}"),
                )
        if down and down == sum(c is not None for c in calls):
            raise UnavailableError(f"TorchServe at {self.address} is not reachable")
        return [o for o in outcomes if o is not None]

    def model_names(self) -> list[str]:
        """The models TorchServe serves (its management API)."""
        try:
            reply = self._management.ListModels(
                self._mpb.ListModelsRequest(limit=1000),
                timeout=5,
                metadata=self._metadata("management"),
            )
        except grpc.RpcError as exc:
            raise self._unavailable(exc) from exc
        return sorted(m["modelName"] for m in json.loads(reply.msg).get("models", []))

    def ready(self, name: str) -> bool:
        """Whether the model has a READY worker."""
        try:
            reply = self._management.DescribeModel(
                self._mpb.DescribeModelRequest(model_name=name),
                timeout=5,
                metadata=self._metadata("management"),
            )
            info = json.loads(reply.msg)
        except (grpc.RpcError, ValueError):
            return False
        return any(w.get("status") == "READY" for v in info for w in v.get("workers", []))

    def _decode(self, text: bytes, request: ExplainRequest) -> Outcome:
        try:
            d = self.describe(request.model)
        except CamserveError:  # no local spec: VQA answer ids and input-map layers unknown
            return decode_outcome(text, request)
        inputs = frozenset(m.id for m in d.methods if m.resolution == "input")
        return decode_outcome(text, request, labels=d.labels, input_methods=inputs)

    def describe(self, name: str) -> ModelDescription:
        """The model's description, from its spec in the model store (loaded once)."""
        with self._lock:
            cached = self._descriptions.get(name)
            if cached is not None:
                return cached
            from camserve.gateway.inprocess import InProcessBackend

            try:
                local = InProcessBackend.load([name], self.store)
            except UnknownNameError as exc:
                raise UnknownNameError("model", name, self.model_names()) from exc
            d = local.describe(name)
            d = dataclasses.replace(d, device=self.device)
            self._descriptions[name] = d
            return d


def _decoded_error(details: str, default: type[CamserveError]) -> CamserveError:
    """The error of a handler's JSON error body in a status message, if it is one."""
    try:
        return decode_error(json.loads(details))
    except (ValueError, KeyError, TypeError):
        return default(details or "TorchServe failed on this item")
