package vhosttest

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/vsdp/vsdp/vhost"
	"golang.org/x/sys/unix"
)

// scripted answers each request read from c with reply(h, payload, nfds).
func scripted(t *testing.T, c *net.UnixConn, reply func(h vhost.Header, p []byte, nfds int) []byte) {
	t.Helper()
	go func() {
		defer c.Close()
		for {
			buf := make([]byte, vhost.HeaderSize+vhost.MaxPayload)
			oob := make([]byte, unix.CmsgSpace(4*8))
			n, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
			if err != nil || n < vhost.HeaderSize {
				return
			}
			nfds := 0
			if cm, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
				for i := range cm {
					fds, _ := unix.ParseUnixRights(&cm[i])
					for _, fd := range fds {
						unix.Close(fd)
						nfds++
					}
				}
			}
			h, _ := vhost.ParseHeader(buf)
			if out := reply(h, buf[vhost.HeaderSize:n], nfds); out != nil {
				if _, err := c.Write(out); err != nil {
					return
				}
			}
		}
	}()
}

func reply(req vhost.Request, flags uint32, p []byte) []byte {
	return append(vhost.Header{Request: req, Flags: flags, Size: uint32(len(p))}.Append(nil), p...)
}

func TestCallChecksReplies(t *testing.T) {
	CheckLeaks(t)
	ok := uint32(vhost.FlagVersion | vhost.FlagReply)
	cases := []struct {
		name  string
		reply func(h vhost.Header) []byte
		call  func(f *Frontend) error
		want  error // nil: success
	}{
		{"features", func(h vhost.Header) []byte { return reply(h.Request, ok, vhost.U64(42).Append(nil)) },
			func(f *Frontend) error {
				v, err := f.GetFeatures()
				if err == nil && v != 42 {
					return errors.New("wrong value")
				}
				return err
			}, nil},
		{"empty reply is a rejection", func(h vhost.Header) []byte { return reply(h.Request, ok, nil) },
			func(f *Frontend) error { _, err := f.GetFeatures(); return err }, ErrNack},
		{"reply to another request", func(h vhost.Header) []byte { return reply(vhost.ReqGetQueueNum, ok, vhost.U64(1).Append(nil)) },
			func(f *Frontend) error { _, err := f.GetFeatures(); return err }, ErrBadReply},
		{"reply without REPLY flag", func(h vhost.Header) []byte { return reply(h.Request, vhost.FlagVersion, vhost.U64(1).Append(nil)) },
			func(f *Frontend) error { _, err := f.GetFeatures(); return err }, ErrBadReply},
		{"status 1", func(h vhost.Header) []byte {
			if h.Flags&vhost.FlagNeedReply == 0 {
				return nil
			}
			return reply(h.Request, ok, vhost.U64(1).Append(nil))
		}, func(f *Frontend) error { return f.SetOwner() }, ErrNack},
		{"short status", func(h vhost.Header) []byte { return reply(h.Request, ok, []byte{0, 0}) },
			func(f *Frontend) error { return f.SetOwner() }, ErrBadReply},
		{"bad vring base reply", func(h vhost.Header) []byte {
			return reply(h.Request, ok, vhost.VringState{Index: 5, Num: 1}.Append(nil))
		}, func(f *Frontend) error { _, err := f.GetVringBase(0); return err }, ErrBadReply},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			a, b, err := SocketPair()
			if err != nil {
				t.Fatal(err)
			}
			f := NewFrontend(a)
			defer f.Close()
			f.Timeout = time.Second
			f.protocol = vhost.ProtocolReplyAck
			scripted(t, b, func(h vhost.Header, p []byte, nfds int) []byte { return c.reply(h) })
			err = c.call(f)
			if c.want == nil && err != nil || c.want != nil && !errors.Is(err, c.want) {
				t.Fatalf("got %v, want %v", err, c.want)
			}
		})
	}
}

// Send attaches the fds in one sendmsg; Call waits no longer than Timeout.
func TestSendFDsAndTimeout(t *testing.T) {
	CheckLeaks(t)
	a, b, err := SocketPair()
	if err != nil {
		t.Fatal(err)
	}
	f := NewFrontend(a)
	defer f.Close()
	f.Timeout = 100 * time.Millisecond
	got := make(chan int, 1)
	scripted(t, b, func(h vhost.Header, p []byte, nfds int) []byte { got <- nfds; return nil })
	e1, _ := NewEventFD()
	e2, _ := NewEventFD()
	defer e1.Close()
	defer e2.Close()
	if err := f.Send(vhost.ReqSetVringCall, vhost.FlagVersion, vhost.U64(0).Append(nil), int(e1.Fd()), int(e2.Fd())); err != nil {
		t.Fatal(err)
	}
	if n := <-got; n != 2 {
		t.Fatalf("back-end received %d fds, want 2", n)
	}
	t0 := time.Now()
	if _, err := f.GetFeatures(); err == nil || time.Since(t0) > 2*time.Second {
		t.Fatalf("unanswered call: %v after %v", err, time.Since(t0))
	}
}

// The leak checker must be able to fail: an fd, a goroutine and a memfd
// mapping left behind are each reported.
func TestLeakSnapshotDetects(t *testing.T) {
	s := TakeLeakSnapshot()
	ev, err := NewEventFD()
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Check(20 * time.Millisecond); err == nil || !strings.Contains(err.Error(), "eventfd") {
		t.Fatalf("leaked eventfd not reported: %v", err)
	}
	ev.Close()
	// A fresh snapshot, and several leaked goroutines: goroutines of
	// earlier tests may still be ending and would hide a single one.
	gs := TakeLeakSnapshot()
	stop := make(chan struct{})
	for range 4 {
		go func() { <-stop }()
	}
	if err := gs.Check(20 * time.Millisecond); err == nil || !strings.Contains(err.Error(), "goroutines grew") {
		t.Fatalf("leaked goroutines not reported: %v", err)
	}
	close(stop)
	m, err := NewGuestMemory(1 << 16)
	if err != nil {
		t.Fatal(err)
	}
	fd, _ := unix.Dup(m.Fd())
	m.Close() // the fd is a leak, and so is a mapping of it
	mapping, err := unix.Mmap(fd, 0, 4096, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	unix.Close(fd)
	if err := s.Check(20 * time.Millisecond); err == nil || !strings.Contains(err.Error(), "memfd mappings grew") {
		t.Fatalf("leaked mapping not reported: %v", err)
	}
	unix.Munmap(mapping)
	if err := s.Check(time.Second); err != nil {
		t.Fatalf("after cleaning up: %v", err)
	}
}

func TestSplit(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, c := range []struct{ n, k, want int }{{1, 1, 1}, {1, 5, 1}, {10, 3, 3}, {10, 10, 10}, {10, 20, 10}, {1000, 4, 4}} {
		m := RandomMessages(rng, 1, c.n, c.n)[0]
		parts := Split(m, c.k, rng)
		if len(parts) != c.want {
			t.Fatalf("Split(%d bytes, %d): %d parts", c.n, c.k, len(parts))
		}
		for _, p := range parts {
			if len(p) == 0 {
				t.Fatalf("Split(%d, %d): empty part", c.n, c.k)
			}
		}
		if !bytes.Equal(bytes.Join(parts, nil), m) {
			t.Fatalf("Split(%d, %d) lost bytes", c.n, c.k)
		}
	}
}
