"""Transcriber service: faster-whisper speech-to-text for recorded calls (see engine.py)."""
