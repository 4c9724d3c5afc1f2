"""splitstore's benchmark suite: ``python -m benchmarks`` (``--quick`` for a short run).

It sets everything up itself in a temporary folder: two throwaway setups (encryption
on and off), each served by ``splitstore serve`` in a process of its own; every client
operation also runs in a process of its own, so that peak memory and CPU time are
measured apart for client and servers. It reports the median,
min and max of several runs, ratios against a plain loopback TLS copy and against
restic and rclone (when installed), and writes everything as JSON.

Modules: ``_suite`` runs the phases; ``_servers`` starts the servers, ``_runner`` is the
child that runs one client operation, ``_measure`` runs it and summarises runs,
``_tls_copy`` and ``_reference`` are the figures to compare with, ``_proc`` reads
/proc, ``_data`` makes test files, ``_stats`` summarises, ``_report`` prints and saves.
"""
