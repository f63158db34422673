"""The catalogue (backends, frontend models, routing policies) and backend selection with circuit breakers."""
