"""Real parts for tests and benchmarks: Mosquitto brokers on free ports, edge agents in
their own processes, simulated fleet devices (one at a time or 10,000 at once), and a
rollout controller set up against SQLite or PostgreSQL.

Both ``tests/`` and ``bench/`` import it; it imports the product, never a test.
"""
