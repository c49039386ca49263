"""Under pytest-xdist (`make test`: -n 2 --dist loadgroup) the tests marked `multiprocess` form one
group that a single worker runs in turn: two of them side by side would put four busy processes
(two ranks each) on the two cores the suite is sized for. tests/conftest.py imports this hook.

pytest-xdist 3.8 sends a test to its group by suffixing the group's name to `item._nodeid`; pytest
9.2 keeps node ids in `item._id` instead, so there the suffix is silently lost and the group's tests
spread over every worker. The second half of the hook puts the suffix where the running pytest
reads it when xdist's own did not take (tests/test_xdist_groups.py checks the outcome)."""
from __future__ import annotations

import pytest

GROUP = "multiprocess"


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config, items):
    # Before every other implementation: pytest-xdist's reads the xdist_group marks.
    if config.pluginmanager.hasplugin("xdist"):
        for item in items:
            if item.get_closest_marker(GROUP):
                item.add_marker(pytest.mark.xdist_group(GROUP))
    result = yield
    # After them: `loadgroup` is set on the workers of a --dist loadgroup run.
    if getattr(config.option, "loadgroup", False):
        for item in items:
            if item.get_closest_marker(GROUP) and not item.nodeid.endswith("@" + GROUP) and hasattr(item, "_id"):
                item._id = type(item._id).parse(f"{item.nodeid}@{GROUP}")
    return result
