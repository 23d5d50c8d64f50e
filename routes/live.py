"""live routes (being built)."""

routes: list = []
