"""agents routes (being built)."""

routes: list = []
