"""Front-end-agnostic live serving: the conversation hub, its engine thread, jitter buffers and metrics."""

from .hub import (
    AgentFrame,
    Conversation,
    ConversationHub,
    HubBusy,
    HubClosed,
    HubOptions,
    NotSupported,
    PersonaError,
    PersonaRequest,
)
from .metrics import HubMetrics

__all__ = [
    "AgentFrame", "Conversation", "ConversationHub", "HubBusy", "HubClosed", "HubMetrics", "HubOptions",
    "NotSupported", "PersonaError", "PersonaRequest",
]
