"""SIRA: typed Python client for the SIRA decision server.

    from sira import Client

    with Client("localhost:50051", token=token) as sira:
        decision = sira.assign("checkout-button-color", "user-123", {"country": "SN"})
        sira.track(
            experiment="checkout-button-color",
            subject_id="user-123",
            variant_id=decision.variant.id,
            value=49.99,
            currency="EUR",
        )

From a subject's browser or app, without a token, track with the decision's proof
(the server hands `decision.tracking_token` to the app along with the variant):

    with Client("localhost:50051") as public:
        public.track(
            experiment=decision.experiment_id,
            subject_id="user-123",
            variant_id=decision.variant.id,
            tracking_token=decision.tracking_token,
        )

Generated messages and stubs live in `sira.experiments.v1`; the admin CLI is
`sira` (`sira.cli`).
"""

from __future__ import annotations

from sira.client import AsyncClient, Client, RetryPolicy, tracked_event
from sira.errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    ErrorReason,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    SiraError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    UnknownError,
    from_rpc_error,
)

__all__ = [
    "AlreadyExistsError",
    "AsyncClient",
    "Client",
    "DeadlineExceededError",
    "ErrorReason",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "RetryPolicy",
    "SiraError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "from_rpc_error",
    "tracked_event",
]
