"""Test- and benchmark-only code (never imported by `rst2g_jax` at run time)."""
