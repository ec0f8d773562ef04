"""The control plane: registry of backends, spawner and router-process supervisor, admin API,
federation, metrics exposition.
"""
