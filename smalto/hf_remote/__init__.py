"""Self-contained transformers code copied into saved folders for `trust_remote_code` (never imports smalto)."""
