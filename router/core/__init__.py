"""The error tree with stable codes, the injectable clock, the config schema and its loading."""
