"""Inside the guest (10-clean, 20-migrate): in-guest path resolution, profiles, clean operations, edits, initrd, sandbox."""
