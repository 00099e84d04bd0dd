"""Asynchronous jobs: durable job records in the output store, a visible queue with a bulk lane
that never takes Serve's GPUs, Ray job submission, signed webhooks and OpenAI's Batch API.

Imports neither Serve nor (at import time) Ray: the HTTP ingress and the CLI call into it, and its
tests run without a server.
"""
