"""runner routes (being built)."""

routes: list = []
