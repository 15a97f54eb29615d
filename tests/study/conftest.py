import os

import pytest

CLUSTER_ENV = "PREFIXLAB_CLUSTER_TESTS"


def pytest_configure(config):
    config.addinivalue_line("markers", "cluster: starts a real Ray head node (`ray start --head`, minutes); "
                                       f"run with {CLUSTER_ENV}=1 (.ci/run does, after make test)")


def pytest_collection_modifyitems(config, items):
    """The cluster tests take minutes: `make test` skips them (and says so), CI runs them."""
    if os.environ.get(CLUSTER_ENV) == "1":
        return
    skip = pytest.mark.skip(reason=f"a real Ray head node takes minutes: {CLUSTER_ENV}=1 runs it (.ci/run does)")
    for item in items:
        if item.get_closest_marker("cluster") is not None:
            item.add_marker(skip)
