"""GPU health, the pure core: observations of a GPU (`model`) folded into its conditions
by the recovery rules (`state`), XIDs classified by NVIDIA's catalog, the driver's
recovery action and the admin's settings (`classify`), conditions as device taints
(`taints`) and when to write them (`coalesce`). No NVML, no I/O, no clock: a monitor
feeds it observations with their times."""
