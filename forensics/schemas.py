"""Ids of the documents one stage writes and others read back, here so that a reader need not import the writer
(nor the writer pydantic's 0.1-0.2 s: the fingerprint pass is a command of its own)."""

FINGERPRINT_SCHEMA = "llm-forensics.fingerprint/1"
