"""The chaos tier reuses the integration tier's tiny models and log directories."""

from tests.integration.conftest import log_dir, tiny_pair  # noqa: F401 - pytest fixtures
