"""Fault injection: make calls fail the way a real cloud does, at given rates, reproducibly.

Spec: "UNAVAILABLE=0.3,DEADLINE_EXCEEDED=0.05,lost=0.1,seed=7". Each status rate is the chance that a
call is refused with that status before it does anything. `lost` is the chance that a mutating call
is carried out but its reply is replaced by UNAVAILABLE, as when a response is lost on the network.
The same draws serve every gRPC service and the storage JSON API, where a status becomes its HTTP
equivalent (UNAVAILABLE 503, DEADLINE_EXCEEDED 504, RESOURCE_EXHAUSTED 429 ...), as Google's APIs map them.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from dataclasses import dataclass, field
from http import HTTPStatus

import grpc

_STATUSES = {code.name: code for code in grpc.StatusCode}
# google.rpc.Code -> HTTP, as documented in google/rpc/code.proto (CANCELLED's 499 has no HTTPStatus).
HTTP_STATUS = {
    grpc.StatusCode.CANCELLED: HTTPStatus.INTERNAL_SERVER_ERROR,
    grpc.StatusCode.UNKNOWN: HTTPStatus.INTERNAL_SERVER_ERROR,
    grpc.StatusCode.INVALID_ARGUMENT: HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.DEADLINE_EXCEEDED: HTTPStatus.GATEWAY_TIMEOUT,
    grpc.StatusCode.NOT_FOUND: HTTPStatus.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS: HTTPStatus.CONFLICT,
    grpc.StatusCode.PERMISSION_DENIED: HTTPStatus.FORBIDDEN,
    grpc.StatusCode.RESOURCE_EXHAUSTED: HTTPStatus.TOO_MANY_REQUESTS,
    grpc.StatusCode.FAILED_PRECONDITION: HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.ABORTED: HTTPStatus.CONFLICT,
    grpc.StatusCode.OUT_OF_RANGE: HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.UNIMPLEMENTED: HTTPStatus.NOT_IMPLEMENTED,
    grpc.StatusCode.INTERNAL: HTTPStatus.INTERNAL_SERVER_ERROR,
    grpc.StatusCode.UNAVAILABLE: HTTPStatus.SERVICE_UNAVAILABLE,
    grpc.StatusCode.DATA_LOSS: HTTPStatus.INTERNAL_SERVER_ERROR,
    grpc.StatusCode.UNAUTHENTICATED: HTTPStatus.UNAUTHORIZED,
}


@dataclass
class Faults:
    rates: dict[grpc.StatusCode, float] = field(default_factory=dict)
    lost: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)
        self._lock = threading.Lock()
        # What was injected so far, by status name and "lost": the figures of a fault campaign.
        self.injected: Counter[str] = Counter()

    @classmethod
    def parse(cls, spec: str | None) -> Faults:
        faults = cls()
        if not spec:
            return faults
        rates: dict[grpc.StatusCode, float] = {}
        lost, seed = 0.0, 0
        for item in spec.split(","):
            key, sep, value = item.strip().partition("=")
            if not sep:
                raise ValueError(f"fault {item!r} is not KEY=VALUE")
            if key == "seed":
                seed = int(value)
                continue
            rate = float(value)
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"fault rate {item!r} must be between 0 and 1")
            if key == "lost":
                lost = rate
            elif key in _STATUSES and key != "OK":
                rates[_STATUSES[key]] = rate
            else:
                raise ValueError(f"unknown fault {key!r}: use a gRPC status name, 'lost' or 'seed'")
        if sum(rates.values()) > 1.0:
            raise ValueError("fault rates add up to more than 1")
        return cls(rates=rates, lost=lost, seed=seed)

    def refusal(self) -> grpc.StatusCode | None:
        """The status to refuse this call with, or None to let it through."""
        if not self.rates:
            return None
        with self._lock:
            draw = self._random.random()
            for code, rate in self.rates.items():
                if draw < rate:
                    self.injected[code.name] += 1
                    return code
                draw -= rate
        return None

    def reply_lost(self) -> bool:
        if self.lost <= 0:
            return False
        with self._lock:
            lost = self._random.random() < self.lost
            if lost:
                self.injected["lost"] += 1
        return lost
