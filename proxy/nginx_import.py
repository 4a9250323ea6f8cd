"""`airgate import-nginx`: carry the seed guide's Nginx site and `docker run` line over to airgate.

An operator who followed Elastic's guide has already decided the listeners, the server name, the
certificate, the bearer token and the vLLM flags; this command keeps those decisions so nothing
has to be decided twice. It writes:

- the airgate config to standard output (redirect it to airgate.toml);
- the bearer tokens, as digests only, to the tokens file (mode 0600);
- the secrets of the docker command (vLLM key, Hugging Face token) to files beside it (mode 0600);
- one `file:line: directive: reason` line per thing it did not translate, to standard error.

A secret is never printed. The Nginx file is read with crossplane, which knows Nginx's grammar
(quoting, escapes, `if (...)`, comments), never with regular expressions; the docker command is
split with shlex, as a shell would.

The work is done by the modules of proxy.migrate; this module is the entry point that the CLI
names (`proxy.nginx_import:import_main`) and re-exports the helpers other code imports from here.
"""

from __future__ import annotations

from proxy.migrate.command import import_main, run_import
from proxy.migrate.common import ImportFailure
from proxy.migrate.findings import Findings, looks_like_placeholder
from proxy.migrate.toml_out import toml_string
from proxy.migrate.values import listen_address, nginx_bytes, nginx_seconds

__all__ = [
    "Findings",
    "ImportFailure",
    "import_main",
    "listen_address",
    "looks_like_placeholder",
    "nginx_bytes",
    "nginx_seconds",
    "run_import",
    "toml_string",
]
