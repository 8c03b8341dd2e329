"""gpu_runtime: executes one job (a `opentinker.spec.JobSpec`) and reports through a Sink.

Imports only `opentinker`, torch, transformers, peft and ray: never Django or the platform's packages.
"""
