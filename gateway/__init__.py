"""The HTTP gateway (installed as zeroserve.gateway): OpenAI-compatible front door."""
