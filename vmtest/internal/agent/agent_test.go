package agent

import (
	"context"
	"encoding/json"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vsdp/vsdp/vmtest/internal/proto"
)

// serve starts a Server on one end of a pipe and returns the other end,
// with the Hello already read.
func serve(t *testing.T, s *Server) net.Conn {
	t.Helper()
	host, guest := net.Pipe()
	done := make(chan error, 1)
	go func() { done <- s.Serve(context.Background(), guest) }()
	t.Cleanup(func() {
		host.Close()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Error("Serve did not return after the host closed")
		}
		guest.Close()
	})
	host.SetDeadline(time.Now().Add(20 * time.Second))
	f, err := proto.ReadFrame(host)
	if err != nil || f.Type != proto.TypeHello {
		t.Fatalf("first frame %v, %v; want hello", f.Type, err)
	}
	return host
}

func send(t *testing.T, c net.Conn, typ proto.Type, id uint32, v any) {
	t.Helper()
	var b []byte
	if raw, ok := v.([]byte); ok {
		b = raw
	} else if v != nil {
		b, _ = json.Marshal(v)
	}
	if err := proto.WriteFrame(c, proto.Frame{Type: typ, ID: id, Payload: b}); err != nil {
		t.Fatal(err)
	}
}

func reply(t *testing.T, c net.Conn) (uint32, proto.Reply) {
	t.Helper()
	f, err := proto.ReadFrame(c)
	if err != nil {
		t.Fatal(err)
	}
	if f.Type != proto.TypeReply {
		t.Fatalf("got %v, want reply", f.Type)
	}
	var r proto.Reply
	if err := json.Unmarshal(f.Payload, &r); err != nil {
		t.Fatal(err)
	}
	return f.ID, r
}

func TestServerRejects(t *testing.T) {
	c := serve(t, &Server{})
	tests := []struct {
		name string
		typ  proto.Type
		body any
		want string
	}{
		{"bad json", proto.TypeExec, []byte("{"), "bad request"},
		{"invalid exec", proto.TypeExec, proto.Exec{Argv: []string{"true"}}, "timeout"},
		{"invalid read", proto.TypeReadFile, proto.ReadFile{Path: "x", Max: 1}, "not absolute"},
		{"host-only type", proto.TypeReply, nil, "unexpected reply"},
		{"hello from host", proto.TypeHello, nil, "unexpected hello"},
		{"poweroff without hook", proto.TypePoweroff, nil, "not supported"},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			send(t, c, tt.typ, uint32(100+i), tt.body)
			id, r := reply(t, c)
			if id != uint32(100+i) || !strings.Contains(r.Error, tt.want) {
				t.Errorf("reply %d %+v, want id %d and an error with %q", id, r, 100+i, tt.want)
			}
		})
	}
	// A cancel for nothing gets no reply; the next request still works.
	send(t, c, proto.TypeCancel, 999, nil)
	send(t, c, proto.TypeExec, 1, proto.Exec{Argv: []string{"true"}, TimeoutMS: 5000, MaxOutput: 10})
	if id, r := reply(t, c); id != 1 || r.Error != "" || r.Exec == nil || r.Exec.Exit != 0 {
		t.Errorf("reply %d %+v", id, r)
	}
}

func TestServerBusy(t *testing.T) {
	c := serve(t, &Server{MaxRunning: 1})
	send(t, c, proto.TypeExec, 1, proto.Exec{Argv: []string{"sleep", "30"}, TimeoutMS: 30000})
	send(t, c, proto.TypeExec, 2, proto.Exec{Argv: []string{"true"}, TimeoutMS: 1000})
	if id, r := reply(t, c); id != 2 || !strings.Contains(r.Error, "busy") {
		t.Errorf("second request: %d %+v, want busy", id, r)
	}
	send(t, c, proto.TypeCancel, 1, nil)
	if id, r := reply(t, c); id != 1 || r.Exec == nil || !r.Exec.Canceled {
		t.Errorf("canceled request: %d %+v", id, r)
	}
}

func TestServerPoweroff(t *testing.T) {
	var called atomic.Bool
	c := serve(t, &Server{Poweroff: func() error { called.Store(true); return nil }})
	send(t, c, proto.TypePoweroff, 5, nil)
	if id, r := reply(t, c); id != 5 || r.Error != "" {
		t.Errorf("reply %d %+v", id, r)
	}
	deadline := time.Now().Add(5 * time.Second)
	for !called.Load() && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if !called.Load() {
		t.Error("Poweroff hook not called")
	}
}

func TestCapped(t *testing.T) {
	c := &capped{max: 5}
	for _, s := range []string{"abc", "defg", "hij"} {
		if n, err := c.Write([]byte(s)); n != len(s) || err != nil {
			t.Fatalf("Write(%q) = %d, %v", s, n, err)
		}
	}
	if c.buf.String() != "abcde" || !c.truncated {
		t.Errorf("kept %q, truncated %v", c.buf.String(), c.truncated)
	}
}
