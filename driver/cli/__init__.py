"""`gpu-dra`: the entry point (`main`), its flag groups and the commands' wiring.

May import every other package; nothing imports it. Each flag that has an environment
variable reads it through the same validation as the flag.
"""
