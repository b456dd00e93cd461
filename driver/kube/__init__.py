"""Kubernetes helpers with no driver knowledge: the API client (`api`), resource
quantities (`quantity`) and semantic versions (`semver`). Imports nothing of the driver.
"""
