"""runs routes (being built)."""

routes: list = []
