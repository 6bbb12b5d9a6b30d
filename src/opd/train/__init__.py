"""The OPD loop and what it stands on: trainer (collect -> score -> loss/backward -> update ->
metrics), SFT, checkpoints, alarms, memory levers, FSDP sharding, metric tracking.
"""
