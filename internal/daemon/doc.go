// Package daemon wires vsdpd together: the verbs device, the SDP stacks,
// the exports, and per VM a vhost-user server whose vsock devices feed
// sdpback. It owns the adapters between the device packages and sdpback
// (which know nothing of each other) and the daemon's configuration. It
// logs through the logrus logger it is given (a library would not; this
// is the daemon's own wiring).
//
// # Process model
//
// The package runs vsdpd two ways.
//
//   - One process (Start): one soft device with every local fabric address,
//     the host stack with the exports, and each VM's stack and vhost-user
//     servers. Tests and the demo use it; a Touch hook (host-copy
//     accounting) only works here.
//   - Worker mode (Supervise, the command's default): the supervisor keeps
//     the configuration, the host's address, stack and exports on a soft
//     device of its own, and re-executes its binary (/proc/self/exe
//     -worker) once per VM. The worker's configuration - the VM's entry
//     (policy, CID, sockets, address), its own endpoint and the fabric table
//     (every fabric address to its endpoint: the supervisor's, each
//     worker's, the configured peers') - travels as one JSON line over a
//     socketpair on fd 3, never argv or the environment. RunWorker opens
//     the worker's own soft device on its endpoint (default
//     unix:RUNDIR/NAME.fabric, mode 0600), its own SDP stack, and serves
//     the VM's vhost-user sockets; it answers {"ready":true} once they
//     exist, and Supervise returns only when every worker has (QEMU blocks
//     in device realize without the socket). Streams between a VM and the
//     exports, or between two VMs, cross processes over the soft
//     transport exactly as they would cross hosts.
//
// Supervision: a worker that exits is logged with its exit status and
// restarted after a backoff (MinBackoff, doubling while workers die within
// a minute of starting, up to MaxBackoff). QEMU's vsock and fs devices have
// no back-end reconnect, so the VM's current devices die with the worker:
// the restarted worker serves the VM's next QEMU. Supervisor.Close sends
// each worker SIGTERM, waits StopTimeout, then SIGKILLs what is left and
// waits for it. A worker stops by itself when its supervisor dies: the
// parent-death signal (SIGTERM; every worker is started from one OS thread
// locked for the supervisor's lifetime, since the kernel signals on the
// forking thread's exit) and end-of-file on its pipe. Each worker writes
// RUNDIR/NAME.pid once ready and the supervisor removes it when the worker
// exits.
//
// Confinement: unless Config.Sandbox is "off", a worker confines itself
// with internal/sandbox after its sockets exist and before it answers
// ready (no file opens, exec, new processes, ptrace or signals to other
// processes; non-dumpable; no_new_privs), having loaded the local time
// zone first. From then on it cannot remove its own socket files, so the
// supervisor removes a worker's files when it stops or is removed, and a
// restarted worker replaces them before it confines itself. The control
// socket refuses a connection whose SO_PEERCRED PID is a current worker's.
//
// # Control socket
//
// In worker mode the supervisor serves a control socket (control.go;
// SupervisorOptions.Control, default RUNDIR/vsdpd.ctl, mode 0600): one
// JSON request per line (list, add, remove, stats), one JSON reply per
// line. Add validates the VM with checkConfig against the running ones
// (the file's rules), records its address → endpoint in the supervisor's
// table and sends every running worker a {"set":…} update on its pipe,
// then starts the worker like any other. Remove sends {"delete":…}, stops
// the worker for good (SIGTERM, SIGKILL after StopTimeout) and removes
// its files. After the ready line the pipe carries these updates (one
// JSON object per line, applied to the worker's soft.Table), a full
// {"table":…} sync right after ready (so nothing sent while the worker
// started is missed), and stats requests, which the worker answers on
// the pipe. The one-process daemon (Start) has no control socket.
//
// # Threat model
//
// Guests, QEMU and fabric peers are untrusted (see the design's §7). In
// worker mode a worker maps only its own VM's memory and holds only its
// VM's streams, so a fault or a compromise through a guest-reachable bug
// stays in that VM's process: it can reach the fabric as that VM's
// address with the worker's view of the table, not another VM's memory,
// nor the supervisor's exports' host TCP connections. The supervisor takes
// no input from workers but the one ready line (bounded by ReadyTimeout,
// parsed as JSON), their answers to stats requests (bounded lines, parsed
// into counters, matched by sequence number, anything else dropped) and
// their exit status; a worker that stops reading its pipe misses table
// updates after a write timeout and hurts only its own VM. The control
// socket's client administers every VM (file permissions are the access
// control), but its input is still bounded: line length, requests per
// second and connections are limited, unknown fields and operations are
// refused with an error reply, and nothing it sends panics the
// supervisor. The soft endpoints are
// unauthenticated transports (as on a real fabric, every header is
// validated by the receiver, and a compromised worker could claim another
// source address on them; on InfiniBand the fabric's own addressing
// applies); unix endpoints are created mode 0600 in the
// run directory, so only vsdpd's user can join them. Host configuration
// is trusted. In one-process mode a fault is scoped by the packages' own
// rules (a broken ring stops that device, a bad stream is reset) but
// shares the address space with every VM. A confined worker (see
// Confinement) can no longer open files, signal or trace other processes
// or create processes; one that shares vsdpd's uid can still connect to
// another VM's vhost-user sockets by path, though not take them from a
// QEMU being served (frontEndWait: one front-end at a time), only while
// none is. A VM with a uid of its own (VMConfig.UID) closes that: the
// supervisor creates the worker's vhost-user sockets (handOver; they stay
// vsdpd's), passes them as descriptors from firstHandedFD on
// (workerConfig.Handed), and starts the worker as the uid with
// Config.WorkerGroup as its only group. With a worker group, every
// worker's unix fabric endpoint is created and handed over the same way,
// 0660 for the group, so workers under any uid reach each other.
//
// # Concurrency
//
// Daemon: VM.mu guards the current front-end's device, filesystem and
// memory registrations; memReg.mu is taken after VM.mu, never before.
// Supervisor: one goroutine per worker waits for its process and restarts
// it, one more reads its pipe; worker.mu guards the current process, its
// pipe and state; Supervisor.mu guards the worker list and the fabric
// table; Supervisor.opMu serializes Add and Remove. Lock order: opMu,
// then Supervisor.mu, then worker.mu. Table updates are written to a
// worker's pipe under Supervisor.mu, and a starting worker's pipe is
// registered (with its sync) under it too, so every worker sees every
// change exactly in order. Close closes done, stops the control socket,
// signals under worker.mu and then waits for the goroutines, so it never
// races a restart (a start that finds the supervisor closing, or its VM
// removed, kills its own process).
package daemon
