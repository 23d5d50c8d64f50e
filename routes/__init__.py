"""HTTP and WebSocket routes, one module per resource; each ends with its `routes` list."""
