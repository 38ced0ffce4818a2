"""The OpenAI-compatible API (``/v1``): protocol types, a serving layer, thin routes."""
