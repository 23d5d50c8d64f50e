"""Persistence: sessions, events, runs and runners in SQLite or PostgreSQL, and the agents
directory.

Store verbs are plain functions taking a connection first, written once for both databases;
a `Database` (`store.backend`) runs them on the right connection and thread. Nothing here knows
about HTTP.
"""
