package ctl

import (
	"bytes"
	"encoding/hex"
	"errors"
	"io"
	"net/netip"
	"strings"
	"testing"
)

// TestGoldenDial checks a DIAL frame against bytes written by hand from the
// layout in doc.go.
func TestGoldenDial(t *testing.T) {
	want, _ := hex.DecodeString(strings.Join([]string{
		"01",       // version
		"02",       // type DIAL
		"1800",     // body length 24, LE
		"07000000", // id 7
		"02", "00", // AF_INET, zero
		"8913",                             // port 5001 LE
		"0a010007000000000000000000000000", // 10.1.0.7
		"01000000",                         // flags NODELAY
	}, ""))
	m := Msg{Type: TypeDial, ID: 7, Remote: netip.MustParseAddrPort("10.1.0.7:5001"), Flags: DialNoDelay}
	got, err := m.Append(nil)
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("encode:\n got %x (%v)\nwant %x", got, err, want)
	}
	d, n, err := Decode(want)
	if err != nil || n != len(want) || d != m {
		t.Fatalf("decode: %+v %d %v", d, n, err)
	}
}

func TestRoundTripEveryType(t *testing.T) {
	v4 := netip.MustParseAddrPort("192.168.7.9:80")
	v6 := netip.MustParseAddrPort("[fd00::1]:443")
	msgs := []Msg{
		{Type: TypeHello, PID: 42, Ver: Version},
		{Type: TypeDial, ID: 1, Remote: v6, Flags: DialKeepAlive},
		{Type: TypeListen, ID: 2, Local: netip.AddrPortFrom(netip.IPv4Unspecified(), 5000), Backlog: 128, Port: 5000},
		{Type: TypeUnlisten, Port: 5000},
		{Type: TypeWho, ID: 3, GuestPort: 1, HostPort: 2},
		{Type: TypeAbort, GuestPort: 1, HostPort: 2},
		{Type: TypeSetOpt, GuestPort: 1, HostPort: 2, Level: 6, Name: 1, Value: -1},
		{Type: TypeHelloOK, Ver: 1, CID: 3},
		{Type: TypeTicket, ID: 1, Port: 0x10000001, Timeout: 30000},
		{Type: TypeLocal, ID: 1},
		{Type: TypeDeny, ID: 1, Errno: 13},
		{Type: TypeResult, ID: 0x10000001, Errno: 0, Local: v4, Remote: v6},
		{Type: TypeListenOK, ID: 2, Local: v4},
		{Type: TypePeer, ID: 77, Port: 5000, Remote: v4, Local: v4},
		{Type: TypeWhoOK, ID: 3, Local: v4, Remote: v4},
		{Type: TypeReset, GuestPort: 9, HostPort: 10, Errno: 104},
	}
	var stream []byte
	for _, m := range msgs {
		var err error
		if stream, err = m.Append(stream); err != nil {
			t.Fatal(err)
		}
	}
	r := NewReader(iotestHalf{bytes.NewReader(stream)})
	for _, want := range msgs {
		got, err := r.Read()
		if err != nil || got != want {
			t.Fatalf("read %+v, %v; want %+v", got, err, want)
		}
	}
	if _, err := r.Read(); err != io.EOF {
		t.Fatalf("end of stream: %v", err)
	}
	if len(typeNames) != len(layouts) {
		t.Fatal("a type lacks a name or a layout")
	}
}

// iotestHalf returns at most 3 bytes per Read, to exercise reassembly.
type iotestHalf struct{ r io.Reader }

func (h iotestHalf) Read(p []byte) (int, error) { return h.r.Read(p[:min(len(p), 3)]) }

func TestDecodeRejects(t *testing.T) {
	good, _ := (&Msg{Type: TypeDeny, ID: 1, Errno: 1}).Append(nil)
	dial, _ := (&Msg{Type: TypeDial, Remote: netip.MustParseAddrPort("1.2.3.4:5")}).Append(nil)
	mod := func(b []byte, f func([]byte)) []byte { c := append([]byte(nil), b...); f(c); return c }
	for _, tc := range []struct {
		name string
		in   []byte
		want string
	}{
		{"version", mod(good, func(b []byte) { b[0] = 2 }), "version"},
		{"unknown type", mod(good, func(b []byte) { b[1] = 0x7f }), "unknown type"},
		{"body size", mod(good, func(b []byte) { b[2] = 8 }), "want 4"},
		{"family", mod(dial, func(b []byte) { b[8] = 3 }), "family"},
		{"reserved byte", mod(dial, func(b []byte) { b[9] = 1 }), "reserved"},
		{"ipv4 trailing bytes", mod(dial, func(b []byte) { b[20] = 1 }), "trailing"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := Decode(tc.in)
			if !errors.Is(err, ErrFrame) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want ErrFrame mentioning %q", err, tc.want)
			}
		})
	}
	if _, _, err := Decode(good[:5]); err != io.ErrUnexpectedEOF {
		t.Fatalf("short header: %v", err)
	}
	if _, _, err := Decode(good[:len(good)-1]); err != io.ErrUnexpectedEOF {
		t.Fatalf("short body: %v", err)
	}
	if _, err := (&Msg{Type: 0x55}).Append(nil); !errors.Is(err, ErrFrame) {
		t.Fatalf("encode of unknown type: %v", err)
	}
	r := NewReader(bytes.NewReader(good[:len(good)-2]))
	if _, err := r.Read(); err != io.ErrUnexpectedEOF {
		t.Fatalf("truncated stream: %v", err)
	}
}

func FuzzDecode(f *testing.F) {
	for _, m := range []Msg{{Type: TypeDial, Remote: netip.MustParseAddrPort("[::1]:1")}, {Type: TypePeer}, {Type: TypeSetOpt, Value: -5}} {
		b, _ := m.Append(nil)
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		m, n, err := Decode(b)
		if err != nil {
			return
		}
		if n > len(b) || n != HeaderSize+BodySize(m.Type) {
			t.Fatalf("length %d of %d", n, len(b))
		}
		out, err := m.Append(nil)
		if err != nil {
			t.Fatalf("re-encode: %v", err)
		}
		m2, _, err := Decode(out)
		if err != nil || m2 != m {
			t.Fatalf("round trip: %+v vs %+v (%v)", m2, m, err)
		}
	})
}
