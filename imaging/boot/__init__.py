"""The boot check (50-verify): QEMU on the target's controller and NIC, the console, the KVM probe."""
