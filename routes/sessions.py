"""sessions routes (being built)."""

routes: list = []
