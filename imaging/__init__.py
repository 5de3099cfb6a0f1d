"""imaging: a running cloud instance becomes a clean cloud image and a bootable local appliance.

One module per stage (acquire, disk + bootloader, export, verify), the infrastructure they share
(tools, sparse, config, workspace, stage), and the pipeline that runs each stage's notebook.
"""

__version__ = "0.1.0"
