package guestdrv

import (
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/vsdp/vsdp/guestdrv/ctl"
)

// rawHost serves one control connection at a time on DIR/ctl with a
// script, for hosts that break the protocol.
func rawHost(t *testing.T, script func(c net.Conn, r *ctl.Reader)) string {
	t.Helper()
	dir := shortDir(t)
	ln, err := net.Listen("unix", filepath.Join(dir, "ctl"))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			script(c, ctl.NewReader(c))
			c.Close()
		}
	}()
	t.Cleanup(func() { ln.Close(); <-done })
	return dir
}

func send(c net.Conn, m ctl.Msg) {
	b, _ := m.Append(nil)
	c.Write(b)
}

// hello answers the HELLO properly.
func hello(c net.Conn, r *ctl.Reader) bool {
	m, err := r.Read()
	if err != nil || m.Type != ctl.TypeHello {
		return false
	}
	send(c, ctl.Msg{Type: ctl.TypeHelloOK, Ver: ctl.Version, CID: 3})
	return true
}

// TestHostMisbehaves: whatever the host does wrong, connect() fails with
// ENETUNREACH (an sdp rule) or falls back to the guest's TCP (a both rule)
// in bounded time, and the program neither crashes nor hangs.
func TestHostMisbehaves(t *testing.T) {
	needBuild(t)
	port := closingListener(t)
	cases := []struct {
		name   string
		script func(c net.Conn, r *ctl.Reader)
		want   string // with an sdp rule
		perr   bool   // counted as a protocol error
	}{
		{"garbage instead of HELLO_OK", func(c net.Conn, r *ctl.Reader) {
			r.Read()
			c.Write([]byte("\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"))
			time.Sleep(100 * time.Millisecond)
		}, "ENETUNREACH", true},
		{"wrong HELLO_OK version", func(c net.Conn, r *ctl.Reader) {
			r.Read()
			send(c, ctl.Msg{Type: ctl.TypeHelloOK, Ver: 9})
			time.Sleep(100 * time.Millisecond)
		}, "ENETUNREACH", false},
		{"guest type from the host", func(c net.Conn, r *ctl.Reader) {
			if hello(c, r) {
				r.Read()
				send(c, ctl.Msg{Type: ctl.TypeAbort, GuestPort: 1, HostPort: 2})
				time.Sleep(100 * time.Millisecond)
			}
		}, "ENETUNREACH", true},
		{"body size lie", func(c net.Conn, r *ctl.Reader) {
			if hello(c, r) {
				m, _ := r.Read()
				c.Write([]byte{1, byte(ctl.TypeTicket), 200, 0, byte(m.ID), 0, 0, 0})
				time.Sleep(100 * time.Millisecond)
			}
		}, "ENETUNREACH", true},
		{"hang-up after HELLO", func(c net.Conn, r *ctl.Reader) {
			hello(c, r)
		}, "ENETUNREACH", false},
		{"silence", func(c net.Conn, r *ctl.Reader) {
			if hello(c, r) {
				r.Read()
				time.Sleep(700 * time.Millisecond)
			}
		}, "ENETUNREACH", false},
		{"answer to another request", func(c net.Conn, r *ctl.Reader) {
			if hello(c, r) {
				m, _ := r.Read()
				send(c, ctl.Msg{Type: ctl.TypeDeny, ID: m.ID + 1, Errno: 13})
				time.Sleep(700 * time.Millisecond)
			}
		}, "ENETUNREACH", false},
		{"ticket without RESULT", func(c net.Conn, r *ctl.Reader) {
			if hello(c, r) {
				m, _ := r.Read()
				send(c, ctl.Msg{Type: ctl.TypeTicket, ID: m.ID, Port: 4242, Timeout: 100})
				time.Sleep(700 * time.Millisecond)
			}
		}, "ECONNREFUSED", false},
		{"RESULT with a bad errno", func(c net.Conn, r *ctl.Reader) {
			if hello(c, r) {
				m, _ := r.Read()
				send(c, ctl.Msg{Type: ctl.TypeTicket, ID: m.ID, Port: 4243, Timeout: 100})
				send(c, ctl.Msg{Type: ctl.TypeResult, ID: 4243, Errno: -5})
				time.Sleep(100 * time.Millisecond)
			}
		}, "ECONNREFUSED", false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := rawHost(t, c.script)
			env := []string{"VSDP_TEST_UNIX_DIR=" + dir, "VSDP_CTL_TIMEOUT_MS=500"}
			start := time.Now()
			r := execProg(t, writeConf(t, "use sdp client * *:*\n"), env, "connect", "127.0.0.1", port, "block")
			r.want(t, "connect", c.want)
			if c.perr && r.num(t, "c.protocol_errors") < 1 {
				t.Errorf("not counted as a protocol error:\n%s", r.out)
			}
			if d := time.Since(start); d > 5*time.Second {
				t.Errorf("took %v", d)
			}
			if c.want == "ENETUNREACH" {
				// a both rule falls back to the guest's TCP instead
				dir := rawHost(t, c.script)
				env := []string{"VSDP_TEST_UNIX_DIR=" + dir, "VSDP_CTL_TIMEOUT_MS=500"}
				r := execProg(t, writeConf(t, "use both client * *:*\n"), env, "connect", "127.0.0.1", port, "block")
				r.want(t, "connect", "OK")
				r.want(t, "c.locals", "1")
			}
		})
	}
}
