"""`gpu-dra demo`: the driver end to end on a mock machine, locally (`local`) or against a
local control plane (`cluster`, through `driver.devcluster`). The plugin never imports it.
"""
