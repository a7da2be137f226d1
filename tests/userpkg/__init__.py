"""A user's own model package, for the tests of ``--model MODULE:FACTORY`` (tests/test_any_model.py)."""
