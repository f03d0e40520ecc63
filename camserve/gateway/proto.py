"""The generated stubs of ``camserve/v1/explanation.proto``, generated first if missing.

Import the messages from here: ``from camserve.gateway.proto import pb, pb_grpc``.
"""

from __future__ import annotations

from camserve.gateway import codegen

codegen.ensure()

from camserve.gateway._generated import explanation_pb2 as pb  # noqa: E402
from camserve.gateway._generated import explanation_pb2_grpc as pb_grpc  # noqa: E402

__all__ = ["SERVICE_NAME", "pb", "pb_grpc"]

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["ExplanationService"].full_name
"""``camserve.v1.ExplanationService``."""
