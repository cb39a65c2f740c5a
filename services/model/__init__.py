"""Model code shared by the target and drafter services: loading, session KV caches, sampling."""
