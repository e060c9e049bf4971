"""The hvext guest agent (runs inside the guest; standard library only)."""

AGENT_VERSION = "0.1.0"
PROTOCOL_VERSION = 1
PORT_NAME = "org.hvext.agent.0"
