"""What happened to one request: filled in by the pipeline, read by metrics and the log."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Outcome:
    request_id: str
    method: str
    path: str
    started: float
    route: str = "none"
    backend: str = "none"
    status: int = 0
    bytes_sent: int = 0
    duration: float = 0.0
    attempts: int = 0
    error: str = ""
    upstream_status: int = 0
    client_ip: str = ""
    bucket: int | None = None
    fallback_from: str = ""

    @property
    def client_gone(self) -> bool:
        return self.status == 499
