"""What the TorchServe handlers and the gRPC gateway share (no ``ts`` imports here).

Modules: :mod:`~camserve.serving.images` (decoding with caps),
:mod:`~camserve.serving.request` and :mod:`~camserve.serving.response` (the wire
format), :mod:`~camserve.serving.batch` and :mod:`~camserve.serving.tasks` (from
a batch of requests to engine calls and back), :mod:`~camserve.serving.metrics`
(every metric) and :mod:`~camserve.serving.archive` (archiving for TorchServe;
running it is :mod:`camserve.torchserve`).
"""

__all__: list[str] = []
