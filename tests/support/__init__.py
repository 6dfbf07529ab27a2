"""Helpers and fixtures of the test suite, one module per concern (tests/conftest.py
registers the fixtures)."""
