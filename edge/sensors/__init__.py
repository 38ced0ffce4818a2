"""The MQTT sensor bridge: sensor readings on the device broker in, inference results out.

See docs/sensors.md. Kept import-light: ``edge.settings`` imports ``edge.sensors.settings``.
"""
