"""The target service: loads the target LM and verifies windows of drafts (``Verify``)."""
