"""Scope backends, one chosen at start-up (see machined/daemon.py):

* systemd1 - org.freedesktop.systemd1 is on the bus (a host with systemd as PID 1): scopes are
  transient units made by StartTransientUnit, exactly as systemd-machined 252 does.
* cgroupfs - no systemd1: the daemon makes machine.slice/machine-NAME.scope in the cgroup2
  hierarchy itself, signals its processes, and watches it empty.
"""
