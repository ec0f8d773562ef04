"""The router's lifecycle (serving, draining, abandoned), in-flight accounting, drain and
readiness.
"""
