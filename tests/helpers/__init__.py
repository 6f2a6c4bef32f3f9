"""Fixtures in the datasets' real formats, tiny runs and tools the tests share."""
