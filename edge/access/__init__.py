"""Who may call the local API, and how often: bearer tokens, scopes and rate limits.

Transport-neutral: the HTTP app, its inference fast path, the OpenAI routes and the gRPC
service all ask the same :class:`~edge.access.guard.Guard`, so one token, one scope and one
rate-limit bucket mean the same on every transport (docs/security.md).
"""
