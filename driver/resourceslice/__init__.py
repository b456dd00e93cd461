"""Inventory -> ResourceSlices: the pure build (`build`), the pure plan of the writes that
make the published slices match (`plan`), and the publishers to a local directory or the
API server (`publish`). Imports `driver.inventory` and `driver.kube`.
"""
