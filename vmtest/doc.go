// Package vmtest runs tests against QEMU guests: it boots the Debian kernel
// with an initramfs from package images, talks to a small agent in the
// guest, and tears everything down whatever happens to the test.
//
// # Use
//
//	func TestMain(m *testing.M) { vmtest.Main(m) } // fails the run if a QEMU outlives its test
//
//	func TestVMSomething(t *testing.T) {
//		vmtest.Require(t) // skips unless VSDP_VMTEST=1; then missing QEMU/kernel FAILS
//		vm := vmtest.Start(t, vmtest.Options{Name: "x", Image: images.Spec{Modules: ...}})
//		out := vm.Check(t, "uname", "-r")
//		...
//	}
//
// A VM test is named TestVM... and begins with Require. Start boots a guest
// for a test (closed in t.Cleanup; logs printed on failure); Boot is the same
// without a testing.TB. StartFabric boots two guests joined by a QEMU link
// with soft-RoCE (rxe0) up on both.
//
// # Design
//
// QEMU (qemu-system-x86_64, machine pc) runs with TCG unless a KVM probe —
// a real boot of a minimal guest, cached in build/vmtest/kvm-probe.json —
// succeeded (EnvAccel overrides). Guest memory is always a shared memfd
// (memory-backend-memfd,share=on plus a NUMA node), which vhost-user needs.
// The kernel is the ELF vmlinux, booted through its PVH entry (no
// decompression under TCG). There is no display; stdin is /dev/null; the
// console (ttyS0) goes to NAME.console.log in the test's log directory
// (build/vmtest/logs/TESTNAME/), QEMU's own output to NAME.qemu.log;
// -no-reboot unless Options.Reboot. Guests have no network unless Options
// give NICs: slirp with restrict=on and forwards on 127.0.0.1 only (guest
// forwards reach a host port on 127.0.0.1 through a socat relay per
// connection), or a
// point-to-point link to another guest (-netdev stream over a Unix socket
// by default: reliable and without the ~22 ms Nagle stalls of the TCP
// form; -netdev dgram over Unix sockets is the alternative). vhost-user
// devices (vsock, fs with a tag and queue-size=1024) connect to back-end
// sockets given in Options. The modules a device needs are added to the
// image.
//
// QMP goes through github.com/digitalocean/go-qemu (qmp.SocketMonitor, and
// qmp/raw for query-status): status, events (kept in a log and searchable
// with WaitEvent), quit, system_reset, and raw commands. Every go-qemu call is
// bounded by a context.
//
// The guest agent (vmtest/agent, a static Go program /init runs and
// restarts) serves a framed protocol (internal/proto) on a virtio-serial
// port — not vsock and not the network, which are devices under test. It
// runs programs (argv, env, stdin, timeout; stdout, stderr, exit status),
// concurrently, each in its own process group, killed on timeout or cancel;
// and it reads and writes files. /init records failed steps (a module that
// did not load, a failing Init line) in images.InitFailedFile, and Boot
// fails when that file exists.
//
// # Reaping
//
// QEMU runs in its own process group with Pdeathsig SIGKILL (it dies with
// the test process even if cleanups never run). Close sends QMP quit, then
// SIGKILL to the group, and waits for QEMU to be reaped; every error path in
// Boot calls it; Start registers it with t.Cleanup (which also runs after a
// panic in the test) and then checks the process is gone. Main fails the
// package's run and kills survivors if any QEMU started by the tests is
// still unreaped when they end.
//
// # Threat model
//
// The guest is ours but may be broken by the code under test: every wait on
// it (QMP, agent hello, each request, QEMU's exit) has a timeout, a lost
// agent connection fails pending requests instead of hanging them, and
// replies are bounded (frames ≤ proto.MaxPayload, output ≤ Cmd.MaxOutput).
// QEMU's guest-facing sockets live in a private temporary directory; guest
// networks never leave the host (slirp restrict=on, forwards on 127.0.0.1,
// links between two QEMUs over Unix sockets).
//
// # Concurrency
//
// A VM's methods may be called from several goroutines; agent requests run
// concurrently in the guest. Locks: Agent.mu guards the pending-request map
// and is never held while writing; Agent.wmu serialises frame writes;
// monitor.mu guards the event log; registry.mu the set of live QEMU
// processes. No lock is held while another is taken.
package vmtest
