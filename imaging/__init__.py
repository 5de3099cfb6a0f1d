"""imaging: a running cloud instance becomes a clean cloud image and a bootable local appliance.

One module per stage (acquire, disk + bootloader, export, verify), the infrastructure they share
(tools, sparse, config, workspace, stage), and the pipeline that runs each stage's notebook.
"""

import sys

__version__ = "0.1.0"

# nbformat imports jsonschema, which imports rfc3987_syntax when it is installed (jupyterlab
# brings it) and builds a Lark grammar for the "iri" format: 0.8-1.1 s of the start of every
# process that reads a notebook (the `imaging` command, `python -m imaging`, the service's
# worker), for a format no notebook schema uses. Without the module jsonschema skips that format.
sys.modules.setdefault("rfc3987_syntax", None)  # type: ignore[arg-type]
