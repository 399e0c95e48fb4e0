"""Every call into the kernel (cgroups, pidfds, inotify, sd_notify, namespaces)."""
