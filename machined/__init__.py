"""A Python reimplementation of systemd-machined (org.freedesktop.machine1)."""

__version__ = "0.1.0"
# What `--version` reports as the systemd version we are compatible with.
COMPAT_SYSTEMD_VERSION = 252
