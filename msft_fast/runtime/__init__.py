"""The processes a run lives in: the process group and sharding, the launcher, the memory preflight,
and test-only fault injection."""
