"""Helpers shared by the tests and the benchmark (imported as ``tests.support.<module>``).

- ``env``: the environment of this process and of the processes it starts (offline model hub).
- ``model``: the tiny random CLIP saved to disk.
- ``files``: pictures, config files, result bundles, inbox listings.
- ``logs``: the service's structlog key=value lines, parsed.
- ``waiting``: polling until something is true.
- ``service``: ``image-search serve`` in a subprocess.
- ``notify``: a stand-in for systemd's NOTIFY_SOCKET.
- ``db``: reading table rows from a running or a stopped embedded PostgreSQL.
- ``systemd_harness`` (+ ``systemd-inner.sh``): a real systemd booted in isolated namespaces.
"""
