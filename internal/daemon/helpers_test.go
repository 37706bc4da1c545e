package daemon_test

import (
	"context"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/vsdp/vsdp/internal/daemon"
	"github.com/vsdp/vsdp/sdpback/sdp"
	"github.com/vsdp/vsdp/verbs/soft"
	"github.com/vsdp/vsdp/vhost/vhosttest"
	"github.com/vsdp/vsdp/vmtest"
)

// startDaemon starts vsdpd with cfg, logging nowhere; it closes when the
// test ends. Cleanups run last first: start it before booting a VM on its
// sockets, so QEMU goes before its back-end.
func startDaemon(t *testing.T, cfg *daemon.Config) *daemon.Daemon {
	t.Helper()
	d, err := daemon.Start(cfg, quietLog())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(d.Close)
	return d
}

// quietLog is a logger that writes nowhere.
func quietLog() *logrus.Logger {
	log := logrus.New()
	log.SetOutput(io.Discard)
	return log
}

// frontEnd plays QEMU on a vhost-user socket: the fake front-end connects,
// sets up a device with opts and starts it. Both close when the test ends.
func frontEnd(t *testing.T, socket string, opts vhosttest.DeviceOptions) *vhosttest.Device {
	t.Helper()
	f, err := vhosttest.Dial(socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	dev, err := f.Init(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(dev.Close)
	if err := dev.Start(); err != nil {
		t.Fatal(err)
	}
	return dev
}

// serveTCP runs handle for every connection to a new loopback listener
// (closing the connection after) and returns its address. The listener
// closes when the test ends.
func serveTCP(t *testing.T, handle func(net.Conn)) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				handle(c)
			}()
		}
	}()
	return ln.Addr().String()
}

// abortingPeer listens on port of a host SDP stack: the first client it
// accepts gets data, then, after a pause, an abort (the remote application
// dies mid-stream). The listener closes when the test ends.
func abortingPeer(t *testing.T, ctx context.Context, st *sdp.Stack, port uint16, data []byte) {
	t.Helper()
	l, err := st.Listen(port, 4)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		c, err := l.AcceptSDP(ctx)
		if err != nil {
			return
		}
		c.Write(data)
		time.Sleep(300 * time.Millisecond)
		c.Abort()
	}()
}

// guestShell runs script with the guest's /bin/sh, in environment env, for
// at most two minutes. It fails the test if the script could not run; the
// caller judges its exit.
func guestShell(t *testing.T, ctx context.Context, vm *vmtest.VM, env []string, script string) *vmtest.Result {
	t.Helper()
	r, err := vm.Exec(ctx, vmtest.Cmd{Args: []string{"/bin/sh", "-c", script}, Env: env, Timeout: 2 * time.Minute})
	if err != nil {
		t.Fatalf("%s: %v", script, err)
	}
	return r
}

// copyLog tallies the soft provider's copy records (daemon.Config.Touch)
// by local key: the bytes the provider read from and wrote into each
// registered region on its own side's behalf.
type copyLog struct {
	mu            sync.Mutex
	read, written map[uint32]uint64
}

func newCopyLog() *copyLog {
	return &copyLog{read: map[uint32]uint64{}, written: map[uint32]uint64{}}
}

func (l *copyLog) touch(t soft.Touch) {
	if t.Remote {
		return
	}
	l.mu.Lock()
	if t.Write {
		l.written[t.Key] += t.Len
	} else {
		l.read[t.Key] += t.Len
	}
	l.mu.Unlock()
}

// guest returns the bytes read from and written into the regions whose
// keys are in guest (the VM's guest memory registrations).
func (l *copyLog) guest(guest map[uint32]bool) (read, written uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for k, n := range l.read {
		if guest[k] {
			read += n
		}
	}
	for k, n := range l.written {
		if guest[k] {
			written += n
		}
	}
	return read, written
}
