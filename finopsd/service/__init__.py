"""Running finopsd as a service: what the daemon tells its service manager.

``notify``: systemd's notify protocol (readiness, status, watchdog), without
libsystemd.
"""
