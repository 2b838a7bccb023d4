"""The fault suite (issue #9): faults, bad input and misuse tried on purpose; RELIABILITY.md lists what each proves.

A package, so its modules (``faults.helpers``, ``faults.test_*``) cannot clash with ``tests/`` modules of the same
name; ``tests/`` itself stays on ``sys.path`` (its conftest), so ``from conftest import ...`` works here too.
"""
