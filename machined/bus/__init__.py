"""Thin D-Bus glue: interfaces that parse arguments, authorize, call the core, and map domain
errors to D-Bus errors (errors.py is the one place for that)."""
