"""msgspec Structs: request bodies and the records the API returns."""
