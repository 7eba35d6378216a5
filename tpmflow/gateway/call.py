"""One request's bookkeeping as it goes through the gateway, and its retry state."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from tpmflow.access import Principal, Reservation


@dataclass
class Call:
    """One request: who asks, under which id, and what it has cost so far."""

    endpoint: str
    principal: Principal
    request_id: str  # the client's correlation id (X-Request-Id), or one made up for it
    started: float = field(default_factory=time.monotonic)
    queue_ms: float = 0.0
    content_hash: str = ""
    version: str = ""  # X-Tpmflow-Version: only replicas serving this version may answer
    body_bytes: int = 0  # size of the JSON body as received (bounds inline payload bytes)
    reservation: Reservation | None = None  # SUs set aside at admission (projects with an allocation)
    charged_su: float = 0.0  # SUs its ledger rows charged so far; settled when the request is done
    queries: int = 0  # knowledge searches it makes (priced per query)
    group: str | None = None  # the replica group that must answer (the text embedder's); None: the class's


@dataclass
class Attempts:
    """Retry state of one request: replicas tried, and the id of the last failed attempt."""

    tried: set[str] = field(default_factory=set)
    count: int = 0
    previous: str | None = None

    @staticmethod
    def new_id() -> str:
        """A fresh attempt id: the ledger's key and vLLM's request id, unique whatever the client sends."""
        return uuid.uuid4().hex

    def failed(self, attempt_id: str) -> None:
        self.previous, self.count = attempt_id, self.count + 1
