"""What runs inside vLLM: the worker extension (hooks.py) and the endpoint plugin (routes.py).

Both are registered as vLLM plugins in pyproject.toml; neither forks vLLM's internals.
"""
