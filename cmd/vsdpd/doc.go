// Command vsdpd is the vsdp host daemon: a vhost-user back-end serving each
// configured VM a virtio-vsock device and (with fs_socket) a virtio-fs
// socket filesystem, carrying the VMs' streams over SDP.
//
//	vsdpd -config /etc/vsdp/vsdpd.json [-log-level info] [-stats 30s]
//	      [-workers=true] [-run-dir DIR] [-control PATH|none]
//	vsdpd -ctl PATH list|stats|add VM.json|remove NAME
//
// The configuration file is JSON (see README.md, "Configuration").
// By default vsdpd is a supervisor: it serves the host's exports itself
// and runs each VM in a worker process of its own (this binary, re-executed
// with -worker, its configuration handed over a pipe on fd 3), restarting a
// worker that dies. -workers=false serves everything in one process.
// SIGTERM or SIGINT shuts down cleanly (workers included).
//
// In worker mode the supervisor serves a control socket (-control,
// default RUNDIR/vsdpd.ctl, mode 0600) on which VMs are listed, added and
// removed at run time; -ctl makes this binary its client: it sends one
// request, prints the reply as JSON and exits 0 if the supervisor did it,
// 1 if it refused, 2 if it could not ask. "add" reads one VM entry (the
// configuration file's "vms" element) from a JSON file ("-": stdin).
// The one-process mode (-workers=false) has no control socket.
//
// Trust: guests and QEMU are untrusted (each worker maps only its own VM's
// memory, so a compromise stays in that VM's worker); whoever can connect
// to a VM's vhost-user socket plays its QEMU, and whoever can connect to
// the control socket administers every VM, hence their modes. The process
// model, its threat model and its locking are in internal/daemon's doc.
package main
