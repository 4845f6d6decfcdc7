"""Test registry: gradcheck cases and fixture builders, used by the CLI report and the tests."""
