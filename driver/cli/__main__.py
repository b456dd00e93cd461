"""`python -m driver.cli`: the `gpu-dra` command."""

from driver.cli.main import run

run()
