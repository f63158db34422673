"""Who is calling: API keys, ScaiKey JWTs and service tokens become one `Principal` with a role."""
