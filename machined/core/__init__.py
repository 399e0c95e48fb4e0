"""The model: machines, registry, state files, validation, domain errors.

Nothing in here imports D-Bus code or starts subprocesses.
"""
