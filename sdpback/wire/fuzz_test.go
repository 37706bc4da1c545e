package wire_test

import (
	"bytes"
	"errors"
	"net/netip"
	"testing"

	"github.com/vsdp/vsdp/sdpback/wire"
)

// checkErr asserts the error contract: an *Error wrapping a sentinel.
func checkErr(t *testing.T, err error) {
	t.Helper()
	var we *wire.Error
	if !errors.As(err, &we) {
		t.Fatalf("error %T (%v) is not *wire.Error", err, err)
	}
	for _, s := range []error{wire.ErrTruncated, wire.ErrLength, wire.ErrMID, wire.ErrField, wire.ErrVersion} {
		if errors.Is(err, s) {
			return
		}
	}
	t.Fatalf("error %v wraps no sentinel", err)
}

// FuzzDecode: any bytes decode without panic; an accepted message
// re-encodes to exactly the same bytes, by Append and by PutHeader plus
// the payload.
func FuzzDecode(f *testing.F) {
	for _, g := range goldenMsgs {
		f.Add(unhex(f, g.hex))
	}
	f.Add([]byte{})
	f.Add(unhex(f, hdr("fe", "00", "00000020")+"00000010"+"00000001"+"fffffffffffffff0"))
	f.Add(unhex(f, hdr("07", "00", "00000014")+"10000001"))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := wire.Decode(b)
		if err != nil {
			checkErr(t, err)
			return
		}
		_ = m.String()
		if m.Len() != len(b) {
			t.Fatalf("Len() = %d for %d bytes", m.Len(), len(b))
		}
		enc, err := m.Append(nil)
		if err != nil {
			t.Fatalf("accepted %x but Append fails: %v", b, err)
		}
		if !bytes.Equal(enc, b) {
			t.Fatalf("round trip:\n in  %x\n out %x", b, enc)
		}
		hdr := make([]byte, wire.MaxHeaderLen)
		n, err := m.PutHeader(hdr, len(m.Payload))
		if err != nil {
			t.Fatalf("PutHeader: %v", err)
		}
		if !bytes.Equal(append(hdr[:n:n], m.Payload...), b) {
			t.Fatalf("PutHeader round trip differs for %x", b)
		}
	})
}

// zeroRanges returns a copy of b with the given [from, to) ranges cleared.
func zeroRanges(b []byte, r ...[2]int) []byte {
	c := bytes.Clone(b)
	for _, x := range r {
		clear(c[x[0]:x[1]])
	}
	return c
}

// FuzzHello: the three private-data decoders never panic; accepted input
// re-encodes to the same bytes, except the reserved bytes the decoders
// ignore (offsets from ref §2.3/§2.4, listed here independently).
func FuzzHello(f *testing.F) {
	for _, s := range []string{goldenHello4, goldenHello6, goldenCompact, goldenHelloAck} {
		f.Add(unhex(f, s))
	}
	f.Add(append(unhex(f, goldenCompact), make([]byte, 24)...))
	f.Add(patch(f, goldenCompact, 17, "60"))
	f.Add(patch(f, goldenHello4, 64, "ffffffff"))
	f.Fuzz(func(t *testing.T, b []byte) {
		if h, err := wire.DecodeHello(b); err != nil {
			checkErr(t, err)
		} else {
			enc, err := h.Append(nil)
			if err != nil {
				t.Fatalf("Append: %v", err)
			}
			want := zeroRanges(b, [2]int{18, 19}, [2]int{30, 32}, [2]int{64, 92})
			want[17] &= 0xF0
			if want[17] == 0x40 {
				want = zeroRanges(want, [2]int{32, 44}, [2]int{48, 60})
			}
			if !bytes.Equal(enc, want) {
				t.Fatalf("Hello round trip:\n in  %x\n out %x", want, enc)
			}
		}

		if a, err := wire.DecodeHelloAck(b); err != nil {
			checkErr(t, err)
		} else {
			enc, err := a.Append(nil)
			if err != nil {
				t.Fatalf("Append: %v", err)
			}
			if want := zeroRanges(b, [2]int{17, 19}, [2]int{24, 196}); !bytes.Equal(enc, want) {
				t.Fatalf("HelloAck round trip:\n in  %x\n out %x", want, enc)
			}
		}

		for _, cm := range [][2]netip.Addr{
			{netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.2")},
			{netip.MustParseAddr("2001:db8::1"), netip.MustParseAddr("2001:db8::2")},
		} {
			h, err := wire.DecodeCompactHello(b, cm[0], cm[1])
			if err != nil {
				checkErr(t, err)
				continue
			}
			if h.SrcIP != cm[0] || h.DstIP != cm[1] {
				t.Fatalf("compact: addresses %v %v", h.SrcIP, h.DstIP)
			}
			enc, err := h.AppendCompact(nil)
			if err != nil {
				t.Fatalf("AppendCompact: %v", err)
			}
			if !bytes.Equal(enc, b[:32]) {
				t.Fatalf("compact round trip:\n in  %x\n out %x", b[:32], enc)
			}
		}
	})
}
