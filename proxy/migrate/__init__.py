"""`airgate import-nginx`, one module per step: the Nginx side (nginx, nginx_tokens, nginx_nodes,
nginx_reasons, values), the docker side (docker, docker_command), the models both sides fill
(models), the 0600 files (files), the TOML output (toml_out), the findings on standard error
(findings) and the command itself (command). The entry point is proxy.nginx_import."""
