// Command vsdp-demo is what `make demo` runs: it starts vsdpd (in process,
// on the embedded pure-Go verbs provider), exports a host HTTP service over
// SDP, and drives a guest's traffic through the vsock device, then prints a
// short report.
//
// Stage 1 drives the device with the fake vhost-user front-end (a
// simulated guest driver in this process). Stage 2, when QEMU and the guest
// kernel are installed (make deps) and the guest socket switch is built,
// boots a real guest with no network but vsdpd's devices and runs an
// unmodified program (GNU wget under libvsdp.so) against the same export;
// stage 3, in the same guest, has a busybox shell fetch the same bytes
// through the socket filesystem (/net, virtio-fs).
//
// It is a demonstration on this host only: the services it exports listen
// on loopback, the guest has no NIC (-nic none), and everything it starts
// (vsdpd in process, one QEMU) ends with it.
package main
