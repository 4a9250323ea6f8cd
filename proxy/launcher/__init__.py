"""The launcher: starts vLLM, waits for it to load, restarts it when it dies, stops it cleanly.

presets     model-family vLLM flags, and extra_args applied over them
command     the exact argv and environment per runtime (pure; `airgate launch --print`)
checks      checks before a start, each naming its fix
runtime     the interface of a runtime adapter, and helpers they share
container   docker / podman (detached container, adoption by config label)
process     a plain `vllm serve` child in its own process group
health      one probe of vLLM's /health
diagnose    load progress from vLLM's output; crash explanations
status      LauncherStatus, the states, the JSON state file
supervisor  the state machine (Supervisor)
commands    `airgate launch` and `airgate status`
"""
