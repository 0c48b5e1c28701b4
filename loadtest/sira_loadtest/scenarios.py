"""Where each call's method and bytes come from: one `--call`, or a predefined mix.

Scenarios (`--scenario`, all aimed at `--experiment KEY`):

- assign-heavy: Assign only; 80 % returning subjects (drawn from the pool of
  `--subjects` ids, pre-assigned before the clock starts), 20 % new subjects.
- track-heavy: Track only; a CONVERSION for a pre-assigned subject, naming the
  variant it was given, with a unique client_event_id (no duplicates).
- mixed: 70 % Assign (same 80/20 subject mix), 30 % Track as above.
- assign-new: Assign only, every call a subject never seen before.
- assign-returning: Assign only, every call a pre-assigned subject (a sticky hit).
- track-batch: TrackBatch of `TRACK_BATCH_EVENTS` conversions as track-heavy's, each
  with its own unique client_event_id.

Requests are built with the generated message classes and serialised per call
(a couple of microseconds), never through JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from sira.experiments.v1 import assignment_service_pb2, tracking_service_pb2
from sira_loadtest.config import LoadConfig
from sira_loadtest.descriptors import method_input
from sira_loadtest.payloads import Encoder, StaticEncoder, build_encoder
from sira_loadtest.template import RenderContext, returning_subject_id

ASSIGN_METHOD = "/sira.experiments.v1.AssignmentService/Assign"
TRACK_METHOD = "/sira.experiments.v1.TrackingService/Track"
TRACK_BATCH_METHOD = "/sira.experiments.v1.TrackingService/TrackBatch"
TRACK_BATCH_EVENTS = 100
"""track-batch: events per TrackBatch call."""
RETURNING_SHARE = 0.8
"""assign-heavy and mixed: share of Assign calls for a returning subject."""
MIXED_ASSIGN_SHARE = 0.7
"""mixed: share of Assign calls (the rest are Track)."""
CONVERSION_CURRENCY = "XOF"


class CallSource(Protocol):
    """Produces the next call of one in-flight slot."""

    @property
    def methods(self) -> tuple[str, ...]: ...

    def next_call(self, ctx: RenderContext) -> tuple[str, bytes]: ...


@dataclass(frozen=True)
class SingleCall:
    """`--call` with a `-d` template."""

    method: str
    encoder: Encoder

    @property
    def methods(self) -> tuple[str, ...]:
        return (self.method,)

    def next_call(self, ctx: RenderContext) -> tuple[str, bytes]:
        return self.method, self.encoder.encode(ctx)


@dataclass(frozen=True)
class AssignMix:
    experiment: str
    pool_size: int
    returning_share: float = RETURNING_SHARE
    methods: tuple[str, ...] = (ASSIGN_METHOD,)

    def next_call(self, ctx: RenderContext) -> tuple[str, bytes]:
        if ctx.rng.random() < self.returning_share:
            subject = ctx.ids.returning_subject(ctx.rng.randrange(self.pool_size))
        else:
            subject = ctx.ids.new_subject()
        request = assignment_service_pb2.AssignRequest(
            experiment=self.experiment, subject_id=subject
        )
        return ASSIGN_METHOD, request.SerializeToString()


@dataclass(frozen=True)
class TrackConversions:
    experiment: str
    preassigned: Sequence[tuple[str, str]]
    """(subject id, variant id or key); never empty (see `build_source`)."""
    methods: tuple[str, ...] = (TRACK_METHOD,)

    def event(self, ctx: RenderContext) -> tracking_service_pb2.TrackedEvent:
        subject, variant = self.preassigned[ctx.rng.randrange(len(self.preassigned))]
        return tracking_service_pb2.TrackedEvent(
            experiment=self.experiment,
            subject_id=subject,
            variant_id=variant,
            event_type=tracking_service_pb2.EVENT_TYPE_CONVERSION,
            value=float(ctx.rng.randrange(500, 50_000)),
            currency=CONVERSION_CURRENCY,
            client_event_id=ctx.ids.new_event(),
        )

    def next_call(self, ctx: RenderContext) -> tuple[str, bytes]:
        request = tracking_service_pb2.TrackRequest(event=self.event(ctx))
        return TRACK_METHOD, request.SerializeToString()


@dataclass(frozen=True)
class TrackBatches:
    track: TrackConversions
    size: int = TRACK_BATCH_EVENTS
    methods: tuple[str, ...] = (TRACK_BATCH_METHOD,)

    def next_call(self, ctx: RenderContext) -> tuple[str, bytes]:
        events = [self.track.event(ctx) for _ in range(self.size)]
        request = tracking_service_pb2.TrackBatchRequest(events=events)
        return TRACK_BATCH_METHOD, request.SerializeToString()


@dataclass(frozen=True)
class Mixed:
    assign: AssignMix
    track: TrackConversions
    assign_share: float = MIXED_ASSIGN_SHARE
    methods: tuple[str, ...] = (ASSIGN_METHOD, TRACK_METHOD)

    def next_call(self, ctx: RenderContext) -> tuple[str, bytes]:
        if ctx.rng.random() < self.assign_share:
            return self.assign.next_call(ctx)
        return self.track.next_call(ctx)


def build_source(config: LoadConfig) -> CallSource:
    """The call source of a validated config (scenario set up already, if any)."""
    if not config.scenario:
        if config.binary:
            return SingleCall(config.call, StaticEncoder(config.binary))
        message_class = (
            method_input(config.descriptor_set, config.call) if config.descriptor_set else None
        )
        return SingleCall(config.call, build_encoder(config.call, config.data, message_class))
    assign = AssignMix(config.experiment, config.returning_subjects)
    # Without a known assignment (setup failed) Track still runs, naming no
    # variant: the server rejects those calls and the report shows why.
    preassigned = config.preassigned or tuple(
        (returning_subject_id(config.subject_prefix, i), "")
        for i in range(config.returning_subjects)
    )
    track = TrackConversions(config.experiment, preassigned)
    if config.scenario == "assign-heavy":
        return assign
    if config.scenario == "track-heavy":
        return track
    if config.scenario == "assign-new":
        return replace(assign, returning_share=0.0)
    if config.scenario == "assign-returning":
        return replace(assign, returning_share=1.0)
    if config.scenario == "track-batch":
        return TrackBatches(track)
    return Mixed(assign, track)
