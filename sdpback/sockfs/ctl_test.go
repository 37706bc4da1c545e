package sockfs

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
)

func TestParseCmd(t *testing.T) {
	ap := netip.MustParseAddrPort
	for _, tc := range []struct {
		in   string
		want Cmd
		ok   bool
	}{
		{"connect 10.1.0.7!5000", Cmd{Verb: VerbConnect, Addr: ap("10.1.0.7:5000")}, true},
		{"connect 10.1.0.7!5000\n", Cmd{Verb: VerbConnect, Addr: ap("10.1.0.7:5000")}, true},
		{"connect 10.1.0.7!5000\r\n", Cmd{Verb: VerbConnect, Addr: ap("10.1.0.7:5000")}, true},
		{"  connect \t 10.1.0.7!5000  ", Cmd{Verb: VerbConnect, Addr: ap("10.1.0.7:5000")}, true},
		{"connect fd00::7!80", Cmd{Verb: VerbConnect, Addr: ap("[fd00::7]:80")}, true},
		{"connect ::ffff:10.1.0.7!80", Cmd{Verb: VerbConnect, Addr: ap("10.1.0.7:80")}, true},
		{"announce *!5000", Cmd{Verb: VerbAnnounce, Any: true, Addr: ap("0.0.0.0:5000")}, true},
		{"announce *!0", Cmd{Verb: VerbAnnounce, Any: true, Addr: ap("0.0.0.0:0")}, true},
		{"announce 10.1.0.7!5000", Cmd{Verb: VerbAnnounce, Addr: ap("10.1.0.7:5000")}, true},
		{"hangup", Cmd{Verb: VerbHangup}, true},
		{"hangup\n", Cmd{Verb: VerbHangup}, true},
		{"shutdown", Cmd{Verb: VerbShutdown}, true},
		{"keepalive", Cmd{Verb: VerbKeepalive, Seconds: DefaultKeepalive}, true},
		{"keepalive 30", Cmd{Verb: VerbKeepalive, Seconds: 30}, true},
		{"keepalive 0", Cmd{Verb: VerbKeepalive}, true},
		{"keepalive 86400", Cmd{Verb: VerbKeepalive, Seconds: 86400}, true},
		{"nodelay", Cmd{Verb: VerbNoDelay, On: true}, true},
		{"nodelay on", Cmd{Verb: VerbNoDelay, On: true}, true},
		{"nodelay off", Cmd{Verb: VerbNoDelay}, true},
		// Each rule that rejects.
		{"", Cmd{}, false},                                     // empty
		{"\n", Cmd{}, false},                                   // empty line
		{"connect 10.1.0.7!5000\n\n", Cmd{}, false},            // two newlines
		{"hangup\nconnect 10.1.0.7!1", Cmd{}, false},           // two commands
		{"fly 10.1.0.7!5000", Cmd{}, false},                    // unknown verb
		{"CONNECT 10.1.0.7!5000", Cmd{}, false},                // verbs are lower case
		{"connect", Cmd{}, false},                              // missing argument
		{"connect 10.1.0.7!5000 9", Cmd{}, false},              // extra argument
		{"connect 10.1.0.7:5000", Cmd{}, false},                // colon, not bang
		{"connect 10.1.0.7!", Cmd{}, false},                    // no port
		{"connect 10.1.0.7!0", Cmd{}, false},                   // port 0
		{"connect 10.1.0.7!65536", Cmd{}, false},               // port too big
		{"connect 10.1.0.7!050", Cmd{}, false},                 // leading zero
		{"connect 10.1.0.7!+50", Cmd{}, false},                 // sign
		{"connect 10.1.0.7!-1", Cmd{}, false},                  // negative
		{"connect 10.1.0!80", Cmd{}, false},                    // bad address
		{"connect host.example!80", Cmd{}, false},              // names are not resolved
		{"connect 0.0.0.0!80", Cmd{}, false},                   // unspecified destination
		{"connect *!80", Cmd{}, false},                         // wildcard destination
		{"connect fe80::1%eth0!80", Cmd{}, false},              // zones
		{"announce", Cmd{}, false},                             // missing argument
		{"announce *", Cmd{}, false},                           // no port
		{"announce *!x", Cmd{}, false},                         // bad port
		{"announce 10.1.0.7", Cmd{}, false},                    // no port
		{"hangup now", Cmd{}, false},                           // extra argument
		{"shutdown wr", Cmd{}, false},                          // extra argument
		{"keepalive -1", Cmd{}, false},                         // negative
		{"keepalive 86401", Cmd{}, false},                      // too long
		{"keepalive 1s", Cmd{}, false},                         // units
		{"keepalive 1 2", Cmd{}, false},                        // extra argument
		{"nodelay yes", Cmd{}, false},                          // not on/off
		{"nodelay on off", Cmd{}, false},                       // extra argument
		{"connect 10.1.0.7!5000\x00", Cmd{}, false},            // NUL
		{"connect\x0b10.1.0.7!5000", Cmd{}, false},             // control byte
		{"connect 10.1.0.7!5000\xff", Cmd{}, false},            // non-ASCII
		{"hangup" + strings.Repeat(" ", MaxCtl), Cmd{}, false}, // too long
	} {
		got, err := ParseCmd([]byte(tc.in))
		if (err == nil) != tc.ok {
			t.Errorf("%q: err %v, want ok=%v", tc.in, err, tc.ok)
			continue
		}
		if err != nil {
			if !errors.Is(err, ErrCtl) {
				t.Errorf("%q: error %v does not wrap ErrCtl", tc.in, err)
			}
			continue
		}
		if got != tc.want {
			t.Errorf("%q: got %+v, want %+v", tc.in, got, tc.want)
		}
	}
}

// FuzzCtl: the parser never panics, accepts only what it can print, and
// what it prints parses back to the same command.
func FuzzCtl(f *testing.F) {
	for _, s := range []string{"connect 10.1.0.7!5000\n", "announce *!5000", "announce 10.1.0.7!0", "hangup",
		"keepalive 30", "nodelay off", "shutdown", "connect fd00::1!80", "connect 1.2.3.4!99999", "nodelay maybe"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := ParseCmd(b)
		if err != nil {
			if !errors.Is(err, ErrCtl) {
				t.Fatalf("%q: error %v does not wrap ErrCtl", b, err)
			}
			return
		}
		if len(b) > MaxCtl {
			t.Fatalf("%q: accepted %d bytes", b, len(b))
		}
		s := c.String()
		c2, err := ParseCmd([]byte(s))
		if err != nil || c2 != c {
			t.Fatalf("%q: parsed %+v, printed %q, reparsed %+v (%v)", b, c, s, c2, err)
		}
	})
}
