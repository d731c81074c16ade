"""What the tests share: paths, the in-process federation, real processes, command runners, sample adapters.

Nothing here is a test; test modules import from here and never from each other.
"""
