"""Placeholder: this command is registered by its own issue."""
