package daemon

import (
	"net/netip"
	"testing"

	"github.com/vsdp/vsdp/verbs/soft"
)

// TestFabricTableApply: a worker's table follows the supervisor's
// updates: a full sync drops what went away, set adds, delete removes,
// and a bad entry is reported without stopping the others.
func TestFabricTableApply(t *testing.T) {
	ft := fabricTable{t: soft.NewTable(), known: map[netip.Addr]bool{}}
	has := func(a string) bool { _, ok := ft.t.Lookup(netip.MustParseAddr(a)); return ok }
	steps := []struct {
		name    string
		u       workerUpdate
		bad     bool
		present []string
		absent  []string
	}{
		{"sync", workerUpdate{Table: map[string]string{"10.1.0.1": "unix:/r/h.fabric", "10.1.0.2": "unix:/r/a.fabric"}}, false,
			[]string{"10.1.0.1", "10.1.0.2"}, nil},
		{"set", workerUpdate{Set: map[string]string{"10.1.0.3": "unix:/r/b.fabric"}}, false,
			[]string{"10.1.0.1", "10.1.0.2", "10.1.0.3"}, nil},
		{"delete", workerUpdate{Delete: []string{"10.1.0.2"}}, false,
			[]string{"10.1.0.1", "10.1.0.3"}, []string{"10.1.0.2"}},
		{"sync drops", workerUpdate{Table: map[string]string{"10.1.0.1": "unix:/r/h.fabric", "10.1.0.4": "tcp:127.0.0.1:7470"}}, false,
			[]string{"10.1.0.1", "10.1.0.4"}, []string{"10.1.0.3"}},
		{"bad entries", workerUpdate{Set: map[string]string{"nowhere": "unix:/x", "10.1.0.5": "udp:1", "fd00::1": "unix:/y", "10.1.0.6": "unix:/r/c.fabric"}}, true,
			[]string{"10.1.0.6"}, []string{"10.1.0.5"}},
		{"bad delete", workerUpdate{Delete: []string{"x", "10.1.0.6"}}, true, []string{"10.1.0.1"}, []string{"10.1.0.6"}},
		{"stats only", workerUpdate{Stats: 7}, false, []string{"10.1.0.1", "10.1.0.4"}, nil},
	}
	for _, s := range steps {
		err := ft.apply(s.u)
		if (err != nil) != s.bad {
			t.Fatalf("%s: error %v, want error %v", s.name, err, s.bad)
		}
		for _, a := range s.present {
			if !has(a) {
				t.Fatalf("%s: %s missing", s.name, a)
			}
		}
		for _, a := range s.absent {
			if has(a) {
				t.Fatalf("%s: %s still there", s.name, a)
			}
		}
	}
}
