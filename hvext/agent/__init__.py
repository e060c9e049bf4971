"""Host side of the hvext guest-agent channel (protocol, validation, client)."""

from hvext.agent.client import AgentClient
from hvext.agent.protocol import MAX_LINE, PROTOCOL_VERSION

__all__ = ["AgentClient", "MAX_LINE", "PROTOCOL_VERSION"]
