"""Running TorchServe: :mod:`~camserve.serving.launcher` (process control) and the
``build-models``, ``serve`` and ``stop`` commands (:mod:`~camserve.serving.commands`).
"""

__all__: list[str] = []
