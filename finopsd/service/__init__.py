"""Running finopsd as a service: what the daemon tells its service manager.

``notify``: systemd's notify protocol (readiness, status, watchdog), without
libsystemd. ``supervisor``: the ``Service`` shape (start, stop, health) and the
``Supervisor`` that starts the daemon's services in order and stops them in
reverse.
"""
