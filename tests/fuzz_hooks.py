"""Schemathesis hooks loaded by tests/test_fuzz.py (``SCHEMATHESIS_HOOKS=fuzz_hooks``)."""

import schemathesis


@schemathesis.check
def no_traceback(ctx, response, case):
    """No response body carries a Python traceback or source file path."""
    text = response.text or ""
    if "Traceback (most recent call last)" in text or 'File "/' in text:
        raise AssertionError(f"traceback in the response body: {text[:300]}")
