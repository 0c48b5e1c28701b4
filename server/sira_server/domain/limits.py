"""Every input limit of the API, in one place (the proto comments and docs cite these).

A request is checked against them at the edge (`sira_server.api.edge`) before any
servicer runs, so nothing outside them is ever acknowledged or written: what the
write-behind sends to Postgres always fits the schema's types and CHECKs.

Text: every string field rejects Unicode control characters (category Cc: U+0000-U+001F,
U+007F-U+009F). Only the free-text fields (`description`, the stop `reason`, string
values inside a variant `config`) may keep tab, line feed and carriage return. Lengths
count characters (code points), as Postgres's ``length()`` does.

Numbers: every double rejects NaN and +-Infinity; the bounds of each are below.

Errors: a message or error detail quotes at most `MAX_QUOTED_CHARS` characters of any
input, and the whole status is capped (`MAX_ERROR_*`), so its trailers stay a few KiB
whatever the request.
"""

from __future__ import annotations

from typing import Final

# --- text fields (characters) -------------------------------------------------------

MAX_REFERENCE_CHARS: Final = 64
"""An experiment or variant reference: its id (a UUID, 36) or its key (at most 64)."""
MAX_KEY_CHARS: Final = 64
"""Experiment and variant keys (also the schema's CHECK)."""
MAX_NAME_CHARS: Final = 200
"""Experiment and variant names (also the schema's CHECK)."""
MAX_DESCRIPTION_CHARS: Final = 2000
"""Experiment description; free text (tab and new lines allowed)."""
MAX_REASON_CHARS: Final = 2000
"""StopExperiment's reason; free text (tab and new lines allowed)."""
MAX_SUBJECT_ID_CHARS: Final = 256
"""A subject id (molam_id), 1..256 (also the schema's CHECK)."""
MAX_CONTEXT_VALUE_CHARS: Final = 128
"""SubjectContext country, language, device and user_segment."""
MAX_CONTEXT_ATTRIBUTES: Final = 64
"""Free attributes in one SubjectContext."""
MAX_ATTRIBUTE_KEY_CHARS: Final = 64
"""A free attribute's name (context and targeting)."""
MAX_ATTRIBUTE_VALUE_CHARS: Final = 256
"""A free attribute's value (context and targeting)."""
MAX_CONTEXT_BYTES: Final = 8 * 1024
"""A SubjectContext's strings together (UTF-8): it is stored with every assignment."""
MAX_EVENT_ID_CHARS: Final = 128
"""Track's client_event_id (also the schema's CHECK)."""
MAX_TRACKING_TOKEN_CHARS: Final = 128
"""Track's tracking_token: a Decision's token is about 60 characters."""
MAX_EVENT_NAME_CHARS: Final = 64
"""A custom event name and the primary metric: an event type slug."""
MAX_CURRENCY_CHARS: Final = 3
"""ISO 4217 code."""
MAX_PAGE_TOKEN_CHARS: Final = 256
"""A page_token; the server's own tokens are about 150 characters."""
MAX_FIELD_MASK_PATHS: Final = 16
MAX_FIELD_MASK_PATH_CHARS: Final = 64
MAX_ACTOR_CHARS: Final = 256
"""A token's ``sub`` claim: the actor written to the audit log."""
MAX_OUTPUT_ONLY_CHARS: Final = 2000
"""Output-only strings a client may echo back (ignored, but still bounded)."""

# --- collections ------------------------------------------------------------------------

MIN_VARIANTS: Final = 2
MAX_VARIANTS: Final = 20
MAX_TARGETING_VALUES: Final = 256
"""Entries in each targeting list (countries, languages, devices, user_segments)."""
MAX_TARGETING_ATTRIBUTES: Final = 64
"""Free attributes in one targeting rule."""
MAX_TARGETING_ATTRIBUTE_VALUES: Final = 100
"""Accepted values of one targeting attribute."""
MAX_TARGETING_BYTES: Final = 16 * 1024
"""A targeting rule as compact JSON (what Postgres stores)."""
MAX_BATCH_EVENTS: Final = 1000
"""Events in one TrackBatch."""

# --- variant configs (google.protobuf.Struct) -----------------------------------------------

MAX_CONFIG_BYTES: Final = 16 * 1024
"""A variant config as compact UTF-8 JSON: it travels with every decision."""
MAX_CONFIG_WIRE_BYTES: Final = 2 * MAX_CONFIG_BYTES
"""A config's protobuf size, checked before it is converted to JSON at all."""
MAX_CONFIG_DEPTH: Final = 8
"""Nesting of objects and lists in a config (the config itself is depth 1)."""
MAX_CONFIG_KEY_CHARS: Final = 256

# --- numbers ------------------------------------------------------------------------------

MAX_INT64: Final = 2**63 - 1
MAX_VARIANT_WEIGHT: Final = 1e9
"""FIXED_WEIGHTS weight, in (0, 1e9]: twenty of them still sum to a finite number."""
DEFAULT_MAX_EVENT_VALUE: Final = 1e12
"""Default of the setting SIRA_MAX_EVENT_VALUE: the largest Track value accepted."""
MAX_FUTURE_SKEW_MS: Final = 5 * 60 * 1000
"""A Track occur_time may be this far ahead of the server's clock."""
MIN_TIMESTAMP_SECONDS: Final = -62_135_596_800
"""0001-01-01T00:00:00Z, the first valid google.protobuf.Timestamp."""
MAX_TIMESTAMP_SECONDS: Final = 253_402_300_799
"""9999-12-31T23:59:59Z, the last valid google.protobuf.Timestamp."""

# --- what an error may carry -----------------------------------------------------------

MAX_QUOTED_CHARS: Final = 100
"""Characters of any input an error message or detail quotes."""
MAX_ERROR_MESSAGE_BYTES: Final = 512
"""The status message (UTF-8); longer ones are cut."""
MAX_ERROR_VIOLATIONS: Final = 10
"""Field violations in one BadRequest; the message says how many more there were."""
MAX_ERROR_FIELD_BYTES: Final = 128
MAX_ERROR_DESCRIPTION_BYTES: Final = 256
MAX_ERROR_METADATA_BYTES: Final = 128
"""Each ErrorInfo metadata value."""
