"""e2e tier: the cluster's logs are attached to every failing test (and kept under build/e2e/)."""

from __future__ import annotations

from collections.abc import Generator

import pytest

from tests.e2e.cluster import ComposeCluster, results_dir

ACTIVE_CLUSTER = pytest.StashKey[ComposeCluster]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    cluster = item.config.stash.get(ACTIVE_CLUSTER, None)
    if not report.failed or cluster is None:
        return report
    logs = cluster.logs()
    try:
        ps = cluster.compose("ps", "--all", timeout_s=60, check=False).stdout
    except Exception as exc:  # noqa: BLE001 - best effort, for the failure report only
        ps = f"(no `docker compose ps`: {exc})"
    report.sections.append(("docker compose ps", ps))
    report.sections.append(("docker compose logs (last 400 lines per service)", logs))
    name = item.name.replace("/", "_").replace("[", "_").replace("]", "")
    (results_dir() / f"failed-{name}.log").write_text(f"{ps}\n{logs}")
    return report
