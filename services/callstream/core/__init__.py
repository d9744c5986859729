"""Shared plumbing used by every service: settings, Kafka I/O, batching, gRPC server, metrics."""
