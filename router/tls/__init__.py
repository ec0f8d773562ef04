"""TLS: contexts built from the config, reloaded in place, and client identities checked."""
