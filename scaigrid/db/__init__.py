"""Relational schema (SQLAlchemy Core tables) and the small queries shared by modes."""
