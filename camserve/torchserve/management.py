"""A client of TorchServe's REST management API (``/models``): what is loaded and
whether its workers are READY.

The standard library's :mod:`urllib.request` is enough here: a handful of
loopback GETs with a bearer token, no sessions, retries or streaming, so no HTTP
client becomes a dependency of the serving extra for it.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["ManagementClient", "ManagementError"]


class ManagementError(RuntimeError):
    """The management API could not be reached or answered an error.

    Attributes:
        status: the HTTP status, or None when no answer came.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ManagementClient:
    """Calls TorchServe's management API.

    Args:
        base_url: e.g. ``http://127.0.0.1:8081``.
        token: the management key, or a callable returning the current one (keys
            are rotated by TorchServe), or None without token authorization.
        timeout: seconds per call.
    """

    def __init__(
        self,
        base_url: str,
        token: str | Callable[[], str | None] | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self.timeout = timeout

    def _get(self, path: str) -> Any:
        req = urllib.request.Request(f"{self.base_url}{path}")
        token = self._token() if callable(self._token) else self._token
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            with exc:
                raise ManagementError(
                    f"GET {path}: {exc.code} {exc.read().decode(errors='replace')[:200]}",
                    status=exc.code,
                ) from exc
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise ManagementError(f"GET {path}: {exc}") from exc

    def models(self) -> list[str]:
        """The names of the registered models.

        Raises:
            ManagementError: no answer, or an error status.
        """
        names: list[str] = []
        page = ""
        while True:
            info = self._get(f"/models?limit=100{page}")
            names += [m["modelName"] for m in info.get("models", [])]
            token = info.get("nextPageToken")
            if not token:
                return names
            page = f"&next_page_token={token}"

    def describe(self, name: str) -> list[dict[str, Any]]:
        """``GET /models/{name}``: one entry per version, with its ``workers``.

        Raises:
            ManagementError: no answer, or an error status (404: not registered).
        """
        info = self._get(f"/models/{name}")
        return list(info)

    def worker_status(self, names: Iterable[str]) -> dict[str, list[str]]:
        """Model name -> the status of each of its workers (``READY``, ``UNLOADING``...).

        A model the API does not answer for (not registered yet, server starting)
        has no workers.
        """
        out: dict[str, list[str]] = {}
        for name in names:
            try:
                versions = self.describe(name)
            except ManagementError:
                out[name] = []
                continue
            out[name] = [w.get("status", "") for v in versions for w in v.get("workers", [])]
        return out

    def ready(self, names: Iterable[str]) -> bool:
        """Whether every model named has a READY worker (and at least one is named).

        ``/ping`` answers Healthy while workers crash-loop; this does not.
        """
        status = self.worker_status(names)
        return bool(status) and all("READY" in s for s in status.values())
