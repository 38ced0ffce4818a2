"""The MQTT sensor bridge: sensor readings on the device broker in, inference results out.

See docs/sensors.md; its settings are ``edge.sensor_settings``.
"""
