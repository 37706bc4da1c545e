package vsdpnet

import (
	"errors"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vsdp/vsdp/guestdrv/ctl"
)

// hostStream returns a ctlConn reading from one end of a socketpair, and
// the other end, for feeding it bytes as a host would.
func hostStream(t testing.TB) (*ctlConn, *os.File) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fds[0]), "guest")
	rc, err := f.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	c := &ctlConn{tr: &transport{}, timeout: time.Second, f: f, rc: rc, buf: make([]byte, 0, rxMax)}
	host := os.NewFile(uintptr(fds[1]), "host")
	t.Cleanup(func() { c.close(); host.Close() })
	return c, host
}

// FuzzHostStream feeds any bytes to the control connection's reader as the
// host's stream: it must file what is well-formed, stop at what is not
// (ErrProtocol, connection dropped), keep at most notesMax notes, and never
// panic or block.
func FuzzHostStream(f *testing.F) {
	var seed []byte
	for _, m := range []ctl.Msg{
		{Type: ctl.TypeResult, ID: 7, Errno: 111},
		{Type: ctl.TypePeer, ID: 9, Port: 5000},
		{Type: ctl.TypeReset, GuestPort: 1, HostPort: 2, Errno: 104},
		{Type: ctl.TypeTicket, ID: 3, Port: 40, Timeout: 10},
	} {
		seed, _ = m.Append(seed)
	}
	f.Add(seed)
	f.Add(append(append([]byte(nil), seed...), 1, byte(ctl.TypeAbort), 8, 0, 0, 0, 0, 0))
	f.Add([]byte{1, 0x85, 44, 0, 7, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		c, host := hostStream(t)
		if len(b) > 64<<10 {
			b = b[:64<<10]
		}
		go func() { host.Write(b); host.Close() }()
		c.mu.Lock()
		err := c.pump(func() bool { return false }, time.Now().Add(200*time.Millisecond))
		n := len(c.notes)
		c.mu.Unlock()
		if n > notesMax {
			t.Fatalf("%d notes kept", n)
		}
		// a well-formed prefix followed by the end is ErrNoDevice (EOF);
		// anything malformed is ErrProtocol
		if err != nil && !errors.Is(err, ErrProtocol) && !errors.Is(err, ErrNoDevice) {
			t.Fatalf("pump: %v", err)
		}
		// the notes the stream carried are there to take
		for _, m := range decodeAll(b) {
			if tp, k1, k2 := noteKey(m); tp == ctl.TypeResult || tp == ctl.TypePeer || tp == ctl.TypeReset {
				c.mu.Lock()
				_, ok := c.findNote(tp, k1, k2)
				c.mu.Unlock()
				if !ok && n < notesMax {
					t.Fatalf("note %+v lost", m)
				}
			}
		}
	})
}

// decodeAll decodes frames from the start of b until the first bad one,
// and stops at the first that is not for the guest (the reader stops too).
func decodeAll(b []byte) []ctl.Msg {
	var out []ctl.Msg
	for {
		m, n, err := ctl.Decode(b)
		if err != nil || m.Type.FromGuest() {
			return out
		}
		out = append(out, m)
		b = b[n:]
	}
}

// TestNotesBounded: a host that floods notes nobody claims costs at most
// notesMax of them, the oldest dropped.
func TestNotesBounded(t *testing.T) {
	c, host := hostStream(t)
	var b []byte
	for i := range notesMax + 10 {
		b, _ = (&ctl.Msg{Type: ctl.TypeResult, ID: uint32(i)}).Append(b)
	}
	go func() { host.Write(b) }()
	c.mu.Lock()
	c.pump(func() bool { return false }, time.Now().Add(300*time.Millisecond))
	n := len(c.notes)
	_, oldest := c.findNote(ctl.TypeResult, 0, 0)
	_, newest := c.findNote(ctl.TypeResult, notesMax+9, 0)
	c.mu.Unlock()
	if n != notesMax || oldest || !newest {
		t.Errorf("%d notes, oldest kept %v, newest kept %v", n, oldest, newest)
	}
}
