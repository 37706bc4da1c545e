// Command agent is the vmtest guest agent: a static program that /init of
// every vmtest image runs (and restarts). It serves the agent protocol
// (vmtest/internal/proto) on a virtio-serial port (or a serial tty, put in
// raw mode), so the host can run programs and move files without
// networking or vsock, which are devices under test.
//
//	agent [-port NAME|/dev/PATH]
//
// NAME is a virtio-serial port name, looked up in /sys/class/virtio-ports.
package main
