"""The device's side of staged rollouts: the fleet agent and what it stands on.

* :mod:`edge.fleet.agent` wires the parts to MQTT and one work thread;
* :mod:`edge.fleet.orders` is the order intake (signature, replay, ownership, dedupe, aborts);
* :mod:`edge.fleet.install` is the install pipeline (verify the manifest, download, stage,
  self-test, switch) and :mod:`edge.fleet.versions` switches, commits and rolls back;
* :mod:`edge.fleet.health_window` judges a freshly switched version with
  :func:`shared.health_gate.health_gate`, the gate the controller uses too;
* state, staging, downloads, kept artifacts, status reports and the health figures read
  beside the server's workers each have a module of their own.

Nothing here imports the serving worker (:mod:`edge.agent`): the worker passes in what the
fleet's health figures need.
"""
