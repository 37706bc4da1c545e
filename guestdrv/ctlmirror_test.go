package guestdrv

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"testing"

	"github.com/vsdp/vsdp/guestdrv/ctl"
)

// fields writes a message the way the harness reads and prints it.
func fields(m ctl.Msg) string {
	addr := func(a netip.AddrPort) string {
		var raw [16]byte
		fam := 0
		switch {
		case !a.Addr().IsValid():
		case a.Addr().Is4():
			fam = ctl.FamilyInet
			v := a.Addr().As4()
			copy(raw[:], v[:])
		default:
			fam = ctl.FamilyInet6
			raw = a.Addr().As16()
		}
		return fmt.Sprintf("%d %d %s", fam, a.Port(), hex.EncodeToString(raw[:]))
	}
	return fmt.Sprintf("%d %d %d %d %d %d %d %d %d %d %d %d %d %d %d %s %s",
		m.Type, m.ID, m.PID, m.Ver, m.CID, m.Flags, m.Port, m.Timeout, m.Backlog,
		m.GuestPort, m.HostPort, m.Errno, m.Level, m.Name, m.Value, addr(m.Local), addr(m.Remote))
}

var mirrorMsgs = []ctl.Msg{
	{Type: ctl.TypeHello, PID: 4242, Ver: ctl.Version},
	{Type: ctl.TypeDial, ID: 7, Remote: netip.MustParseAddrPort("10.1.0.7:5001"), Flags: ctl.DialNoDelay | ctl.DialKeepAlive},
	{Type: ctl.TypeDial, ID: 8, Remote: netip.MustParseAddrPort("[fd00::1]:443")},
	{Type: ctl.TypeListen, ID: 2, Local: netip.MustParseAddrPort("0.0.0.0:5000"), Backlog: 128, Port: 0x10000001},
	{Type: ctl.TypeUnlisten, Port: 5000},
	{Type: ctl.TypeWho, ID: 3, GuestPort: 1, HostPort: 0xffffffff},
	{Type: ctl.TypeAbort, GuestPort: 1, HostPort: 2},
	{Type: ctl.TypeSetOpt, GuestPort: 1, HostPort: 2, Level: 6, Name: 1, Value: -1},
	{Type: ctl.TypeHelloOK, Ver: 1, CID: 3},
	{Type: ctl.TypeTicket, ID: 1, Port: 0x10000001, Timeout: 30000},
	{Type: ctl.TypeLocal, ID: 1},
	{Type: ctl.TypeDeny, ID: 1, Errno: 13},
	{Type: ctl.TypeResult, ID: 0x10000001, Errno: 111, Local: netip.MustParseAddrPort("192.168.7.9:80"), Remote: netip.MustParseAddrPort("[fd00::1]:443")},
	{Type: ctl.TypeListenOK, ID: 2, Local: netip.MustParseAddrPort("10.9.0.2:5000")},
	{Type: ctl.TypePeer, ID: 77, Port: 5000, Remote: netip.MustParseAddrPort("10.2.0.1:33333"), Local: netip.MustParseAddrPort("10.9.0.2:5000")},
	{Type: ctl.TypeWhoOK, ID: 3, Local: netip.MustParseAddrPort("10.9.0.2:1"), Remote: netip.MustParseAddrPort("[::ffff:10.0.0.1]:2")},
	{Type: ctl.TypeReset, GuestPort: 9, HostPort: 10, Errno: 104},
}

// TestCtlHeaderMirrorsGo: vsdp_ctl.h has the same types and body sizes as
// guestdrv/ctl, and both sides encode and decode every type to the same
// bytes and fields.
func TestCtlHeaderMirrorsGo(t *testing.T) {
	h := getHarness(t)
	sizes := map[int]int{}
	for _, l := range strings.Split(strings.TrimSpace(string(h.call(t, 'S', nil))), "\n") {
		var ty, n int
		if _, err := fmt.Sscan(l, &ty, &n); err != nil {
			t.Fatalf("harness sizes: %q", l)
		}
		sizes[ty] = n
	}
	for ty := 0; ty < 256; ty++ {
		want := ctl.BodySize(ctl.Type(ty))
		got, ok := sizes[ty]
		if !ok {
			got = -1
		}
		if got != want {
			t.Errorf("type %#x: C body size %d, Go %d", ty, got, want)
		}
	}
	for _, m := range mirrorMsgs {
		goBytes, err := m.Append(nil)
		if err != nil {
			t.Fatal(err)
		}
		cBytes := h.call(t, 'E', []byte(fields(m)))
		if !bytes.Equal(cBytes, goBytes) {
			t.Errorf("%v: C encodes %x, Go %x", m.Type, cBytes, goBytes)
		}
		dec := strings.TrimSpace(string(h.call(t, 'D', goBytes)))
		want := "ok " + strconv.Itoa(len(goBytes)) + " " + fields(m)
		if dec != want {
			t.Errorf("%v: C decodes\n %s\nwant\n %s", m.Type, dec, want)
		}
		if got := strings.TrimSpace(string(h.call(t, 'D', goBytes[:len(goBytes)-1]))); len(goBytes) > ctl.HeaderSize && got != "more" {
			t.Errorf("%v: a short frame decodes as %q, want more", m.Type, got)
		}
	}
}

// FuzzCtlDecode decodes the same bytes with the Go codec and the C one
// (under ASan/UBSan) and requires the same verdict and the same fields.
func FuzzCtlDecode(f *testing.F) {
	for _, m := range mirrorMsgs {
		b, _ := m.Append(nil)
		f.Add(b)
	}
	f.Add([]byte{1, 0x85, 44, 0, 1, 0, 0, 0})
	f.Add([]byte{2, 1, 8, 0, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		m, n, err := ctl.Decode(b)
		got := strings.TrimSpace(string(getHarness(t).call(t, 'D', b)))
		var want string
		switch {
		case err == nil:
			want = "ok " + strconv.Itoa(n) + " " + fields(m)
		case err.Error() == "unexpected EOF":
			want = "more"
		default:
			want = "bad"
		}
		if got != want {
			t.Fatalf("%x: C says %q, Go %q (%v)", b, got, want, err)
		}
	})
}
