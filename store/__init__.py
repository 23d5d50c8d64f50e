"""Persistence: SQLite (sessions, events, runs, runners) and the agents directory.

Store verbs are plain functions taking an APSW connection first; `store.db.Database` runs them
on the right thread. Nothing here knows about HTTP.
"""
