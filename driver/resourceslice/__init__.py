"""Inventory -> ResourceSlices: the pure build (`build`), the pure plan of the writes that
make the published slices match and the publishers' other decisions (`plan`), the
publishers to a local directory (`dirpublisher`) or the API server (`publish`, with the
`Publisher` protocol both follow), and their errors (`errors`). Imports `driver.inventory`,
`driver.nvml` and `driver.kube`.
"""
