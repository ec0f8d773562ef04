"""The replica manager: managed instances, each ``replicas`` copies of one command, started,
checked, restarted, rolled, scaled and stopped by the router (``manager.InstanceManager``)."""
