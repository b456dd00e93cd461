"""What a node has: the device model (`model`), discovery through an NVML provider
(`discovery`), NVLink/PCIe topology (`topology`), and its table/JSON rendering (`view`).

Imports `driver.nvml` and the native helpers only.
"""
