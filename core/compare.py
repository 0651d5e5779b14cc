"""Placeholder: filled in by its own issue."""


def add_cli(sub) -> None:
    pass
