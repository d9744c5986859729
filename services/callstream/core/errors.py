"""Error types that decide what happens to a failed event or request.

InvalidInputError: the input itself is bad (corrupt audio, missing file, undecodable message). Kafka
consumers dead-letter it; gRPC answers INVALID_ARGUMENT. Retrying cannot help.
TransientError: a dependency is briefly unavailable (engine down, broker timeout). Kafka consumers retry
with back-off before dead-lettering; gRPC answers UNAVAILABLE.
"""


class CallstreamError(Exception):
    """Base class for callstream's own errors."""


class InvalidInputError(CallstreamError):
    """The event or request cannot be processed as given."""


class AudioNotFoundError(InvalidInputError):
    """The call's audio URI points at nothing readable."""


class AudioDecodeError(InvalidInputError):
    """The call's audio bytes are not a decodable audio file."""


class MessageDecodeError(InvalidInputError):
    """A Kafka record is not the protobuf message its topic carries."""


class SummaryValidationError(InvalidInputError):
    """The engine's output did not validate against the summary schema, even after a retry."""


class TransientError(CallstreamError):
    """A dependency failed in a way that may succeed on retry."""


class ConfigError(CallstreamError):
    """Settings or a configuration file are invalid; raised at start-up."""
