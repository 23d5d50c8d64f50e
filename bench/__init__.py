"""The benchmark: the coordinator against a bare Starlette app of the same routes."""
